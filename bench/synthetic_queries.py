"""Bench (f): a student distilled from queries the model wrote itself (create_queries.py) against the same student
distilled from our human-written train split, both scored on the human-written held-out questions.

    .venv/bin/python bench/synthetic_queries.py                     # ~25 min on 2 cores
    .venv/bin/python bench/synthetic_queries.py --num_queries 200 --seed_examples 0
    .venv/bin/python bench/synthetic_queries.py --task french       # the French prompt (its strict rate has no
                                                                      # content check: answers and questions differ
                                                                      # in language)

The demo's behaviour task (--task in_short, prompts/in_short.md; or the French one, prompts/answer_in_french.md) with
the embedded SmolLM2-135M as query writer, teacher and student, at the demo's settings:
  1. create_queries.py writes --num_queries queries spread over the topics (groups) of the train side of
     example-data/general_questions.jsonl, shown --seed_examples train-split questions as examples (0: none). Held-out
     topics are never named and no held-out question is shown, so nothing of the evaluation leaks into training.
  2. The teacher, with the prompt, answers the synthetic queries, and --human_rows train-split human questions
     (create_data.py, the demo's settings).
  3. Two students learn those answers without the prompt: same recipe (recipes/cpu.yaml), seed and epochs.
  4. evaluate.py scores both (and the teacher with the prompt) on the human-written held-out questions: the strict
     pass rate (the prompt's check passes and the answer is an answer: distill/checks.py), the check's rate alone,
     and chrF against the teacher's answer to the same question.

Writes <work_dir>/synthetic_queries.json and every stage's output under <work_dir>/ (logs in <work_dir>/logs/).
"""

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pipeline import (  # noqa: E402
    FRENCH_EPOCHS,
    FRENCH_PROMPT,
    FRENCH_TEACHER,
    GENERAL_QUESTIONS,
    IN_SHORT_PROMPT,
    IN_SHORT_TEACHER,
    MODEL,
    REPO,
    run,
    train,
)
from distill.records import read_jsonl, read_queries  # noqa: E402
from distill.splits import select  # noqa: E402

# create_queries.py settings for a 135M writer: one line per query (the model rambles otherwise), room for one
# question, and some heat for variety.
WRITER = ["--max_tokens", "48", "--constrain_one_line", "--max_chars", "200", "--temperature", "0.8",
          "--max-model-len", "4096"]
# Each task as scripts/demo.sh runs it: prompt, teacher flags, student epochs, evaluation answer cap.
TASKS = {"in_short": {"prompt": IN_SHORT_PROMPT, "teacher": IN_SHORT_TEACHER, "epochs": 2, "max_tokens": 48},
         "french": {"prompt": FRENCH_PROMPT, "teacher": FRENCH_TEACHER, "epochs": FRENCH_EPOCHS, "max_tokens": 40}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="in_short")
    parser.add_argument("--num_queries", type=int, default=150)
    parser.add_argument("--seed_examples", type=int, default=24,
                        help="train-split questions shown to the writer as examples (0: none)")
    parser.add_argument("--human_rows", type=int, default=120, help="train-split questions the human student gets")
    parser.add_argument("--work_dir", default=None, help="default: data/bench_synthetic/<task>")
    parser.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    return parser.parse_args(argv)


def write_queries(args, work: Path) -> Path:
    """Stage 0 on the train side only: its topics, and seed examples drawn from its questions."""
    train_rows = select(read_queries(GENERAL_QUESTIONS).rows, "train")
    topics = sorted({row["group"] for row in train_rows})
    flags = ["--topics", *topics]
    if args.seed_examples:
        seeds = work / "seed_examples.jsonl"
        chosen = random.Random(0).sample(train_rows, args.seed_examples)
        seeds.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in chosen), encoding="utf-8")
        flags += ["--seed_examples", seeds]
    output = work / "queries.jsonl"
    run(work, "write-queries", args.python, "create_queries.py", "--prompt_file", TASKS[args.task]["prompt"],
        "--model_name", MODEL,
        "--num_queries", args.num_queries, "--output_file", output, "--overwrite", *WRITER, *flags)
    return output


