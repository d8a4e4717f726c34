"""A randomly initialised Qwen3 small enough for every stage's tests: hidden 64, 2 layers, head_dim 32 (vLLM's CPU
attention kernels need head_dim in {32, 64, 80, ...}) and a ~1k-token byte-level BPE trained on the fly, so an SFT
step takes well under a second. It loads in vLLM, TRL and PEFT like any hub checkpoint.
"""

from pathlib import Path

# The turns as both Qwen3 templates with think blocks write them: the last assistant turn carries its (here empty)
# reasoning, the others none.
_TURNS_LAST_WITH_THINK = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
# The Qwen3 chat template, trimmed of tools: with enable_thinking=False the generation prompt closes an empty think
# block, and the last assistant turn carries one too, as the real hybrid Qwen3 templates do.
QWEN3_TEMPLATE = (
    _TURNS_LAST_WITH_THINK
    + "{%- if add_generation_prompt %}"
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
    _TURNS_LAST_WITH_THINK
    + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
TEMPLATES = {"hybrid": QWEN3_TEMPLATE, "instruct-2507": INSTRUCT_2507_TEMPLATE, "thinking-2507": THINKING_2507_TEMPLATE}
# How each template kind's input ends where the model writes its final answer (a generation prompt in the
# final-answer state; a Thinking-2507 input has its think block closed), SmolLM2's included.
FINAL_ANSWER_TAIL = {"smollm2": "<|im_start|>assistant\n", "instruct-2507": "<|im_start|>assistant\n",
                     "thinking-2507": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
                     "hybrid": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}
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


def build_tiny_qwen3_moe(output_dir: Path, tokenizer_dir: Path) -> Path:
    """A random Qwen3-MoE (4 experts, 2 per token) with the tiny tokenizer: the 30B-A3B student's architecture."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def build_tiny_smollm2(output_dir: Path, seed: int = 0) -> Path:
    """A random Llama of the tiny size with the embedded model's own tokenizer and chat template (SmolLM2's: a
    default system prompt, no think block): the CPU recipes' model, at a size a test trains in a second."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    source = REPO / "models" / "SmolLM2-135M-Instruct"
    real = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=real.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=real.bos_token_id, eos_token_id=real.eos_token_id,
                         pad_token_id=real.pad_token_id, dtype="float32")
    LlamaForCausalLM(config).save_pretrained(output_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, output_dir / name)
    return output_dir


def with_template(model_dir: Path, kind: str, output_dir: Path, max_positions: int | None = None) -> Path:
    """A copy of a tiny model's dir whose chat template behaves like a recipe's model (TEMPLATES[kind]); optionally
    a longer context (the weights do not change: RoPE has no position table)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    if not output_dir.exists():
        shutil.copytree(model_dir, output_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = TEMPLATES[kind]
        tokenizer.save_pretrained(output_dir)
        if max_positions:
            config = json.loads((output_dir / "config.json").read_text())
            (output_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": max_positions}))
    return output_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_qwen3(Path(sys.argv[1])))
