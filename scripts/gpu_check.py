"""The GPU recipe end to end on random-init models of the real Qwen3 shapes, for any CUDA machine, offline.

    PYTHON=python3 bash scripts/gpu_check.sh          # or: python3 scripts/gpu_check.py --work_dir /tmp/gpu-check

Needs torch with CUDA, transformers, trl, peft, accelerate and datasets (vllm for the last step); no hub, no pytest,
no embedded model, and it installs nothing (docs/gpu-check.md, "offline"). Each step runs in its own process
group with a time limit, in dependency order, and reports PASS, FAIL or SKIP; a failure prints the tail of its
stderr and the step's log files, and the steps that need it are skipped, not run into the same wall.

Steps, with an estimate of their seconds on one H100 (not measured yet) and their limit:
  step                                    H100 est.  limit  what it proves
  environment                                   8     90  torch sees CUDA; the versions that will run
  rows                                          6    120  language-ID train rows sized to ~88 tokens under the
                                                          check's tokenizer, so tinker.yaml picks 64 x 2
  plan: 4B on 1 x 80 GiB                        8    120  the memory plans, for 80 GiB GPUs whatever this one is,
  plan: 30B-A3B on 1 x 80 GiB (no fit)          8    120    from the stored configs (no hub); "fits" and "DOES NOT
  plan: 30B-A3B, FSDP on 8 x 80 GiB             8    120    FIT" read from the plan's output, not the exit code
  build 4B                                     35    240  a random Qwen3-4B-Instruct-2507 (bf16) saved to disk
  4B, 1 GPU: recipes/tinker.yaml               50    300  micro-batch 64 x 2, padding-free: tokens/s, peak memory
  4B, 1 GPU: the old recipe                    60    300  8 x 16, checkpointing, padded; the same rows per step
  merge 4B adapter                             25    180  the adapter loads and merges on the GPU (bf16)
  4B on-policy, opd_4b_server.yaml's settings  40    240  2 steps x 8 rollouts with the recipe's gradient
                                                          checkpointing and bf16, the self-teacher reading the
                                                          2,300-token prompt through its KV cache; passes only if
                                                          the run proved its teacher read the prompt (the cache held
                                                          the prefix, the first step's log-probabilities moved with
                                                          the prompt; distill/onpolicy.py)
  4B on-policy, opd_4b_server.yaml as written  90    420  the vLLM teacher server and colocated vLLM sampling (SKIP
                                                          without vllm: proven on CPU only, tests/test_recipes.py)
  build 30B-A3B (--moe_layers layers)          35    240  Qwen3-30B-A3B-Instruct-2507's config cut to 4 layers
  30B-A3B cut, FSDP on every GPU               75    360  tinker_30b_fsdp.yaml under accelerate + FSDP2
  merge 30B-A3B adapter                        30    180  attention and expert weights change, the router does not
  vLLM serves the 4B adapter with LoRA        60    300  evaluate.py through vLLM's LoRA path (SKIP without vllm);
                                                          every serving step passes only if the served model
                                                          reproduces the adapter's fingerprint.json
  vLLM serves the 4B adapter merged           60    300  --merge_lora: merged on the GPU in bf16, then served
  vLLM serves the 30B-A3B cut with LoRA       50    300  PEFT's fused-expert LoRA through vLLM 0.32 (3D layout):
                                                          the fingerprint says whether vLLM applies it
  vLLM serves the 30B-A3B cut merged          60    300  --merge_lora on the MoE
                                              708 s (11.8 min) in all; --budget_s (720 s) caps a slow run
How estimated: ~8 s of imports per process; 8 GB of 4B weights (6 GB for the cut MoE) written or read at ~1-2 GB/s;
a step of 128 rows x ~88 tokens = 11k tokens at the H100's measured 6,888 tokens/s (tinker.yaml, 3 steps) and
787 tokens/s (old recipe, 2 steps, ~15 s each); vLLM's engine start in eager mode ~30 s.

Single-GPU steps see only the first GPU (CUDA_VISIBLE_DEVICES); the FSDP step uses every visible one. The exit code
is 0 when every step passed, 1 when one failed (a timeout is a failure), 3 when none failed but one was skipped:
a skipped step proved nothing, and the summary says so. Tokenizers are a small BPE trained on our own text
(tests/tiny_model.py), so rows are padded by repeating their text; random weights prove code paths, memory and
speed, not quality.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STUDENT_4B, STUDENT_30B = "Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-30B-A3B-Instruct-2507"
# The recipe the H100 measured at 787 tokens/s (issue 9), kept here as the speed baseline.
OLD_RECIPE = ["--per_device_train_batch_size", "8", "--global_batch_size", "128", "--micro_batch_tokens", "0",
              "--gradient_checkpointing", "true", "--padding_free", "false", "--max_length", "2048"]
PLAN_GPU_GIB = "80"  # the recipes are written for 80 GiB H100s: an H200 would make the 30B "fit" one GPU
# Rows are padded (their text repeated) to at least this many tokens: the ~75 the Qwen tokenizer gives the language-ID
# rows, where the H100 figures were measured. The mean comes out at ~88, so micro_batch_tokens 8192 picks 64 rows.
MIN_ROW_TOKENS = 75
TOKENIZER_VOCAB = 4096
EXPECTED_MICRO_BATCH = 64  # tinker.yaml on 1 GPU, as on the H100
STDERR_TAIL_LINES = 25
SKIP_EXIT = 3


# ---- the step runner: process groups, time limits, PASS / FAIL / SKIP ---------------------------------------------


class StepFailed(Exception):
    """A step ran but what it produced is wrong."""


@dataclass
class Finished:
    returncode: int | None  # None: killed at its time limit
    stdout: str
    stderr: str
    seconds: float
    logs: str = ""  # where the full output is


@dataclass
class Step:
    name: str
    command: Callable[[dict], list[str]]  # state -> argv, built when the step starts (after what it needs ran)
    estimate_s: int  # on one H100, for the README and the budget
    limit_s: int
    check: Callable[[Finished, dict], str] = lambda finished, state: "ok"  # -> detail, or raises StepFailed
    needs: tuple = ()
    expect_exit: int = 0
    one_gpu: bool = True  # pinned to the first GPU; False: sees every GPU (FSDP, the environment step)
    skip: Callable[[], str | None] = lambda: None  # a reason not to run, decided when the step's turn comes


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float = 0.0


def run_command(command: list[str], limit_s: float, env: dict, log_stem: Path) -> Finished:
    """Runs command in a new process group with stdout and stderr in log files. At the limit the whole group gets
    SIGTERM, then SIGKILL: a hung torchrun or engine start takes its children with it. The group is also ended once
    the command exits, so no stray worker holds GPU memory into the next step."""
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    started, returncode = time.monotonic(), None
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # a timeout, Ctrl-C, or a clean exit that left children behind
            end_group(process, grace_s=2 if returncode is not None else 10)
    return Finished(returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                    time.monotonic() - started, f"{out_path} {err_path}")


def end_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to every process of the group (its id is the leader's pid), SIGKILL to any left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            time.sleep(0.1)
            process.poll()  # reaps the leader, which would otherwise linger as a member of its group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
    process.wait()


def run_check(steps: list[Step], runner: Callable[[Step, float, dict], Finished], budget_s: float, state: dict,
              print_line=print) -> list[Result]:
    """Each step in order: SKIP if a step it needs did not pass, if it has a reason to skip or if the budget is spent;
    else run it with the smaller of its limit and what is left of the budget, and judge it. `state` carries what
    steps learn (the work dir, the GPU count, run figures) to the steps after them."""
    results, started = [], time.monotonic()
    for number, step in enumerate(steps):
        left = budget_s - (time.monotonic() - started)
        blocked = [result for result in results if result.name in step.needs and result.status != "PASS"]
        reason = (f"needs '{blocked[0].name}', which did not pass ({blocked[0].status})" if blocked else
                  step.skip() or (f"not run: the {budget_s:.0f} s budget is spent" if left < 5 else None))
        if reason:
            results.append(Result(step.name, "SKIP", reason))
            print_line(f"[SKIP] {step.name}: {reason}")
            continue
        print_line(f"[....] {step.name} (limit {min(step.limit_s, left):.0f} s, estimate {step.estimate_s} s)")
        try:
            finished = runner(step, min(step.limit_s, left), state)
        except KeyboardInterrupt:
            results.append(Result(step.name, "FAIL", "interrupted (Ctrl-C)"))
            results += [Result(later.name, "SKIP", "not run: interrupted") for later in steps[number + 1:]]
            return results
        except OSError as error:  # the command could not start (no such python, ...)
            finished = Finished(127, "", f"{type(error).__name__}: {error}", 0.0)
        results.append(judge(step, finished, state))
        result = results[-1]
        print_line(f"[{result.status}] {step.name} ({result.seconds:.0f} s): {result.detail}")
        if result.status == "FAIL":
            tail = finished.stderr.strip().splitlines()[-STDERR_TAIL_LINES:]
            print_line("\n".join(f"    | {line}" for line in tail) or "    | (stderr empty)")
            print_line(f"    logs: {finished.logs or '-'}")
    return results


def judge(step: Step, finished: Finished, state: dict) -> Result:
    if finished.returncode is None:
        return Result(step.name, "FAIL", f"timed out after {finished.seconds:.0f} s; its process group was killed",
                      finished.seconds)
    last = next((line.strip()[-300:] for line in reversed(finished.stderr.splitlines()) if line.strip()), "")
    if finished.returncode != step.expect_exit:
        return Result(step.name, "FAIL", f"exit {finished.returncode} (expected {step.expect_exit}): {last}",
                      finished.seconds)
    try:
        return Result(step.name, "PASS", step.check(finished, state), finished.seconds)
    except Exception as error:  # what the step wrote is missing or wrong; the check goes on to the next step
        return Result(step.name, "FAIL", f"{type(error).__name__}: {error}" + (f" (stderr: {last})" if last else ""),
                      finished.seconds)


def summary(results: list[Result]) -> tuple[str, int]:
    """The summary and the exit code: 1 if any step failed, else 3 if any was skipped, else 0."""
    counts = {status: sum(result.status == status for result in results) for status in ("PASS", "FAIL", "SKIP")}
    lines = [f"gpu_check {time.strftime('%Y-%m-%d %H:%M')}: {counts['PASS']} passed, {counts['FAIL']} failed, "
             f"{counts['SKIP']} skipped of {len(results)} steps in {sum(r.seconds for r in results):.0f} s"]
    lines += [f"  {result.status}  {result.name}: {result.detail}" for result in results]
    skipped = [result.name for result in results if result.status == "SKIP"]
    if skipped:
        lines.append(f"NOT PROVEN (skipped): {'; '.join(skipped)}")
    code = 1 if counts["FAIL"] else SKIP_EXIT if skipped else 0
    lines.append(f"gpu_check: exit {code} ({'failed' if code == 1 else 'incomplete' if code else 'all passed'})")
    return "\n".join(lines), code


# ---- the steps -------------------------------------------------------------------------------------------------


def last_json(text: str) -> dict:
    """The RESULT line a helper prints last."""
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise StepFailed("no RESULT line in the step's output")
    return json.loads(lines[-1].removeprefix("RESULT "))


def plan_step(name: str, recipe: str, gpus: int, must_fit: bool) -> Step:
    def check(finished: Finished, state: dict) -> str:
        verdicts = [line for line in finished.stdout.splitlines() if "GiB per GPU" in line]
        if not verdicts:
            raise StepFailed("the plan printed no 'GiB per GPU' line")
        fits = verdicts[-1].endswith("-> fits")
        if fits != must_fit or not (fits or verdicts[-1].endswith("-> DOES NOT FIT")):
            raise StepFailed(f"expected {'fits' if must_fit else 'DOES NOT FIT'}; the plan: {verdicts[-1].strip()}")
        layout, figures = verdicts[-1].split("GiB per GPU ")[1].split(": ", 1)
        total, verdict = figures.rpartition(" | ")[2].removeprefix("total ").split(" -> ")
        return f"{total} GiB per GPU -> {verdict} {layout}"

    return Step(name, lambda state: [sys.executable, "train_sft_trl.py", "--config", recipe, "--plan_only",
                                     "--plan_gpus", str(gpus), "--plan_gpu_gb", PLAN_GPU_GIB],
                estimate_s=8, limit_s=120, check=check, expect_exit=0 if must_fit else 1, one_gpu=True)


def train_step(name: str, model: str, output: str, recipe: str, flags: list[str], needs: tuple, estimate_s: int,
               limit_s: int, steps: int, fsdp: bool = False, expected_micro_batch: int | None = None) -> Step:
    def command(state: dict) -> list[str]:
        work = state["work"]
        args = ["train_sft_trl.py", "--config", recipe, "--model_name_or_path", str(work / model), "--dataset_name",
                str(work / "teacher.jsonl"), "--max_steps", str(steps), "--report_to", "none", "--save_strategy",
                "no", "--output_dir", str(work / output), "--overwrite", "--logging_steps", "1", *flags]
        if not fsdp:
            return [sys.executable, *args]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_fsdp.yaml",
                "--num_processes", str(state["gpus"]), *args]

    def check(finished: Finished, state: dict) -> str:
        run = read_run(state["work"] / output)
        state[output] = run
        batch = run["batch"]
        if expected_micro_batch and batch["micro_batch"] != expected_micro_batch:
            raise StepFailed(f"micro-batch {batch['micro_batch']}, expected {expected_micro_batch} (mean row "
                             f"{batch['mean_row_tokens']} tokens)")
        detail = (f"{run['tokens_per_second']} tokens/s, peak {run['peak_gib']} GiB, batch {batch['micro_batch']} x "
                  f"{batch['gradient_accumulation_steps']} x {batch['world_size']} (mean row "
                  f"{batch['mean_row_tokens']} tokens), losses {run['losses']}")
        baseline = state.get("run-4b-tinker")
        if output == "run-4b-old" and baseline:
            detail += (f"; tinker.yaml is {baseline['tokens_per_second'] / run['tokens_per_second']:.1f}x faster "
                       f"(H100: 6,888 vs 787 tokens/s, 8.8x), losses {baseline['losses']}")
        return detail

    return Step(name, command, estimate_s, limit_s, check, needs, one_gpu=not fsdp)


OPD_RECIPE = "recipes/opd_4b_server.yaml"


def opd_argv(work: Path, output: str, *extra: str) -> list[str]:
    """Stage 2b on the 4B shape with OPD_RECIPE, its sizes cut to 2 optimizer steps of 8 rollouts of 32 tokens."""
    return [sys.executable, "train_opd_trl.py", "--config", OPD_RECIPE, "--model_name_or_path",
            str(work / "qwen3-4b-random"), "--dataset_name", str(work / "teacher.jsonl"), "--prompt_file",
            "prompts/language_identification.md", *extra, "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "32", "--report_to", "none",
            "--output_dir", str(work / output), "--overwrite"]


def opd_check(output: str):
    """What a stage-2b run must show, read from its record: finished, with the recipe's gradient checkpointing, finite
    losses from a first loss clearly above zero (a fresh adapter: the distance to the prompted teacher), and the
    run's own proofs that its teacher read the prompt (distill/onpolicy.py): the prompt's cache held the whole prefix
    (an in-process teacher), the first step's log-probabilities moved with the prompt, the teacher's input held the
    prompt and the student's did not."""
    def check(finished: Finished, state: dict) -> str:
        import math

        record = json.loads((state["work"] / output / "distill_run.json").read_text())
        if record["status"] != "finished":
            raise StepFailed(f"run record says {record['status']}: {record.get('error')}")
        losses = [entry["loss"] for entry in record["log_history"] if "loss" in entry]
        if not losses or not all(math.isfinite(loss) for loss in losses) or losses[0] <= 1e-3:
            raise StepFailed(f"losses {losses}")
        if not record["args"]["training"]["gradient_checkpointing"]:
            raise StepFailed(f"gradient checkpointing is off; {OPD_RECIPE} turns it on")
        checks, rendering = record["teacher_checks"], record["rendering"]
        cache, effect = checks["prefix_cache"], checks["prompt_effect"]
        if (cache and not cache["passed"]) or not effect["passed"]:
            raise StepFailed(f"the teacher did not read its prompt: {checks}")
        if not rendering["teacher"]["holds_prompt"] or rendering["student"]["holds_prompt"]:
            raise StepFailed(f"rendered inputs: {rendering}")
        spend = record["teacher_spend"]
        cached = f"prompt cache {cache['cached_tokens']} of {cache['prefix_tokens']} tokens; " if cache else ""
        return (f"losses {[round(loss, 4) for loss in losses]}, {record['train_metrics']['train_runtime']:.1f} s, "
                f"peak {record.get('peak_gpu_memory_gib')} GiB; {cached}teacher log-prob with/without the prompt "
                f"{effect['teacher_logprob_with_prompt']:.3f}/{effect['teacher_logprob_without_prompt']:.3f} "
                f"(mean |difference| {effect['mean_abs_difference']:.3f}); teacher: {spend['prompt_prefix_tokens']} "
                f"prompt tokens once, {spend['query_and_answer_tokens']} query+answer tokens")

    return check


