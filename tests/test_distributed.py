"""Stage 2 across processes, on CPU: what multi-GPU training saves and who writes it.

Two launches prove the two halves:
- `accelerate launch --num_processes 2` of the real CLI with the FSDP recipe config. accelerate runs FSDP only on
  accelerators, so on CPU this is DDP over gloo (MULTI_CPU); it proves the global batch, rank-0-only writes and the
  `finished` check on two processes.
- torchrun of tests/fsdp_save_worker.py: FSDP2 `fully_shard` over gloo, which torch does allow on CPU, with the
  adapter gathered by distill.checkpoint.save_gathered: the code path multi-GPU training takes at its end.
"""

import json
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

ACCELERATE_CPU = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A port for the launch's rendezvous: the default 29500 may be taken by a test in the other pytest worker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp_gathered_adapter_equals_the_unsharded_one_and_loads(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    result = run_cli(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2,
                     "--master_port", free_port(), REPO / "tests" / "fsdp_save_worker.py", tiny_model, out, timeout=300)
    assert "sharded across 2 ranks" in result.stdout
    saved, reference = load_file(out / "adapter_model.safetensors"), load_file(out / "reference.safetensors")
    assert len(saved) == len(reference) > 0
    for name, tensor in reference.items():
        assert torch.equal(saved[name.replace(".default.", ".")], tensor), name

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, before), "the adapter changed nothing"
    assert_fingerprint_is_the_saved_adapters(out, merged, "float32", 1e-5)


def assert_fingerprint_is_the_saved_adapters(out, model, dtype, abs_tolerance):
    """fingerprint.json, scored by the (sharded) model on every rank and written by rank 0, holds the
    log-probabilities the saved adapter gives when loaded in one process, within the precision it was scored in."""
    from transformers import AutoModelForCausalLM

    from distill.fingerprint import answer_logprobs

    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["dtype"] == dtype and fingerprint["probes"]
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"], dtype=torch.float32).eval()
    model.eval()
    for probe in fingerprint["probes"]:
        expected = answer_logprobs(model, probe["input_ids"], probe["answer_start"], "cpu")
        assert probe["logprobs"] == pytest.approx(expected, abs=abs_tolerance)
        # scored again with the adapter off: the base's own log-probabilities
        expected = answer_logprobs(base, probe["input_ids"], probe["answer_start"], "cpu")
        assert probe["base_logprobs"] == pytest.approx(expected, abs=abs_tolerance)


@pytest.mark.slow
def test_two_process_launch_saves_one_adapter_with_the_recipe_batch(tiny_model, gold_teacher_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = run_cli("bash", "train_trl.sh", "--model_name_or_path", tiny_model, "--max_steps", 2,
                     "--report_to", "none", "--output_dir", out, "--global_batch_size", 16,
                     "--per_device_train_batch_size", 4, "--save_strategy", "no",
                     env={**ACCELERATE_CPU, "NUM_GPUS": "2", "MASTER_PORT": str(free_port()),
                          "RECIPE": "recipes/cpu.yaml",
                          "DATA": str(gold_teacher_file), "PYTHON": sys.executable}, timeout=600)
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished"
    # 16 rows per step = 4 per micro-batch x 2 accumulation steps x 2 processes; the run name says 16
    assert record["counts"]["batch"] == {"world_size": 2, "micro_batch": 4, "gradient_accumulation_steps": 2,
                                         "global_batch": 16, "mean_row_tokens": record["counts"]["batch"][
                                             "mean_row_tokens"]}
    assert record["args"]["training"]["gradient_accumulation_steps"] == 2
    assert "-bs16" in record["args"]["training"]["run_name"]
    assert record["saved"]["adapter_tensors"] > 0 and record["saved"]["max_abs_lora_b"] > 0
    assert result.stdout.count("train: done") == 1, "only rank 0 reports and writes"
    leftovers = [path.name for path in out.iterdir()
                 if path.name.endswith(".tmp") or path.name.startswith("checkpoint")]
    assert not leftovers
    assert len(list(tmp_path.rglob("adapter_config.json"))) == 1

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert not torch.allclose(merged.model.layers[0].mlp.down_proj.weight, before), "training moved the adapter"
    assert record["fingerprint"]["probes"] == 16 and record["fingerprint"]["greedy_probes"] == 8  # + training answers
    # accelerate's bf16 mixed precision (recipes/accelerate_fsdp.yaml) scored it: labelled bf16, a bf16 error apart
    assert_fingerprint_is_the_saved_adapters(out, merged, "bfloat16", 5e-3)
