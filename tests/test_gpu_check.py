"""scripts/gpu_check.py on a CPU machine: its control flow with a fake step runner (a failure, a timeout and a skip
each reach the summary and the exit code), the real runner's time limit on a process group, the GPU pin, the rows
that make tinker.yaml pick the H100's 64 x 2 (with pytest unimportable, as on a lent GPU), the merge check on a tiny
MoE, and the memory-plan steps against the real CLI."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import CLI_ENV, REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
Finished = gpu_check.Finished

FITS = "memory plan: qwen3\n  GiB per GPU (1 x 80 GiB, no sharding): weights 7.5 | total 20.5 -> fits\n"
NO_FIT = "memory plan: qwen3_moe\n  GiB per GPU (1 x 80 GiB, no sharding): weights 56.9 | total 98.5 -> DOES NOT FIT\n"


def result_line(detail, **extra):
    return "RESULT " + json.dumps({"detail": detail, **extra}) + "\n"


def write_record(output, micro_batch, accumulation, world_size=1):
    output.mkdir(parents=True, exist_ok=True)
    record = {"status": "finished", "train_metrics": {"train_runtime": 2.0},
              "log_history": [{"loss": 12.1, "num_tokens": 11000}, {"loss": 11.9, "num_tokens": 22000}],
              "peak_gpu_memory_gib": 45.0, "counts": {"batch": {
                  "micro_batch": micro_batch, "gradient_accumulation_steps": accumulation, "world_size": world_size,
                  "mean_row_tokens": 88.5}}}
    (output / "distill_run.json").write_text(json.dumps(record))


def write_opd_record(output, server=False, **changes):
    """A stage-2b run record as train_opd_trl.py writes it, its teacher checks passed (or as `changes` say)."""
    output.mkdir(parents=True, exist_ok=True)
    record = {"status": "finished", "train_metrics": {"train_runtime": 9.0}, "peak_gpu_memory_gib": 30.0,
              "log_history": [{"loss": 0.4}, {"loss": 0.3}], "args": {"training": {"gradient_checkpointing": True}},
              "teacher_spend": {"prompt_prefix_tokens": 0 if server else 2300, "query_and_answer_tokens": 1400},
              "teacher_checks": {"prefix_cache": None if server else {"prefix_tokens": 2300, "cached_tokens": 2300,
                                                                      "passed": True},
                                 "prompt_effect": {"teacher_logprob_with_prompt": -1.2,
                                                   "teacher_logprob_without_prompt": -2.9,
                                                   "mean_abs_difference": 1.7, "passed": True}},
              "rendering": {"teacher": {"holds_prompt": True}, "student": {"holds_prompt": False}}}
    record.update(changes)
    (output / "distill_run.json").write_text(json.dumps(record))


class FakeRunner:
    """Answers each step by name with what its command would have left behind; records the calls."""

    def __init__(self, work, answers):
        self.work, self.answers, self.calls = work, answers, []

    def __call__(self, step, limit_s, state):
        self.calls.append((step.name, limit_s, step.one_gpu))
        answer = next((value for key, value in self.answers.items() if step.name.startswith(key)), None)
        return answer(self.work) if callable(answer) else answer or Finished(0, result_line("ok"), "", 1.0)


def passing_answers():
    def trained(output, micro, accumulation):
        def run(work):
            write_record(work / output, micro, accumulation)
            return Finished(0, "train: done", "", 20.0)
        return run

    def on_policy(work):
        for output in ("run-4b-opd", "run-4b-opd-server"):
            write_opd_record(work / output, server=output.endswith("server"))
        return Finished(0, "train: done", "", 40.0)

    def served(work):  # every serving step's results JSON, its fingerprint check passed
        fingerprint = {"status": "passed", "max_abs_diff": 0.06, "mean_abs_diff": 0.01, "tolerance": 1.0,
                       "answer_tokens": 24, "adapter_effect": 3.2, "conclusive": True}
        for run, rows in (("run-4b-tinker", 32), ("run-30b-fsdp", 8)):
            (work / f"eval-{run}-lora.json").write_text(json.dumps({
                "n": rows, "serving": "vLLM LoRA adapter on the base model (max_lora_rank 32)", "parse_rate": 0.0,
                "fingerprint": fingerprint}))
            (work / f"eval-{run}-merged.json").write_text(json.dumps({
                "n": 8, "serving": "adapter merged into the base, bfloat16 (--merge_lora)", "parse_rate": 0.0,
                "fingerprint": fingerprint}))
        return Finished(0, "", "", 30.0)

    return {
        "environment": Finished(0, result_line("1 x Fake GPU", state={"gpus": 1}), "", 2.0),
        "plan: 4B": Finished(0, FITS, "", 5.0),
        "plan: 30B-A3B on 1": Finished(1, NO_FIT, "the plan needs 98.5 GiB per GPU", 5.0),
        "plan: 30B-A3B, tinker_30b_fsdp.yaml": Finished(0, FITS.replace("1 x 80", "8 x 80"), "", 5.0),
        "4B, 1 GPU: recipes/tinker.yaml": trained("run-4b-tinker", 64, 2),
        "4B, 1 GPU: the old recipe": trained("run-4b-old", 8, 16),
        "30B-A3B cut, FSDP": trained("run-30b-fsdp", 32, 4),
        "4B on-policy": on_policy,
        "vLLM": served,
    }


def run(tmp_path, answers, vllm_installed=False, budget_s=600):
    lines = []
    steps = gpu_check.build_steps(3, 2, 4, vllm_installed)
    runner = FakeRunner(tmp_path, answers)
    results = gpu_check.run_check(steps, runner, budget_s, {"work": tmp_path}, print_line=lines.append)
    text, code = gpu_check.summary(results)
    return {result.name: result for result in results}, text, code, "\n".join(lines), runner


def test_every_step_passing_exits_0(tmp_path):
    results, text, code, _, runner = run(tmp_path, passing_answers(), vllm_installed=True)
    assert code == 0 and all(result.status == "PASS" for result in results.values()), text
    assert "18 passed, 0 failed, 0 skipped" in text and "NOT PROVEN" not in text
    assert ("largest log-probability difference 0.06 (mean 0.01, tolerance 1) over 24 tokens, the adapter moves them "
            "by up to 3.2;") in results["vLLM serves the 30B-A3B cut adapter with LoRA (evaluate.py)"].detail
    on_policy = results["4B on-policy, 1 GPU: recipes/opd_4b_server.yaml's settings, self-teacher reading the prompt"]
    assert "2300 prompt tokens once" in on_policy.detail and "prompt cache 2300 of 2300 tokens" in on_policy.detail
    assert "with/without the prompt -1.200/-2.900" in on_policy.detail
    old = results["4B, 1 GPU: the old recipe (8 x 16, checkpointing, padded)"].detail
    assert "batch 8 x 16 x 1" in old and "tinker.yaml is 1.0x faster" in old
    assert "-> fits" in results["plan: 4B, tinker.yaml on 1 x 80 GiB"].detail
    # only the environment and FSDP steps see every GPU
    assert {name for name, _, one_gpu in runner.calls if not one_gpu} == {
        "environment", "30B-A3B cut, FSDP on every GPU: recipes/tinker_30b_fsdp.yaml"}


def test_vllm_absent_is_a_skip_that_the_exit_code_and_summary_report(tmp_path):
    results, text, code, _, runner = run(tmp_path, passing_answers(), vllm_installed=False)
    vllm = results["vLLM serves the 4B adapter with LoRA (evaluate.py)"]
    assert vllm.status == "SKIP" and "NOT PROVEN" in vllm.detail
    assert code == gpu_check.SKIP_EXIT == 3
    assert "13 passed, 0 failed, 5 skipped" in text and "NOT PROVEN (skipped): 4B on-policy" in text
    server = results["4B on-policy, 1 GPU: recipes/opd_4b_server.yaml as written (vLLM teacher server, colocated "
                     "sampling)"]
    assert server.status == "SKIP" and "vLLM teacher server and colocated sampling NOT PROVEN" in server.detail
    assert "vLLM" not in " ".join(name for name, _, _ in runner.calls)  # a skipped step never runs


def test_a_failure_a_timeout_and_a_skip_each_reach_the_summary_and_exit_code(tmp_path):
    answers = passing_answers()
    # A crash of the must-not-fit plan exits 1 as "does not fit" does; only the plan's own line makes it a pass.
    answers["plan: 30B-A3B on 1"] = Finished(1, "", "Traceback (most recent call last):\nOSError: no config\n", 3.0)
    answers["build 4B"] = Finished(None, "", "loading shards...\n", 240.0)  # killed at its time limit
    results, text, code, printed, runner = run(tmp_path, answers, vllm_installed=False)
    assert code == 1
    crash = results["plan: 30B-A3B on 1 x 80 GiB (must not fit)"]
    assert crash.status == "FAIL" and "OSError: no config" in crash.detail
    assert "    | OSError: no config" in printed  # the stderr tail is shown at the failure
    timeout = results["build 4B"]
    assert timeout.status == "FAIL" and "timed out after 240 s" in timeout.detail
    for name in ("4B, 1 GPU: recipes/tinker.yaml", "merge 4B adapter (bf16, GPU)",
                 "4B on-policy, 1 GPU: recipes/opd_4b_server.yaml's settings, self-teacher reading the prompt",
                 "vLLM serves the 4B adapter with LoRA (evaluate.py)"):
        assert results[name].status == "SKIP"
    assert "needs 'build 4B', which did not pass (FAIL)" in results["4B, 1 GPU: recipes/tinker.yaml"].detail
    # the MoE steps do not need the 4B ones: they still ran and passed
    assert results["merge 30B-A3B adapter (bf16, GPU)"].status == "PASS"
    assert "7 passed, 2 failed, 9 skipped" in text and "gpu_check: exit 1 (failed)" in text
    for line in ("FAIL  plan: 30B-A3B on 1 x 80 GiB (must not fit)", "FAIL  build 4B: timed out",
                 "SKIP  vLLM serves the 4B adapter", "NOT PROVEN (skipped): 4B, 1 GPU: recipes/tinker.yaml"):
        assert line in text


def test_a_served_model_without_a_passed_fingerprint_fails(tmp_path):
    def unchecked(work):
        answers_served = passing_answers()["vLLM"](work)
        path = work / "eval-run-30b-fsdp-merged.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "fingerprint": {"status": "absent"}}))
        return answers_served

    answers = {"vLLM serves the 30B-A3B cut adapter merged": unchecked, **passing_answers()}  # the first match wins
    results, _, code, _, _ = run(tmp_path, answers, vllm_installed=True)
    failed = results["vLLM serves the 30B-A3B cut adapter merged (evaluate.py --merge_lora)"]
    assert failed.status == "FAIL" and "fingerprint absent" in failed.detail and code == 1


def test_a_plan_that_fits_where_it_must_not_fails(tmp_path):
    answers = passing_answers()
    answers["plan: 30B-A3B on 1"] = Finished(1, FITS, "", 3.0)  # exit 1 for another reason, yet the plan says fits
    results, _, code, _, _ = run(tmp_path, answers, vllm_installed=True)
    assert results["plan: 30B-A3B on 1 x 80 GiB (must not fit)"].status == "FAIL" and code == 1


def test_wrong_micro_batch_and_spent_budget(tmp_path):
    answers = passing_answers()
    answers["4B, 1 GPU: recipes/tinker.yaml"] = lambda work: (write_record(work / "run-4b-tinker", 128, 1),
                                                            Finished(0, "", "", 5.0))[1]
    results, _, code, _, _ = run(tmp_path, answers, vllm_installed=True)
    assert "micro-batch 128, expected 64" in results["4B, 1 GPU: recipes/tinker.yaml"].detail and code == 1
    results, text, code, _, runner = run(tmp_path, passing_answers(), vllm_installed=True, budget_s=0)
    assert not runner.calls and code == 3 and all(result.status == "SKIP" for result in results.values())
    assert results["environment"].detail == "not run: the 0 s budget is spent"


def test_real_runner_kills_the_whole_group_at_the_limit_and_pins_one_gpu(tmp_path):
    child = tmp_path / "child.pid"
    sleeper = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(120)']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    started = time.monotonic()
    finished = gpu_check.run_command([sys.executable, "-c", sleeper], 3, dict(os.environ), tmp_path / "sleep")
    assert finished.returncode is None and time.monotonic() - started < 30
    pid = int(child.read_text())
    try:
        state = open(f"/proc/{pid}/stat").read().split(") ")[1][0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the grandchild {pid} outlived its step ({state})"

    runner = gpu_check.device_runner(tmp_path, first_gpu="3")
    show = gpu_check.Step("show", lambda state: [sys.executable, "-c", "import os; print(os.environ.get("
                                                 "'CUDA_VISIBLE_DEVICES', 'all'))"], 1, 30)
    assert runner(show, 30, {}).stdout.strip() == "3"
    show.one_gpu = False
    assert runner(show, 30, {}).stdout.strip() == os.environ.get("CUDA_VISIBLE_DEVICES", "all")


def test_rows_make_tinker_yaml_pick_64_without_pytest(tmp_path):
    # A lent GPU has no pytest: the helper must not import it (tests/conftest.py does).
    code = ("import runpy, sys; sys.modules['pytest'] = None; sys.argv = ['gpu_check.py', '--work_dir', "
            f"{str(tmp_path)!r}, '--helper', 'rows']; runpy.run_path('scripts/gpu_check.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=CLI_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = gpu_check.last_json(result.stdout)
    assert rows["micro_batch"] == 64 and 64 < rows["mean_row_tokens"] <= 128 and rows["train_rows"] == 652
    assert "tinker.yaml picks 64 x 2" in rows["detail"]
    assert len((tmp_path / "teacher.jsonl").read_text().splitlines()) == 885
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_merge_helper_on_a_tiny_moe(tmp_path):
    """The merge step's check on CPU: PEFT's names for the fused experts and the router are the ones it watches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from distill.plan import without_router

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    lora = without_router(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                     init_lora_weights=False), config)  # random B: merging must move weights
    get_peft_model(Qwen3MoeForCausalLM(config), lora).save_pretrained(tmp_path / "adapter")
    detail = gpu_check.helper_merge(tmp_path, "moe", "adapter", device="cpu")["detail"]
    assert detail == ("changed: self_attn.q_proj.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj; "
                      "router unchanged")

    with_router = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(Qwen3MoeForCausalLM(config), with_router).save_pretrained(tmp_path / "router-adapter")
    with pytest.raises(SystemExit, match="the router must not"):
        gpu_check.helper_merge(tmp_path, "moe", "router-adapter", device="cpu")