def opd_step(needs: tuple) -> Step:
    """Stage 2b on the 4B shape with the GPU recipe's settings (gradient checkpointing and bf16, as
    recipes/opd_4b_server.yaml), the teacher in this process: the student samples (transformers generate; colocated
    vLLM needs vllm), its own base reading the 2,300-token language-ID prompt grades every token through the prompt's
    KV cache; 2 optimizer steps of 8 rollouts."""
    def command(state: dict) -> list[str]:
        return opd_argv(state["work"], "run-4b-opd", "--use_vllm", "false")

    return Step("4B on-policy, 1 GPU: recipes/opd_4b_server.yaml's settings, self-teacher reading the prompt",
                command, 40, 240, opd_check("run-4b-opd"), needs, one_gpu=True)


def opd_server_step(needs: tuple, vllm_installed: bool) -> Step:
    """recipes/opd_4b_server.yaml as written: the teacher on a vLLM server (the 4B shape as its own teacher, on the
    same GPU), the student sampling with colocated vLLM. Needs vllm: without it, SKIP, and the server teacher and
    colocated sampling stay proven on CPU only (tests/test_recipes.py)."""
    def command(state: dict) -> list[str]:
        return [sys.executable, "scripts/gpu_check.py", "--work_dir", str(state["work"]), "--helper", "opd_server"]

    return Step("4B on-policy, 1 GPU: recipes/opd_4b_server.yaml as written (vLLM teacher server, colocated sampling)",
                command, 90, 420, opd_check("run-4b-opd-server"), needs, one_gpu=True,
                skip=lambda: None if vllm_installed else "vllm is not installed: the vLLM teacher server and colocated "
                                                         "sampling NOT PROVEN on this GPU")


