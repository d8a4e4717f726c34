"""The side-by-side table `make demo` ends with, from evaluate.py results files.

    python -m distill.summary --teacher data/demo/eval_teacher.json \
        --student data/demo/eval_distilled.json --gold_student data/demo/eval_gold.json
"""

import argparse
import json
from pathlib import Path


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def num(value, scale=1.0, unit="") -> str:
    return "n/a" if value is None else f"{value * scale:.1f}{unit}"


def table(teacher: dict, student: dict, gold_student: dict) -> str:
    lingua = student.get("baselines", {}).get("lingua", {})
    rows = [
        ("teacher + prompt", teacher["accuracy_vs_gold"], None, teacher["cost"]),
        ("distilled student, no prompt", student["accuracy_vs_gold"], student["agreement_with_teacher"], student["cost"]),
        ("student on gold labels", gold_student["accuracy_vs_gold"], gold_student["agreement_with_teacher"],
         gold_student["cost"]),
        ("lingua (classical baseline)", lingua.get("accuracy"), lingua.get("agreement_with_teacher"), {}),
        ("majority class", student["baselines"]["majority_class"]["accuracy"], None, {}),
    ]
    lines = [f"{'':30} {'acc vs gold':>12} {'agree w/ teacher':>17} {'input tok/req':>14} {'median latency':>15}"]
    for name, accuracy, agreement, cost in rows:
        lines.append(f"{name:30} {pct(accuracy):>12} {pct(agreement):>17} "
                     f"{num(cost.get('input_tokens_per_request')):>14} "
                     f"{num(cost.get('median_latency_seconds'), 1000, ' ms'):>15}")
    ratio = student["cost"].get("vs_teacher_with_prompt", {})
    lines.append(f"\n{student['split']} split of {student['test_file']}, n={student['n']} rows no student trained on; "
                 f"accuracy is against the gold labels, agreement against the teacher-with-prompt's answers.")
    if ratio:
        lines.append(f"The distilled student reads {ratio['input_tokens']:.0f}x fewer input tokens per request"
                     + (f" and answers {ratio['median_latency']:.1f}x faster (median, batch 1)." if "median_latency" in ratio else "."))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--gold_student", required=True)
    args = parser.parse_args()
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    print(table(load(args.teacher), load(args.student), load(args.gold_student)))


if __name__ == "__main__":
    main()