def answer(args, work: Path, name: str, queries: str | Path, *flags) -> Path:
    output = work / f"teacher_{name}.jsonl"
    task = TASKS[args.task]
    run(work, f"teacher-{name}", args.python, "create_data.py", "--model_name", MODEL, "--prompt_file", task["prompt"],
        "--input_file", queries, "--output_file", output, "--overwrite", *task["teacher"], *flags)
    return output


def evaluate(args, work: Path, name: str, model_path, *flags) -> dict:
    output = work / f"eval_{name}.json"
    task = TASKS[args.task]
    run(work, f"eval-{name}", args.python, "evaluate.py", "--model_path", model_path, "--prompt_file", task["prompt"],
        "--test_file", GENERAL_QUESTIONS, "--max_tokens", task["max_tokens"], "--latency_requests", 0,
        "--output_file", output, *flags)
    return json.loads(output.read_text(encoding="utf-8"))


def student_row(results: dict, record: dict, written: int, answered: int) -> dict:
    return {"queries": written, "teacher_kept": answered, "rows_trained": record["counts"]["rows_used"],
            "strict_pass_rate": results["strict_pass_rate"], "check_pass_rate": results["check_pass_rate"],
            "chrf": results["agreement_with_teacher_chrf"],
            "mean_answer_tokens": results["mean_answer_tokens"], "n": results["n"]}


def main(argv=None):
    args = parse_args(argv)
    args.work_dir = args.work_dir or f"data/bench_synthetic/{args.task}"
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", PYTHON=args.python)
    started = time.monotonic()

    queries = write_queries(args, work)
    synthetic_answers = answer(args, work, "synthetic", queries, "--split", "all")
    human_answers = answer(args, work, "human", GENERAL_QUESTIONS, "--split", "train", "--max_samples", args.human_rows)
    teacher = evaluate(args, work, "teacher", MODEL, "--with_prompt")
    reference = ["--teacher_file", work / "eval_teacher.json"]
    rows = {}
    for name, answers, written in (("synthetic", synthetic_answers, len(read_jsonl(queries))),
                                   ("human", human_answers, args.human_rows)):
        model_dir = REPO / "models" / f"bench-synthetic-{args.task}-{name}"
        record = train(work, f"train-{name}", answers, model_dir, TASKS[args.task]["epochs"])
        rows[name] = student_row(evaluate(args, work, name, model_dir, *reference), record, written,
                                 len(read_jsonl(answers)))
    writer_record = json.loads(queries.with_suffix(".run.json").read_text(encoding="utf-8"))
    summary = {"date": str(datetime.date.today()), "args": vars(args),
               "teacher_strict_pass_rate": teacher["strict_pass_rate"],
               "teacher_check_pass_rate": teacher["check_pass_rate"],
               "students": rows, "writer_counts": writer_record.get("counts"),
               "query_examples": [row["text"] for row in read_jsonl(queries)[:8]],
               "wall_seconds": round(time.monotonic() - started)}
    (work / "synthetic_queries.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(report(summary, teacher))


def report(summary: dict, teacher: dict) -> str:
    lines = [f"bench: synthetic vs human-written training queries, {summary['date']}, task {summary['args']['task']}, "
             f"{MODEL} as writer, teacher and student; scored on {teacher['n']} human-written held-out questions",
             f"{'training queries':<34} {'written':>8} {'kept':>6} {'trained':>8} {'strict':>8} {'check':>10} "
             f"{'chrF':>6}",
             f"{'(teacher + prompt)':<34} {'':>8} {'':>6} {'':>8} {100 * teacher['strict_pass_rate']:>7.1f}% "
             f"{100 * teacher['check_pass_rate']:>9.1f}% {'':>6}"]
    for name, row in summary["students"].items():
        label = "model-written (create_queries.py)" if name == "synthetic" else "human-written train split"
        lines.append(f"{label:<34} {row['queries']:>8} {row['teacher_kept']:>6} {row['rows_trained']:>8} "
                     f"{100 * row['strict_pass_rate']:>7.1f}% {100 * row['check_pass_rate']:>9.1f}% "
                     f"{row['chrf']:>6.1f}")
    lines.append(f"writer: {summary['writer_counts']}")
    lines.append("first synthetic queries: " + " | ".join(summary["query_examples"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