def read_run(output: Path) -> dict:
    import math

    record = json.loads((output / "distill_run.json").read_text())
    if record["status"] != "finished":
        raise StepFailed(f"run record says {record['status']}: {record.get('error')}")
    losses = [entry["loss"] for entry in record["log_history"] if "loss" in entry]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        raise StepFailed(f"losses {losses}")
    tokens = [entry["num_tokens"] for entry in record["log_history"] if "num_tokens" in entry]
    return {"tokens_per_second": round(tokens[-1] / record["train_metrics"]["train_runtime"], 1) if tokens else None,
            "losses": [round(loss, 3) for loss in losses], "peak_gib": record.get("peak_gpu_memory_gib"),
            "batch": record["counts"]["batch"]}


def helper_step(name: str, helper: list[str], needs: tuple, estimate_s: int, limit_s: int, one_gpu: bool = True,
                remember: str | None = None) -> Step:
    def command(state: dict) -> list[str]:
        return [sys.executable, __file__, "--work_dir", str(state["work"]), "--helper", *helper]

    def check(finished: Finished, state: dict) -> str:
        result = last_json(finished.stdout)
        if remember:
            state.update(result.get(remember, {}))
        return result["detail"]

    return Step(name, command, estimate_s, limit_s, check, needs, one_gpu=one_gpu)


