"""The GPU path end to end on random-init models of the real shapes, for any CUDA machine (make gpu-check).

Steps (each prints PASS or FAIL with its figures; the exit code is the number of failures):
  1. memory plans: the 4B student on 1 GPU, the 30B-A3B student on 1 GPU (must not fit) and FSDP on all GPUs
  2. build random-init students: Qwen3-4B-Instruct-2507's config; Qwen3-30B-A3B's config cut to --moe_layers layers
  3. 4B on 1 GPU: the old recipe (micro-batch 8 x 16, gradient checkpointing, padded) against recipes/tinker.yaml,
     the same rows per step: tokens/s, peak memory and the loss of each step side by side
  4. the 30B-A3B cut with FSDP (accelerate launch) on every visible GPU (1 process on a 1-GPU machine)
  5. each saved adapter loads and merges on the GPU (bf16)
  6. vLLM serves the 4B adapter through LoRA (evaluate.py), when vllm imports

No hub access is needed: tokenizers are a small BPE trained on our text (tests/tiny_model.py), so rows run longer in
tokens than with Qwen's tokenizer. Random weights prove code paths, memory and speed, not quality.

    python scripts/gpu_check.py --work_dir /tmp/gpu-check [--steps 5] [--moe_layers 4]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STUDENT_4B, STUDENT_30B = "Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-30B-A3B-Instruct-2507"
# The recipe the H100 measured at 787 tokens/s, kept here as the speed baseline.
OLD_RECIPE = ["--per_device_train_batch_size", "8", "--global_batch_size", "128", "--micro_batch_tokens", "0",
              "--gradient_checkpointing", "true", "--padding_free", "false", "--max_length", "2048"]
results = []


def step(name):
    def wrap(function):
        def run(*args):
            started = time.time()
            try:
                detail = function(*args)
                results.append((name, "PASS", detail))
            except Exception as error:  # a failed step is reported and the check goes on to the next one
                detail = f"{type(error).__name__}: {str(error)[-600:]}"
                results.append((name, "FAIL", detail))
            print(f"[{results[-1][1]}] {name} ({time.time() - started:.0f} s): {results[-1][2]}", flush=True)
            return results[-1][1] == "PASS"
        return run
    return wrap


def build_student(name: str, path: Path, layers: int | None = None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.plan import REFERENCE_CONFIGS
    from tests.tiny_model import build_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer(4096)
    settings = {**REFERENCE_CONFIGS[name], **({"num_hidden_layers": layers} if layers else {})}
    config = AutoConfig.for_model(**settings, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def train(model: Path, output: Path, recipe: str, steps: int, *extra, processes: int = 1) -> dict:
    args = ["train_sft_trl.py", "--config", recipe, "--model_name_or_path", str(model), "--dataset_name",
            str(DATA), "--max_steps", str(steps), "--report_to", "none", "--save_strategy", "no",
            "--output_dir", str(output), "--overwrite", "--logging_steps", "1", *extra]
    if processes > 1 or recipe.endswith("fsdp.yaml"):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_fsdp.yaml",
                  "--num_processes", str(processes)]
    else:
        launch = [sys.executable]
    log = output.with_suffix(".log")
    with open(log, "w") as handle:
        code = subprocess.run(launch + args, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"exit {code}; log {log}: " + log.read_text()[-1500:])
    record = json.loads((output / "distill_run.json").read_text())
    if record["status"] != "finished":
        raise RuntimeError(f"run record says {record['status']}: {record.get('error')}")
    logs = [entry for entry in record["log_history"] if "loss" in entry]
    metrics = record["train_metrics"]
    tokens = logs[-1].get("num_tokens", 0)
    return {"tokens_per_second": round(tokens / metrics["train_runtime"], 1), "losses": [round(e["loss"], 4) for e in logs],
            "peak_gib": record.get("peak_gpu_memory_gib"), "batch": record["counts"]["batch"], "saved": record["saved"]}


@step("memory plans")
def check_plans(gpus: int):
    out = []
    for name, count, flags, must_fit in ((STUDENT_4B, 1, [], True), (STUDENT_30B, 1, [], False),
                                         (STUDENT_30B, max(gpus, 8), [], True)):
        config = WORK / (name.split("/")[1] + "-config")
        write_config(name, config)
        code = subprocess.run([sys.executable, "train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path",
                               str(config), "--plan_only", "--plan_gpus", str(count), "--dtype", "bfloat16", *flags],
                              cwd=REPO, capture_output=True, text=True).returncode
        if (code == 0) != must_fit:
            raise RuntimeError(f"{name} on {count} GPU(s): plan exit {code}, expected {'fit' if must_fit else 'no fit'}")
        out.append(f"{name.split('/')[1]} x{count}: {'fits' if code == 0 else 'does not fit'}")
    return "; ".join(out)


def write_config(name: str, path: Path):
    from transformers import AutoConfig

    from distill.plan import REFERENCE_CONFIGS

    AutoConfig.for_model(**REFERENCE_CONFIGS[name]).save_pretrained(path)


@step("4B student, 1 GPU: old recipe vs recipes/tinker.yaml")
def check_speed(model: Path, steps: int):
    old = train(model, WORK / "run-4b-old", "recipes/tinker.yaml", steps, *OLD_RECIPE)
    new = train(model, WORK / "run-4b-tinker", "recipes/tinker.yaml", steps)
    SPEED.update(old=old, new=new)
    ratio = new["tokens_per_second"] / old["tokens_per_second"]
    return (f"old {old['tokens_per_second']} tokens/s (peak {old['peak_gib']} GiB, batch {old['batch']}), "
            f"tinker.yaml {new['tokens_per_second']} tokens/s (peak {new['peak_gib']} GiB, batch {new['batch']}): "
            f"{ratio:.1f}x; losses old {old['losses']} vs new {new['losses']}")


@step("30B-A3B (layer-cut) student, FSDP on all GPUs")
def check_fsdp(model: Path, steps: int, gpus: int):
    run = train(model, WORK / "run-30b-fsdp", "recipes/tinker_30b_fsdp.yaml", steps, "--ignore_memory_plan",
                processes=gpus)
    return f"{gpus} process(es): {run['tokens_per_second']} tokens/s, peak {run['peak_gib']} GiB, saved {run['saved']}"


@step("adapters load and merge (bf16, GPU)")
def check_merge(pairs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = []
    for base_path, adapter in pairs:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, device_map="cuda")
        weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        changed = not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, weight)
        if not changed:
            raise RuntimeError(f"{adapter}: merging changed nothing")
        out.append(f"{adapter.name} merged")
        del base, merged
        torch.cuda.empty_cache()
    return ", ".join(out)


@step("vLLM serves the 4B adapter with LoRA")
def check_vllm(adapter: Path):
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "SKIPPED: vllm does not import here"
    output = WORK / "eval.json"
    code = subprocess.run([sys.executable, "evaluate.py", "--model_path", str(adapter), "--max_samples", "32",
                           "--output_file", str(output), "--no-lingua", "--quiet", "--latency-requests", "2",
                           "--gpu-memory-utilization", "0.5"], cwd=REPO, capture_output=True, text=True)
    if code.returncode:
        raise RuntimeError(code.stderr[-1500:])
    result = json.loads(output.read_text())
    return f"{result['serving']}; {result['n']} rows, parse rate {result['parse_rate']}"


def main():
    global WORK, DATA, SPEED
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/gpu-check")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--moe_layers", type=int, default=4)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    gpus = torch.cuda.device_count()
    WORK, SPEED = Path(args.work_dir), {}
    WORK.mkdir(parents=True, exist_ok=True)
    DATA = WORK / "teacher.jsonl"
    from tests.conftest import write_teacher_file

    rows = [json.loads(line) for line in (REPO / "example-data" / "language_id.jsonl").read_text().splitlines()]
    write_teacher_file(DATA, rows)
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, work dir {WORK}", flush=True)
    check_plans(gpus)
    dense = build_student(STUDENT_4B, WORK / "qwen3-4b-random")
    moe = build_student(STUDENT_30B, WORK / f"qwen3-30b-a3b-{args.moe_layers}layers-random", args.moe_layers)
    check_speed(dense, args.steps)
    check_fsdp(moe, args.steps, gpus)
    check_merge([(dense, WORK / "run-4b-tinker"), (moe, WORK / "run-30b-fsdp")])
    check_vllm(WORK / "run-4b-tinker")
    failures = sum(status == "FAIL" for _, status, _ in results)
    print(f"\ngpu_check {time.strftime('%Y-%m-%d')}: {len(results) - failures} passed, {failures} failed")
    for name, status, detail in results:
        print(f"  {status}  {name}: {detail}")
    sys.exit(failures)


if __name__ == "__main__":
    main()
