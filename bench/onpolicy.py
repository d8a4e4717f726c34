"""Bench (h): on-policy prompt distillation against SFT on the demo's behaviour task, five rows side by side.

    make demo && .venv/bin/python bench/onpolicy.py       # reuses the demo's teacher, SFT student and evaluations

Rows, all scored on the 70 held-out questions (none trained on) of example-data/general_questions.jsonl under
prompts/in_short.md, greedy, 48 new tokens:
  - the base model without the prompt, and the teacher (the same model) with it;
  - the SFT student (stage 2 on the teacher's answers; the demo's models/demo-in_short);
  - the on-policy student from the base (train_opd_trl.py, self-teacher, --opd_epochs over the train questions);
  - SFT then on-policy (the demo's models/demo-in_short-opd, warm-started from the SFT adapter).
Columns: strict pass rate (distill/checks.py), chrF against the teacher's answers, per-token reverse KL(student ||
teacher) on the student's own held-out answers and forward KL(teacher || student) on the teacher's held-out answers
(full vocabulary, bench/measures.py kl_to_teacher), teacher tokens spent in training, training wall time, and drift:
per-token KL(base || student) over 50 language-ID texts (example-data/language_id.jsonl, unrelated to the task).
Writes <work_dir>/onpolicy.json.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pipeline import GENERAL_QUESTIONS, MODEL, REPO, run  # noqa: E402

PROMPT = "prompts/in_short.md"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="data/demo/in_short", help="the demo's in_short part (make demo)")
    parser.add_argument("--sft", default="models/demo-in_short", help="the demo's SFT student")
    parser.add_argument("--sft_opd", default="models/demo-in_short-opd", help="the demo's SFT-then-on-policy student")
    parser.add_argument("--work_dir", default="data/bench/onpolicy")
    parser.add_argument("--opd_epochs", type=int, default=1)
    parser.add_argument("--opd_rows", type=int, default=64, help="training questions for the on-policy student")
    parser.add_argument("--skip_from_base", action="store_true",
                        help="leave out the on-policy-from-the-base row (its training is the slow part on CPU)")
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--drift_texts", type=int, default=50)
    parser.add_argument("--python", default=sys.executable)
    return parser.parse_args(argv)


def evaluate(args, work: Path, name: str, model_path) -> dict:
    output = work / f"eval_{name}.json"
    run(work, f"eval-{name}", args.python, "evaluate.py", "--model_path", model_path, "--prompt_file", PROMPT,
        "--test_file", GENERAL_QUESTIONS, "--max_tokens", args.max_tokens, "--latency_requests", 0, "--output_file",
        output, "--teacher_file", Path(args.demo_dir) / "eval_teacher.json", "--quiet")
    return json.loads(output.read_text(encoding="utf-8"))


def load(model_path):
    """A student as scored: the base with its adapter (PEFT), or a plain model."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    if model_path is None or str(model_path) == MODEL:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(model_path)).eval()