def build_steps(steps: int, old_steps: int, moe_layers: int, vllm_installed: bool) -> list[Step]:
    """The check's steps in dependency order: the new recipe before the old one, each model's merge after its run."""
    moe = f"qwen3-30b-a3b-{moe_layers}layers-random"
    basics = ("environment", "rows")

    return [
        helper_step("environment", ["environment"], (), 8, 90, one_gpu=False, remember="state"),
        helper_step("rows", ["rows"], (), 6, 120),
        plan_step("plan: 4B, tinker.yaml on 1 x 80 GiB", "recipes/tinker.yaml", 1, must_fit=True),
        plan_step("plan: 30B-A3B on 1 x 80 GiB (must not fit)", "recipes/tinker_30b_fsdp.yaml", 1, must_fit=False),
        plan_step("plan: 30B-A3B, tinker_30b_fsdp.yaml, FSDP on 8 x 80 GiB", "recipes/tinker_30b_fsdp.yaml", 8,
                  must_fit=True),
        helper_step("build 4B", ["build", STUDENT_4B, "qwen3-4b-random"], basics, 35, 240),
        train_step("4B, 1 GPU: recipes/tinker.yaml", "qwen3-4b-random", "run-4b-tinker", "recipes/tinker.yaml", [],
                   ("build 4B",), 50, 300, steps, expected_micro_batch=EXPECTED_MICRO_BATCH),
        train_step("4B, 1 GPU: the old recipe (8 x 16, checkpointing, padded)", "qwen3-4b-random", "run-4b-old",
                   "recipes/tinker.yaml", OLD_RECIPE, ("build 4B",), 60, 300, old_steps),
        helper_step("merge 4B adapter (bf16, GPU)", ["merge", "qwen3-4b-random", "run-4b-tinker"],
                    ("4B, 1 GPU: recipes/tinker.yaml",), 25, 180),
        opd_step(("build 4B", "rows")),
        opd_server_step(("build 4B", "rows"), vllm_installed),
        helper_step(f"build 30B-A3B cut to {moe_layers} layers", ["build", STUDENT_30B, moe, str(moe_layers)], basics,
                    35, 240),
        train_step("30B-A3B cut, FSDP on every GPU: recipes/tinker_30b_fsdp.yaml", moe, "run-30b-fsdp",
                   "recipes/tinker_30b_fsdp.yaml", [], (f"build 30B-A3B cut to {moe_layers} layers",), 75, 360, steps,
                   fsdp=True),
        helper_step("merge 30B-A3B adapter (bf16, GPU)", ["merge", moe, "run-30b-fsdp"],
                    ("30B-A3B cut, FSDP on every GPU: recipes/tinker_30b_fsdp.yaml",), 30, 180),
        serve_step("4B", "run-4b-tinker", merged=False, rows=32, estimate_s=60, vllm_installed=vllm_installed),
        serve_step("4B", "run-4b-tinker", merged=True, rows=8, estimate_s=60, vllm_installed=vllm_installed),
        serve_step("30B-A3B cut", "run-30b-fsdp", merged=False, rows=8, estimate_s=50, vllm_installed=vllm_installed),
        serve_step("30B-A3B cut", "run-30b-fsdp", merged=True, rows=8, estimate_s=60, vllm_installed=vllm_installed),
    ]


