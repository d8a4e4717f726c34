"""MoE students: in transformers 5 the Qwen3-MoE experts are fused parameters, not nn.Linear modules. With PEFT 0.21
`all-linear` still reaches them (PEFT maps them onto target_parameters), which only works with lora_dropout 0;
an explicit attention list leaves them frozen. Checked on a tiny random Qwen3-MoE through the training CLI."""

import json

import pytest
from safetensors import safe_open

from tests.conftest import run_main


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


def base_weights(model_dir) -> dict:
    """The base as transformers loads it (fused experts: the checkpoint on disk keeps one tensor per expert)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def merged_weights(model_dir, adapter_dir) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


@pytest.mark.slow
def test_all_linear_trains_experts_and_attention_but_not_the_router(tiny_moe, gold_teacher_file, tmp_path):
    import torch

    common = ["--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_moe, "--dataset_name", gold_teacher_file,
              "--max_steps", "2", "--report_to", "none"]
    run_main("train_sft_trl.py", *common, "--output_dir", tmp_path / "all-linear")
    config = json.loads((tmp_path / "all-linear" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(config["target_parameters"]) == {"gate_up_proj", "down_proj"}, "the router (gate.weight) stays out"
    record = json.loads((tmp_path / "all-linear" / "distill_run.json").read_text())
    assert record["memory_plan"]["trainable_parameters"]["router"] == 0
    assert record["memory_plan"]["trainable_parameters"]["experts"] > 0

    base = base_weights(tiny_moe)
    merged = merged_weights(tiny_moe, tmp_path / "all-linear")
    experts = [key for key in base if "mlp.experts" in key]
    routers = [key for key in base if key.endswith("mlp.gate.weight")]
    assert experts and routers
    assert all(not torch.allclose(merged[key], base[key]) for key in experts), "every expert tensor was trained"
    assert all(torch.equal(merged[key], base[key]) for key in routers), "the router is frozen by default"
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])

    run_main("train_sft_trl.py", *common, "--output_dir", tmp_path / "router", "--train_router")
    merged = merged_weights(tiny_moe, tmp_path / "router")
    assert any(not torch.allclose(merged[key], base[key]) for key in routers), "--train_router trains it"

    run_main("train_sft_trl.py", *common, "--output_dir", tmp_path / "attention",
             "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj")
    assert not any("experts" in key for key in adapter_keys(tmp_path / "attention"))


@pytest.mark.slow
def test_fused_experts_refuse_dropout(tiny_moe, gold_teacher_file, tmp_path):
    result = run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_moe,
                      "--dataset_name", gold_teacher_file, "--max_steps", "1", "--report_to", "none",
                      "--output_dir", tmp_path / "run", "--lora_dropout", "0.05", check=False)
    assert result.returncode != 0 and "lora_dropout" in result.stderr
