"""MoE students: in transformers 5 the Qwen3-MoE experts are fused parameters, not nn.Linear modules. With PEFT 0.21
`all-linear` still reaches them (PEFT maps them onto target_parameters), which only works with lora_dropout 0;
an explicit attention list leaves them frozen. Checked on a tiny random Qwen3-MoE through the training CLI."""

import json

import pytest
from safetensors import safe_open

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny_moe(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("moe") / "tiny-qwen3-moe"
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def adapter_keys(run_dir):
    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as handle:
        return list(handle.keys())


@pytest.mark.slow
def test_all_linear_trains_experts_and_an_attention_list_does_not(tiny_moe, gold_teacher_file, tmp_path):
    common = ["--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_moe, "--dataset_name", gold_teacher_file,
              "--max_steps", "1", "--report_to", "none"]
    run_cli("train_sft_trl.py", *common, "--output_dir", tmp_path / "all-linear")
    config = json.loads((tmp_path / "all-linear" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {"gate_up_proj", "down_proj"} <= set(config["target_parameters"])
    assert any("mlp.experts" in key and "lora_B" in key for key in adapter_keys(tmp_path / "all-linear"))

    run_cli("train_sft_trl.py", *common, "--output_dir", tmp_path / "attention",
            "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj")
    assert not any("experts" in key for key in adapter_keys(tmp_path / "attention"))


@pytest.mark.slow
def test_fused_experts_refuse_dropout(tiny_moe, gold_teacher_file, tmp_path):
    result = run_cli("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_moe,
                     "--dataset_name", gold_teacher_file, "--max_steps", "1", "--report_to", "none",
                     "--output_dir", tmp_path / "run", "--lora_dropout", "0.05", check=False)
    assert result.returncode != 0 and "lora_dropout" in result.stderr