TRAINED_BY = {"run-4b-tinker": "4B, 1 GPU: recipes/tinker.yaml",
              "run-30b-fsdp": "30B-A3B cut, FSDP on every GPU: recipes/tinker_30b_fsdp.yaml"}


def serve_step(shape: str, run: str, merged: bool, rows: int, estimate_s: int, vllm_installed: bool) -> Step:
    """evaluate.py serving a trained adapter through vLLM's LoRA path or merged (--merge_lora): it passes only when
    the served model reproduces the adapter's fingerprint (distill/fingerprint.py), whose figures the detail gives.
    For the MoE that is the open question: does vLLM 0.32 apply PEFT's fused-expert LoRA on a GPU?"""
    path = "merged" if merged else "lora"
    output = f"eval-{run}-{path}.json"

    def command(state: dict) -> list[str]:
        return [sys.executable, "evaluate.py", "--model_path", str(state["work"] / run), "--max_samples", str(rows),
                "--output_file", str(state["work"] / output), "--no_lingua", "--quiet", "--latency_requests", "2",
                "--report_to", "none", "--gpu_memory_utilization", "0.5", *(["--merge_lora"] if merged else []),
                "--allow_inconclusive",  # an inconclusive fingerprint still has figures: the detail says INCONCLUSIVE
                "--enforce-eager"]  # eager: torch.compile and graph capture would cost a minute here and prove no more

    def check(finished: Finished, state: dict) -> str:
        result = json.loads((state["work"] / output).read_text())
        served_as = "merged" if merged else "LoRA"
        if result["n"] != rows or served_as not in result["serving"]:
            raise StepFailed(f"{result['n']} rows served by {result['serving']}, expected {rows} ({served_as})")
        check = result["fingerprint"]
        if check["status"] != "passed":
            raise StepFailed(f"fingerprint {check['status']}: the run left no fingerprint.json")
        # A few steps on random weights may move the probes less than the tolerance: then a dropped adapter would
        # pass too, and the detail says the check proved nothing about this path.
        effect = (f"the adapter moves them by up to {check['adapter_effect']:.3g}"
                  + ("" if check["conclusive"] else " (INCONCLUSIVE: within the tolerance)"))
        return (f"{result['serving']}; fingerprint: largest log-probability difference {check['max_abs_diff']:.3g} "
                f"(mean {check['mean_abs_diff']:.3g}, tolerance {check['tolerance']:g}) over {check['answer_tokens']} "
                f"tokens, {effect}; {result['n']} rows, parse rate {result.get('parse_rate')}")

    how = "merged (evaluate.py --merge_lora)" if merged else "with LoRA (evaluate.py)"
    return Step(f"vLLM serves the {shape} adapter {how}", command, estimate_s, 300, check, (TRAINED_BY[run],),
                skip=lambda: None if vllm_installed else f"vllm is not installed: vLLM serving ({path}) NOT PROVEN")


