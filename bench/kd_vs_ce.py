"""Bench (e): a student trained on the teacher's answers (cross-entropy) against one trained on the teacher's
log-probabilities (KD), side by side on held-out queries, for the two CPU tasks.

    .venv/bin/python bench/kd_vs_ce.py                                  # both tasks (~25 min on 2 cores)
    .venv/bin/python bench/kd_vs_ce.py --tasks french --losses ce kd kd+ce

Per task, the embedded SmolLM2-135M teacher, with the task's prompt, answers --train_rows train-split queries and
--heldout_rows held-out ones (create_data.py --save_logprobs 20, the settings `make demo` uses). Students learn the
train answers without the prompt, one per --losses entry, all with recipes/cpu.yaml, the same seed and the same
epochs (train_sft_trl.py --distill_loss ce | kd | kd+ce, T = --kd_temperature). On the held-out queries:
  - evaluate.py scores each student: the strict pass rate and the check's rate alone (French task; distill/checks.py)
    or accuracy against the gold labels (language ID), and agreement with the teacher's answer to the same query
    (chrF, or label agreement);
  - KL(teacher || student) per answer token on the teacher's held-out answers, the teacher's top-20 renormalised as
    the KD loss does (bench/measures.py heldout_kl); the base model without the prompt is the reference.
The teacher's own row is its held-out stage-1 output: strictly, the share of its held-out queries whose answer stage 1
kept (stage 1 rejects cut answers, echoes, loops and off-topic ones) and that pass the check; the check alone is over
the kept answers (label task: the share of its kept labels that match gold).

Writes <work_dir>/kd_vs_ce.json and the stage outputs under <work_dir>/<task>/ (logs in <work_dir>/logs/).
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.measures import heldout_kl  # noqa: E402
from bench.pipeline import FRENCH_EPOCHS, FRENCH_PROMPT, FRENCH_TEACHER, GENERAL_QUESTIONS, MODEL, REPO, run, train  # noqa: E402
from distill import checks  # noqa: E402
from distill.prompts import load_prompt  # noqa: E402
from distill.records import output_paths, read_jsonl  # noqa: E402
from distill.run_files import read_sidecar, sidecar_path  # noqa: E402

TOP_K = 20
# The demo's settings for each task (scripts/demo.sh); language ID is constrained to the label set at its temperature.
TASKS = {
    "french": {
        "prompt": FRENCH_PROMPT, "queries": GENERAL_QUESTIONS, "epochs": FRENCH_EPOCHS, "teacher": FRENCH_TEACHER,
        "evaluate": ["--max_tokens", "40"],
    },
    "language_id": {
        "prompt": "prompts/language_identification.md", "queries": "example-data/language_id.jsonl", "epochs": 1,
        "teacher": ["--constrain_labels", "--temperature", "0.15", "--max_tokens", "8", "--max-model-len", "4096",
                    "--max_in_flight", "16"],
        "evaluate": [],
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--losses", nargs="+", choices=["ce", "kd", "kd+ce"], default=["ce", "kd"])
    parser.add_argument("--train_rows", type=int, default=120)
    parser.add_argument("--heldout_rows", type=int, default=60)
    parser.add_argument("--kd_temperature", type=float, default=1.0)
    parser.add_argument("--work_dir", default="data/bench_kd")
    parser.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    return parser.parse_args(argv)


def teacher(args, task: str, split: str, rows: int) -> Path:
    spec, output = TASKS[task], Path(args.work_dir) / task / f"teacher_{split}.jsonl"
    run(args.work_dir, f"{task}-teacher-{split}", args.python, "create_data.py", "--model_name", MODEL,
        "--prompt_file", spec["prompt"], "--input_file", spec["queries"], "--split", split, "--max_samples", rows,
        "--save_logprobs", TOP_K, "--output_file", output, "--overwrite", *spec["teacher"])
    return output


def student(args, task: str, loss: str, train_file: Path) -> tuple[Path, dict]:
    output_dir = REPO / "models" / f"bench-kd-{task}-{loss.replace('+', '-')}"
    record = train(args.work_dir, f"{task}-train-{loss}", train_file, output_dir, TASKS[task]["epochs"],
                   "--distill_loss", loss, "--kd_temperature", args.kd_temperature)
    return output_dir, record


def evaluate(args, task: str, loss: str, model_dir: Path, heldout_teacher: Path) -> dict:
    spec, output = TASKS[task], Path(args.work_dir) / task / f"eval_{loss}.json"
    run(args.work_dir, f"{task}-eval-{loss}", args.python, "evaluate.py", "--model_path", model_dir,
        "--prompt_file", spec["prompt"], "--test_file", spec["queries"], "--max_samples", args.heldout_rows,
        "--teacher_file", heldout_teacher, "--latency_requests", 0, "--output_file", output, *spec["evaluate"])
    return json.loads(output.read_text(encoding="utf-8"))


def kl(model_dir: Path | None, heldout_teacher: Path) -> dict:
    """heldout_kl for the base model (model_dir None) or a LoRA student, on the teacher's held-out answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / MODEL)
    model = AutoModelForCausalLM.from_pretrained(REPO / MODEL, dtype=torch.float32)
    if model_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)
    from distill.training import stage1_student_side

    return heldout_kl(model, tokenizer, read_jsonl(heldout_teacher), read_sidecar(sidecar_path(heldout_teacher)),
                      stage1_student_side(str(heldout_teacher)))