@pytest.mark.slow
def test_plan_steps_pass_against_the_real_cli(tmp_path):
    """The three plan steps exactly as the GPU runs them, offline, from the stored configs (about a minute here)."""
    steps = [step for step in gpu_check.build_steps(3, 2, 4, False) if step.name.startswith("plan:")]
    lines = []
    results = gpu_check.run_check(steps, gpu_check.device_runner(tmp_path, "0"), 600, {"work": tmp_path},
                                  print_line=lines.append)
    assert [result.status for result in results] == ["PASS"] * 3, "\n".join(lines)
    assert [result.detail for result in results] == [
        "20.5 GiB per GPU -> fits (1 x 80 GiB, no sharding)", "98.5 GiB per GPU -> DOES NOT FIT (1 x 80 GiB, no "
        "sharding)", "25.4 GiB per GPU -> fits (8 x 80 GiB, FSDP full shard)"]


@pytest.mark.parametrize("changes, message", [
    ({"teacher_checks": {"prefix_cache": {"prefix_tokens": 2300, "cached_tokens": 0, "passed": False},
                         "prompt_effect": {"passed": True}}}, "did not read its prompt"),
    ({"args": {"training": {"gradient_checkpointing": False}}}, "gradient checkpointing is off"),
    ({"rendering": {"teacher": {"holds_prompt": False}, "student": {"holds_prompt": False}}}, "rendered inputs"),
    ({"log_history": [{"loss": 0.0}]}, "losses"),
])
def test_the_on_policy_step_fails_unless_the_run_proved_its_teacher_read_the_prompt(tmp_path, changes, message):
    step = gpu_check.opd_step(())
    write_opd_record(tmp_path / "run-4b-opd", **changes)
    with pytest.raises(gpu_check.StepFailed, match=message):
        step.check(Finished(0, "", "", 1.0), {"work": tmp_path})
