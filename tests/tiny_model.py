"""A randomly initialised Qwen3 small enough for every stage's tests: hidden 64, 2 layers, head_dim 32 (vLLM's CPU
attention kernels need head_dim in {32, 64, 80, ...}) and a ~1k-token byte-level BPE trained on the fly, so an SFT
step takes well under a second. It loads in vLLM, TRL and PEFT like any hub checkpoint.
"""

from pathlib import Path

# The Qwen3 chat template, trimmed of tools: with enable_thinking=False the generation prompt closes an empty think
# block, and the last assistant turn carries one too, as the real hybrid Qwen3 templates do.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Qwen3 Instruct-2507's template, trimmed of tools: no think block anywhere, and no enable_thinking switch.
INSTRUCT_2507_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3 Thinking-2507's, trimmed: the generation prompt opens <think> (the model writes its reasoning, </think>, then
# the answer), and there is no switch to turn it off; the last assistant turn carries its (here empty) reasoning.
THINKING_2507_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
TEMPLATES = {"hybrid": QWEN3_TEMPLATE, "instruct-2507": INSTRUCT_2507_TEMPLATE, "thinking-2507": THINKING_2507_TEMPLATE}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
REPO = Path(__file__).resolve().parent.parent


def corpus() -> list[str]:
    texts = [line for path in sorted((REPO / "example-data").glob("*.txt")) for line in path.read_text().splitlines()]
    texts += (REPO / "prompts").joinpath("language_identification.md").read_text().splitlines()
    return texts or ["hello world"]


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE with the Qwen3 special tokens and chat template, trained on our own text in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def build_tiny_qwen3(output_dir: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def with_template(model_dir: Path, kind: str, output_dir: Path) -> Path:
    """A copy of a tiny model's dir whose chat template behaves like a recipe's model (TEMPLATES[kind])."""
    import shutil

    from transformers import AutoTokenizer

    if not output_dir.exists():
        shutil.copytree(model_dir, output_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = TEMPLATES[kind]
        tokenizer.save_pretrained(output_dir)
    return output_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_qwen3(Path(sys.argv[1])))