def figures(name: str, model_path, results: dict, teacher: dict, record: dict | None, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    from bench.measures import drift_from_base, kl_to_teacher
    from distill.prompts import load_prompt

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompt = load_prompt(PROMPT)
    student, reference = load(model_path), load(None)
    questions = [e["text"] for e in results["examples"]]
    own = kl_to_teacher(student, reference, tokenizer, prompt, questions, [e["answer"] for e in results["examples"]])
    teacher_answers = {e["id"]: e["answer"] for e in teacher["examples"]}
    scored = [e for e in results["examples"] if teacher_answers.get(e["id"])]
    on_teacher = kl_to_teacher(student, reference, tokenizer, prompt, [e["text"] for e in scored],
                               [teacher_answers[e["id"]] for e in scored])
    drift = drift_from_base(student, reference, tokenizer, texts, side=prompt.student)
    strict = rescored(results, prompt)
    spend = (record or {}).get("teacher_spend", {}).get("tokens")
    if record and record.get("stage") == "train_sft_trl":
        spend = "stage 1"
    return {"name": name, "strict_pass_rate": strict,
            "chrf": results.get("agreement_with_teacher_chrf"), "reverse_kl": own["reverse_kl"],
            "forward_kl": on_teacher["forward_kl"], "teacher_tokens": spend,
            "train_seconds": (record or {}).get("wall_seconds"), "drift_kl": drift["kl_base_to_student"],
            "n": results["n"], "kl_tokens": {"reverse": own["tokens"], "forward": on_teacher["tokens"],
                                            "drift": drift["tokens"]}}


def rescored(results: dict, prompt) -> float:
    """The strict pass rate of a results file under today's rules (distill/checks.py), from its saved answers: files
    scored before a rule changed compare alike."""
    from distill.metrics import strict_verdicts

    contract = ("cut_at_max_tokens", "empty_answer", "unclosed_reasoning")
    examples = results["examples"]
    verdicts = strict_verdicts(prompt, [e["text"] for e in examples], [e["answer"] for e in examples],
                             [e["reason"] if e["reason"] in contract else "ok" for e in examples],
                             [None] * len(examples))
    return sum(v["passed"] for v in verdicts) / len(examples)


def table(rows: list[dict]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def num(v, digits=3):
        return "n/a" if v is None else (v if isinstance(v, str) else f"{v:.{digits}f}")

    lines = [f"{'':34} {'strict':>7} {'chrF':>6} {'rev KL':>7} {'fwd KL':>7} {'teacher tokens':>15} {'train s':>8} "
             f"{'drift KL':>9}"]
    for row in rows:
        seconds = "n/a" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}"
        tokens = row["teacher_tokens"] if isinstance(row["teacher_tokens"], str) else (
            "-" if row["teacher_tokens"] is None else f"{row['teacher_tokens']:,}")
        lines.append(f"{row['name']:34} {pct(row['strict_pass_rate']):>7} {num(row['chrf'], 1):>6} "
                     f"{num(row['reverse_kl']):>7} {num(row['forward_kl']):>7} {tokens:>15} {seconds:>8} "
                     f"{num(row['drift_kl'], 4):>9}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    started = time.monotonic()
    demo = Path(args.demo_dir)
    teacher = json.loads((demo / "eval_teacher.json").read_text())
    opd_base = REPO / "models" / "bench-opd-from-base"
    if not args.skip_from_base:
        run(work, "train-opd-from-base", args.python, "train_opd_trl.py", "--config", "recipes/opd_cpu.yaml",
            "--prompt_file", PROMPT, "--dataset_name", GENERAL_QUESTIONS, "--num_train_epochs", args.opd_epochs,
            "--max_train_rows", args.opd_rows, "--output_dir", opd_base, "--overwrite", "--report_to", "none")
    from distill.prompts import load_prompt
    from distill.records import read_queries

    texts = [row["text"] for row in read_queries("example-data/language_id.jsonl").rows[: args.drift_texts]]
    record = lambda path: json.loads((Path(path) / "distill_run.json").read_text())  # noqa: E731
    rows = [
        figures("base model, no prompt", None, json.loads((demo / "eval_base.json").read_text()), teacher, None,
                texts),
        # The teacher is the base model reading the prompt: its KL to itself is 0 by definition, and without the
        # prompt (the drift texts) it is the base.
        {"name": "teacher + prompt", "strict_pass_rate": rescored(teacher, load_prompt(PROMPT)), "chrf": None,
         "reverse_kl": 0.0,
         "forward_kl": 0.0, "teacher_tokens": None, "train_seconds": None, "drift_kl": 0.0, "n": teacher["n"]},
        figures("SFT student", args.sft, json.loads((demo / "eval_distilled.json").read_text()), teacher,
                record(args.sft), texts),
        *([] if args.skip_from_base else [figures("on-policy student, from the base", opd_base,
                                                  evaluate(args, work, "opd-from-base", opd_base), teacher,
                                                  record(opd_base), texts)]),
        figures("SFT, then on-policy", args.sft_opd, json.loads((demo / "eval_opd.json").read_text()), teacher,
                record(args.sft_opd), texts),
    ]
    summary = {"date": str(datetime.date.today()), "args": vars(args), "rows": rows,
               "wall_seconds": round(time.monotonic() - started)}
    (work / "onpolicy.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"bench: on-policy vs SFT, {summary['date']}, {MODEL} as teacher (with {PROMPT}) and student; "
          f"{rows[0]['n']} held-out questions; KL per token, nats")
    print(table(rows))
    print("rev KL: KL(student || teacher) on the student's own held-out answers; fwd KL: KL(teacher || student) on "
          "the teacher's held-out answers; drift: KL(base || student) over "
          f"{len(texts)} language-ID texts; teacher tokens: forwarded by the on-policy teacher in training (SFT: the "
          "stage-1 teacher's answers instead)")


if __name__ == "__main__":
    main()