def teacher_row(task: str, heldout_teacher: Path) -> dict:
    """What the teacher itself scores on the held-out answers it kept (rejected ones have no answer)."""
    rows = read_jsonl(heldout_teacher)
    rejected = len(read_jsonl(output_paths(str(heldout_teacher))[1]))
    answers = [next(m["content"] for m in row["messages"] if m["role"] == "assistant") for row in rows]
    prompt = load_prompt(REPO / TASKS[task]["prompt"])
    if not prompt.is_generative:
        passed = [answer == row["label"] for answer, row in zip(answers, rows)]
        return {"score": sum(passed) / len(passed) if passed else None, "kept": len(rows), "rejected": rejected}
    # Stage 1 kept only answers (not cut, no echo, loop or off-topic); a rejected row is a strict failure.
    check = checks.passes_each(prompt.check, answers)
    total = len(rows) + rejected
    return {"score": sum(check) / total if total else None,
            "check_score_kept": sum(check) / len(rows) if rows else None,
            "kept": len(rows), "rejected": rejected}


def score(task: str, results: dict) -> tuple[float, float | None, float]:
    """(strict pass rate or accuracy vs gold, the check's pass rate alone or None, agreement with the teacher: chrF
    0-100 or a share)."""
    if results.get("task") == "generative":
        return results["strict_pass_rate"], results["check_pass_rate"], results["agreement_with_teacher_chrf"]
    return results["accuracy_vs_gold"], None, results["agreement_with_teacher"]


def run_task(args, task: str) -> dict:
    train_file = teacher(args, task, "train", args.train_rows)
    heldout_teacher = teacher(args, task, "heldout", args.heldout_rows)
    result = {"teacher": teacher_row(task, heldout_teacher), "base": {"kl": kl(None, heldout_teacher)}, "students": {}}
    for loss in args.losses:
        model_dir, record = student(args, task, loss, train_file)
        results = evaluate(args, task, loss, model_dir, heldout_teacher)
        passed, check_passed, agreement = score(task, results)
        result["students"][loss] = {"score": passed, "check_score": check_passed, "agreement": agreement,
                                    "n": results["n"],
                                    "kl": kl(model_dir, heldout_teacher),
                                    "distillation": record["counts"].get("distillation"),
                                    "final_loss": last_loss(record)}
    return result


def last_loss(record: dict) -> float | None:
    losses = [entry["loss"] for entry in record.get("log_history", []) if "loss" in entry]
    return losses[-1] if losses else None


def table(results: dict, args) -> str:
    lines = [f"bench: CE vs KD students, {datetime.date.today()}, teacher {MODEL} with the prompt, "
             f"{args.train_rows} train rows, up to {args.heldout_rows} held-out rows, top-{TOP_K}, "
             f"T={args.kd_temperature}",
             f"{'task':<12} {'model':<22} {'strict / acc':>12} {'check alone':>11} {'agree w/ teacher':>16} "
             f"{'KL/token (held-out)':>20}"]
    for task, result in results.items():
        score_name = "strict pass and the check's pass rate alone" if task == "french" else "acc vs gold"
        agreement_name = "chrF" if task == "french" else "label agr."
        kl_of = lambda entry: "n/a" if entry["kl"]["mean_kl"] is None else f"{entry['kl']['mean_kl']:.3f}"  # noqa
        teacher_result = result["teacher"]
        lines.append(f"{task:<12} {'teacher + prompt':<22} {fmt(teacher_result['score']):>12} "
                     f"{fmt(teacher_result.get('check_score_kept')):>11} {'-':>16} {'-':>20}")
        lines.append(f"{'':<12} {'base, no prompt':<22} {'-':>12} {'-':>11} {'-':>16} {kl_of(result['base']):>20}")
        for loss, entry in result["students"].items():
            agreement = (f"{entry['agreement']:.1f}" if task == "french" else fmt(entry["agreement"])) \
                if entry["agreement"] is not None else "n/a"
            lines.append(f"{'':<12} {f'student {loss}':<22} {fmt(entry['score']):>12} "
                         f"{fmt(entry.get('check_score')):>11} {agreement:>16} {kl_of(entry):>20}")
        kl_tokens = result["base"]["kl"]
        lines.append(f"{'':<12} ({score_name}; agreement is {agreement_name}; teacher kept {teacher_result['kept']}, "
                     f"rejected {teacher_result['rejected']} held-out rows (its strict rate counts a rejected row as a "
                     f"failure, its check rate is over the kept rows); KL over {kl_tokens['tokens']} tokens of "
                     f"{kl_tokens['rows']} rows)")
    return "\n".join(lines)


def fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main(argv=None):
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", PYTHON=args.python)
    started = time.monotonic()
    results = {task: run_task(args, task) for task in args.tasks}
    output = Path(args.work_dir) / "kd_vs_ce.json"
    output.write_text(json.dumps({"args": vars(args), "date": str(datetime.date.today()), "results": results,
                                  "wall_seconds": round(time.monotonic() - started)}, indent=2), encoding="utf-8")
    print(table(results, args))
    print(f"bench: {time.monotonic() - started:.0f} s in all; details in {output}")


if __name__ == "__main__":
    main()
