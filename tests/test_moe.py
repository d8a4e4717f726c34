"""MoE students: in transformers 5 the Qwen3-MoE experts are fused parameters, not nn.Linear modules. With PEFT 0.21
`all-linear` still reaches them (PEFT maps them onto target_parameters), which only works with lora_dropout 0;
an explicit attention list leaves them frozen. Checked on a tiny random Qwen3-MoE through the training CLI."""

import json

import pytest
from safetensors import safe_open

from tests.conftest import run_main


@pytest.fixture(scope="module")
def tiny_moe(tiny_model, tmp_path_factory):
    from tests.tiny_model import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("moe") / "tiny-qwen3-moe", tiny_model)


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
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q_proj], base[q_proj])

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


# ---- serving an MoE student: the fingerprint check on each path (distill/fingerprint.py) -------------------------


@pytest.fixture(scope="module")
def moe_student(tiny_moe, example_rows, tmp_path_factory):
    """2 steps of recipes/cpu.yaml on the tiny MoE: LoRA on attention and on the fused experts (target_parameters)."""
    from tests.conftest import write_teacher_file

    work = tmp_path_factory.mktemp("moe-student")
    data = write_teacher_file(work / "teacher.jsonl", example_rows)
    run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_moe,
             "--dataset_name", data, "--max_steps", "2", "--report_to", "none", "--output_dir", work / "run")
    return work / "run"


def evaluate_moe(adapter, output, **serve_overrides):
    """evaluate.py on 4 held-out rows; serve_overrides replace serving.serve's gpu / merge_lora decision."""
    from unittest import mock

    from distill import serving
    from tests.conftest import EXAMPLE_DATA

    real = serving.serve

    def serve(path, base, merge, gpu):
        return real(path, base, serve_overrides.get("merge", merge), serve_overrides.get("gpu", gpu))

    with mock.patch.object(serving, "serve", serve):
        return run_main("evaluate.py", "--model_path", adapter, "--test_file", EXAMPLE_DATA, "--max_samples", 4,
                        "--latency_requests", 0, "--no-lingua", "--quiet", "--output_file", output, check=False)


@pytest.mark.slow
def test_the_merged_moe_student_passes_its_fingerprint(moe_student, tmp_path, shared_engines):
    config = json.loads((moe_student / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"gate_up_proj", "down_proj"}
    result = evaluate_moe(moe_student, tmp_path / "merged.json")
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "merged.json").read_text())["fingerprint"]
    assert check["status"] == "passed" and check["max_abs_diff"] < check["tolerance"] / 100
    print(f"MoE merged, fp32 on CPU: largest difference {check['max_abs_diff']:.3g}, noise floor "
          f"{check['noise_floor']:.3g}, tolerance {check['tolerance']:.3g}, adapter effect "
          f"{check['adapter_effect']:.3g}")


@pytest.mark.slow
def test_vllm_0_32_on_cpu_cannot_serve_lora_on_fused_experts(moe_student, tmp_path, shared_engines):
    """What vLLM 0.32's CPU build does with PEFT's fused-expert LoRA (docs/fingerprint.md): it refuses the 3D
    layout unless asked for it, and asked (as evaluate.py's GPU path asks) its MoE LoRA kernel needs Triton, which the
    CPU build lacks. It never silently drops the experts' LoRA; this is why a CPU run merges. If a vLLM upgrade
    changes either, this test says so."""
    from distill import serving

    asked = evaluate_moe(moe_student, tmp_path / "lora.json", gpu=True)
    assert asked.returncode == 1 and not (tmp_path / "lora.json").exists()
    assert "triton" in asked.stderr.lower()
    served = serving.serve(moe_student, None, False, True)
    assert served.engine_overrides["enable_mixed_moe_lora_format"] and served.lora_request().is_3d_lora_weight

    from unittest import mock

    unasked = serving.Serving("vLLM LoRA without the 3D layout", {**served.engine_overrides,
                                                                  "enable_mixed_moe_lora_format": False},
                              lora_path=served.lora_path, config_source=served.config_source)
    with mock.patch.object(serving, "serve", lambda *args: unasked):
        refused = evaluate_moe(moe_student, tmp_path / "lora.json")
    assert refused.returncode == 1
    assert "contains fused 3D MoE weights" in refused.stderr and "enable_mixed_moe_lora_format" in refused.stderr