def device_runner(work: Path, first_gpu: str) -> Callable[[Step, float, dict], Finished]:
    """Runs a step's command for real: one GPU (the first visible) unless the step uses them all, logs in work/logs."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def run(step: Step, limit_s: float, state: dict) -> Finished:
        stem = logs / "".join(c if c.isalnum() else "-" for c in step.name.lower()).strip("-")[:60]
        # TRL loads a model with device_map="auto", which spreads it over every GPU it sees.
        step_env = {**env, "CUDA_VISIBLE_DEVICES": first_gpu} if step.one_gpu else env
        return run_command(step.command(state), limit_s, step_env, stem)

    return run


# ---- helpers: the steps that are Python of our own, each run in a process of its own -----------------------------


def helper_environment(work: Path) -> dict:
    import torch

    versions = {}
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "vllm"):  # read, not imported
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    missing = [name for name, version in versions.items() if version == "absent" and name != "vllm"]
    if missing:
        raise SystemExit(f"gpu_check: {sys.executable} lacks {', '.join(missing)}: `make setup`, or carry the wheels "
                         f"and set PYTHONPATH (docs/gpu-check.md, 'The GPU check, offline')")
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
    gpus = torch.cuda.device_count()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    detail = (f"{gpus} x {torch.cuda.get_device_name(0)} ({memory:.0f} GiB), python {sys.version.split()[0]}, torch "
              f"{torch.__version__}, " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    return {"detail": detail, "state": {"gpus": gpus}, "versions": versions}


def helper_rows(work: Path) -> dict:
    """The check's tokenizer (saved for the students) and its training rows: the example data's rows with their
    text repeated up to MIN_ROW_TOKENS tokens, and what tinker.yaml's micro_batch_tokens makes of them."""
    from distill.defaults import HELDOUT_FRACTION, SPLIT_SEED
    from distill.render import student_example
    from distill.training import micro_batch_for_tokens, training_rows
    from tests.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(TOKENIZER_VOCAB)
    tokenizer.save_pretrained(work / "tokenizer")
    rows = [json.loads(line) for line in (REPO / "example-data" / "language_id.jsonl").read_text().splitlines()]
    lengths = []
    with open(work / "teacher.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            query = row["text"]
            while len(student_example(tokenizer, query, row["label"])["input_ids"]) < MIN_ROW_TOKENS:
                query += " " + row["text"]
            out = {"id": row["id"], "group": row["group"], "label": row["label"],
                   "messages": [{"role": "user", "content": query}, {"role": "assistant", "content": row["label"]}]}
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
            lengths.append((row, len(student_example(tokenizer, query, row["label"])["input_ids"])))
    train_ids = {row["id"] for row in training_rows(rows, HELDOUT_FRACTION, SPLIT_SEED)[0]}
    train_lengths = [length for row, length in lengths if row["id"] in train_ids]
    mean = sum(train_lengths) / len(train_lengths)
    micro = micro_batch_for_tokens(128, mean, 8192)  # tinker.yaml: global batch 128, micro_batch_tokens 8192
    if micro != EXPECTED_MICRO_BATCH:
        raise SystemExit(f"gpu_check: rows average {mean:.1f} tokens, so tinker.yaml would pick {micro} rows per "
                         f"micro-batch, not the {EXPECTED_MICRO_BATCH} the H100 figures were measured with")
    return {"detail": f"{len(train_lengths)} train rows, mean {mean:.1f} tokens (min {min(train_lengths)}, max "
                      f"{max(train_lengths)}): tinker.yaml picks {micro} x {128 // micro}",
            "mean_row_tokens": mean, "micro_batch": micro, "train_rows": len(train_lengths)}


def helper_build(work: Path, name: str, folder: str, layers: str | None = None) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.plan import REFERENCE_CONFIGS

    path = work / folder
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    settings = {**REFERENCE_CONFIGS[name], **({"num_hidden_layers": int(layers)} if layers else {})}
    config = AutoConfig.for_model(**settings, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"detail": f"{name} shape{f', {layers} layers' if layers else ''}: {parameters / 1e9:.2f} B parameters, "
                      f"peak {peak:.1f} GiB -> {path}"}


def helper_merge(work: Path, base_folder: str, adapter_folder: str, device: str = "cuda") -> dict:
    """Loads the base in bf16 on the GPU, merges the adapter, and checks which weights moved: layer 0's attention
    always, an MoE's experts too, its router never (recipes leave it frozen). (device: "cpu" in a CPU test.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(work / base_folder, dtype=torch.bfloat16, device_map=device)
    layer = "model.layers.0."
    watched = {name: parameter.detach().clone() for name, parameter in base.named_parameters()
               if name in (f"{layer}self_attn.q_proj.weight", f"{layer}mlp.experts.gate_up_proj",
                           f"{layer}mlp.experts.down_proj", f"{layer}mlp.gate.weight")}
    merged = PeftModel.from_pretrained(base, work / adapter_folder).merge_and_unload()
    after = dict(merged.named_parameters())
    moved = {name: not torch.equal(after[name], before) for name, before in watched.items()}
    must_move = [name for name in moved if not name.endswith("mlp.gate.weight")]
    if not all(moved[name] for name in must_move) or any(moved[name] for name in moved if name not in must_move):
        raise SystemExit(f"gpu_check: after merging {adapter_folder}, changed: {moved} (the router must not)")
    if not all(torch.isfinite(after[name]).all() for name in watched):
        raise SystemExit(f"gpu_check: non-finite merged weights in {adapter_folder}")
    return {"detail": "changed: " + ", ".join(name.removeprefix(layer) for name in must_move)
                      + ("; router unchanged" if len(must_move) < len(moved) else "")}


def helper_opd_server(work: Path) -> dict:
    """Starts the 4B shape as the teacher on a vLLM server on this GPU (as the recipe starts it), runs stage 2b with
    recipes/opd_4b_server.yaml against it (sizes cut), and stops the server."""
    from distill.teacher_server import serving

    with serving([work / "qwen3-4b-random", "--max-logprobs", "1", "--gpu-memory-utilization", "0.35",
                  "--max-model-len", "8192", "--enforce-eager"], work / "logs" / "teacher-server.log") as url:
        subprocess.run(opd_argv(work, "run-4b-opd-server", "--teacher_server_url", url,
                                "--vllm_gpu_memory_utilization", "0.2"), check=True)
    return {"detail": "stage 2b against the teacher server"}


HELPERS = {"environment": helper_environment, "rows": helper_rows, "build": helper_build, "merge": helper_merge,
           "opd_server": helper_opd_server}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/gpu-check", help="models, runs and logs (about 16 GB)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each training run")
    parser.add_argument("--old_steps", type=int, default=2,
                        help="optimizer steps of the old recipe, whose steps take ~9x as long (~15 s on an H100)")
    parser.add_argument("--moe_layers", type=int, default=4, help="layers of the cut 30B-A3B student")
    parser.add_argument("--budget_s", type=float, default=720,
                        help="seconds for the whole check; steps that would start later are skipped")
    parser.add_argument("--helper", nargs="+", help=argparse.SUPPRESS)  # one step's own Python, in its own process
    return parser


def main():
    args = build_parser().parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.helper:
        print("RESULT " + json.dumps(HELPERS[args.helper[0]](work, *args.helper[1:])), flush=True)
        return
    first_gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    steps = build_steps(args.steps, args.old_steps, args.moe_layers, importlib.util.find_spec("vllm") is not None)
    print(f"gpu_check: {len(steps)} steps, ~{sum(step.estimate_s for step in steps)} s estimated on one H100, budget "
          f"{args.budget_s:.0f} s; work dir {work}; python {sys.executable}", flush=True)
    results = run_check(steps, device_runner(work, first_gpu), args.budget_s, {"work": work},
                        print_line=lambda line: print(line, flush=True))
    text, code = summary(results)
    print("\n" + text)
    (work / "summary.json").write_text(json.dumps([result.__dict__ for result in results], indent=1))
    sys.exit(code)


if __name__ == "__main__":
    main()
