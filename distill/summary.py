"""Owns the tables `make demo` ends with, from results files; must not compute a score (metrics.py).

The side-by-side tables `make demo` ends with, from evaluate.py results files.

The kind of task is read from the results (a generative task's results say "task": "generative"):

    # label task (language ID): teacher with the prompt, the distilled student, the student on gold labels
    python -m distill.summary --teacher data/demo/language_id/eval_teacher.json \
        --student data/demo/language_id/eval_distilled.json --gold_student data/demo/language_id/eval_gold.json
    # generative task (answer in French): base model without the prompt, teacher with it, distilled student
    python -m distill.summary --base data/demo/french/eval_base.json --teacher data/demo/french/eval_teacher.json \
        --student data/demo/french/eval_distilled.json
"""

import argparse
import json
import textwrap
from pathlib import Path

# The share of the teacher's pass rate a distilled student should reach for the demo to call distillation a success.
GOAL_SHARE_OF_TEACHER = 0.9
NAME_WIDTH = 28
NOTE_WIDTH = 118
ANSWER_WIDTH = 70  # an answer shown under the table fits one line beside its row name and verdict
SAMPLE_ANSWERS, SAMPLE_SEED = 5, 0


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def num(value, scale=1.0, unit="") -> str:
    return "n/a" if value is None else f"{value * scale:.1f}{unit}"


def is_generative(results: dict) -> bool:
    # Label-task results predate the "task" key, so its absence means a label task.
    return results.get("task") == "generative"


def label_table(teacher: dict, student: dict, gold_student: dict | None = None) -> str:
    """The gold-label student's row is optional: the demo trains one only with GOLD_STUDENT=1."""
    lingua = student.get("baselines", {}).get("lingua", {})
    gold_rows = [("student on gold labels", gold_student["accuracy_vs_gold"], gold_student["agreement_with_teacher"],
                  gold_student["cost"], "the student can learn the task")] if gold_student else []
    rows = [
        ("teacher + prompt", teacher["accuracy_vs_gold"], None, teacher["cost"], "the labels the students learn from"),
        ("distilled student, no prompt", student["accuracy_vs_gold"], student["agreement_with_teacher"],
         student["cost"], "copies its teacher (agreement)"),
        *gold_rows,
        ("lingua (classical baseline)", lingua.get("accuracy"), lingua.get("agreement_with_teacher"), {},
         "a detector built for the task"),
        ("majority class", student["baselines"]["majority_class"]["accuracy"], None, {}, "the floor"),
    ]
    titles = ("acc vs gold", "agree w/ teacher", "input tok/req", "median latency")
    lines = grid(titles, [(name, (pct(accuracy), pct(agreement), num(cost.get("input_tokens_per_request")),
                                  num(cost.get("median_latency_seconds"), 1000, " ms")), shows)
                          for name, accuracy, agreement, cost, shows in rows])
    notes = [f"{student['split']} split of {student['test_file']}, n={student['n']} rows no student trained on"
             f"{n_note(teacher, student)}; accuracy is against the gold labels, agreement against the "
             f"teacher-with-prompt's answers.", *cost_line(student)]
    return "\n".join(lines + [""] + [textwrap.fill(note, NOTE_WIDTH) for note in notes])


def generative_table(base: dict, teacher: dict, student: dict, extra: dict | None = None) -> str:
    """`extra` adds rows after the distilled student's, {row name: results} (e.g. another student)."""
    header = pass_header(teacher["check"])
    rows = [
        ("base model, no prompt", base, "what the student starts from"),
        ("teacher + prompt", teacher, "the behaviour the prompt buys"),
        ("distilled student, no prompt", student, "the behaviour, without the prompt"),
        *((name, results, "the behaviour, without the prompt") for name, results in (extra or {}).items()),
    ]
    titles = ("strict pass", f"check alone: {header}", "chrF vs teacher", "answer tokens", "input tok/req",
              "median latency")
    lines = grid(titles, [(name, (pct(results["strict_pass_rate"]), pct(results["check_pass_rate"]),
                                  num(results["agreement_with_teacher_chrf"]), num(results["mean_answer_tokens"]),
                                  num(results["cost"]["input_tokens_per_request"]),
                                  num(results["cost"]["median_latency_seconds"], 1000, " ms")), shows)
                          for name, results, shows in rows])
    notes = [f"{student['split']} split of {student['test_file']}, n={student['n']} questions no student trained on"
             f"{n_note(teacher, student)}. Strict pass = {teacher['check_description']}, and the answer is an answer: "
             f"not cut at the token cap, empty, a restatement of the prompt (echo), a loop, or off the question's "
             f"topic (distill/checks.py). chrF (0-100) compares each answer with the teacher-with-prompt's answer to "
             f"the same question.",
             "Not answers: " + "; ".join(f"{name} {non_answers(results)}" for name, results, _ in rows) + ".",
             share_line(teacher["strict_pass_rate"], student["strict_pass_rate"]),
             *rule_goal_lines(teacher, {name: results for name, results, _ in rows[2:]}), *cost_line(student)]
    named = {name: results for name, results, _ in rows}
    return "\n".join(lines + [""] + [textwrap.fill(note, NOTE_WIDTH) for note in notes] + [""]
                     + sample_answers(named))


def non_answers(results: dict) -> str:
    counts = results.get("non_answers", {})
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "none"


def sample_answers(named: dict[str, dict], k: int = SAMPLE_ANSWERS, seed: int = SAMPLE_SEED) -> list[str]:
    """k held-out questions every model was asked, drawn with a fixed seed (not picked by hand), and each model's
    answer with its strict verdict: the numbers, seen on cases."""
    import random

    by_id = {name: {example["id"]: example for example in results["examples"]} for name, results in named.items()}
    shared = sorted(set.intersection(*(set(answers) for answers in by_id.values())))
    lines = [f"{min(k, len(shared))} held-out questions drawn with seed {seed} (✓ strict pass, ✗ with the reason):"]
    for question_id in random.Random(seed).sample(shared, min(k, len(shared))):
        lines.append(f"  {question_id}: {shorten(next(iter(by_id.values()))[question_id]['text'])}")
        for name, answers in by_id.items():
            example = answers[question_id]
            verdict = "✓" if example["passed"] else f"✗ {verdict_reason(example)}"
            lines.append(f"    {name + ':':30} {verdict:16} {shorten(example['answer'] or 'EMPTY')}")
    return lines


def verdict_reason(example: dict) -> str:
    if example.get("reason", "ok") != "ok":
        return example["reason"]
    return "check failed"


def shorten(text: str) -> str:
    return textwrap.shorten(text, ANSWER_WIDTH, placeholder=" ...")


def grid(titles: tuple[str, ...], rows: list[tuple[str, tuple[str, ...], str]]) -> list[str]:
    """One line per (name, numbers, what the row shows): numbers right-aligned under their titles."""
    def line(name, cells, shows):
        return f"{name:{NAME_WIDTH}}" + "".join(f"  {cell:>{len(title)}}" for cell, title in zip(cells, titles)) + \
            f"  {shows}"

    return [line("", titles, "what the row shows")] + [line(*row) for row in rows]


def pass_header(check: dict) -> str:
    """A column title a reader understands, e.g. 'answers in French' for {answer_language: fr}."""
    (kind, value), = check.items()
    if kind != "answer_language":
        return "passes check"
    from lingua import IsoCode639_1, Language

    return f"answers in {Language.from_iso_code_639_1(IsoCode639_1.from_str(str(value))).name.title()}"


def share_line(teacher_rate, student_rate) -> str:
    goal = f"goal >= {100 * GOAL_SHARE_OF_TEACHER:.0f}%"
    if not teacher_rate:
        return (f"The teacher passes no answer strictly, so the student's share of its strict pass rate is undefined "
                f"({goal}).")
    share = student_rate / teacher_rate
    verdict = "met" if share >= GOAL_SHARE_OF_TEACHER else "not met"
    return (f"The distilled student reaches {100 * share:.0f}% of the teacher's strict pass rate "
            f"({pct(student_rate)} vs {pct(teacher_rate)}); {goal}: {verdict}.")


def rule_goal_lines(teacher: dict, students: dict[str, dict]) -> list[str]:
    """Per student, its share of the teacher's pass rate on each rule the base model does not already follow (the
    prompt file marks those baseline_follows): the goal holds when every share is at least GOAL_SHARE_OF_TEACHER.
    `evaluate.py --compare` prints every rule's rates."""
    goal_rules = [rule_id for rule_id, rule in teacher.get("rules", {}).items() if not rule["baseline_follows"]]
    lines = []
    for name, results in students.items():
        shares = {rule_id: results["rules"][rule_id]["pass_rate"] / teacher["rules"][rule_id]["pass_rate"]
                  for rule_id in goal_rules
                  if rule_id in results.get("rules", {}) and teacher["rules"][rule_id]["pass_rate"]}
        if not shares:
            continue
        missed = [rule_id for rule_id, share in shares.items() if share < GOAL_SHARE_OF_TEACHER]
        lines.append(f"{name[0].upper() + name[1:]}: on each rule the base does not follow, " + ", ".join(
            f"{rule_id} {100 * share:.0f}%" for rule_id, share in shares.items())
            + f" of the teacher's pass rate (goal >= {100 * GOAL_SHARE_OF_TEACHER:.0f}% on each): "
            + ("met." if not missed else f"not met ({', '.join(missed)})."))
    return lines


def n_note(teacher: dict, student: dict) -> str:
    # A teacher run limited by --max_samples is scored on fewer rows; its numbers then describe only those.
    return "" if teacher["n"] == student["n"] else f" (the teacher: the first {teacher['n']} of them)"


def cost_line(student: dict) -> list[str]:
    ratio = student["cost"].get("vs_teacher_with_prompt", {})
    if not ratio:
        return []
    line = f"The distilled student reads {ratio['input_tokens']:.0f}x fewer input tokens per request"
    if "median_latency" not in ratio:
        return [line + "."]
    # On a busy machine the student can time slower than the teacher; say so rather than print "0.3x faster".
    speed = ratio["median_latency"]
    return [line + (f" and answers {speed:.1f}x faster" if speed >= 1 else f" but answers {1 / speed:.1f}x slower")
            + " (median, batch 1)."]


def check_same_rows(named: dict[str, dict]) -> None:
    """Rows compared side by side must come from the same test file and split, and from the same kind of task."""
    for key in ("test_file", "split"):
        values = {name: results[key] for name, results in named.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"the results files do not share one {key}: {values}")
    kinds = {name: "generative" if is_generative(results) else "label" for name, results in named.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"the results files mix task kinds: {kinds}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="evaluate.py --with_prompt results JSON")
    parser.add_argument("--student", required=True, help="the distilled student's results JSON")
    parser.add_argument("--gold_student", help="label task (optional): the student trained on gold labels")
    parser.add_argument("--base", help="generative task: the base model without the prompt")
    parser.add_argument("--on_policy", help="generative task (optional): the on-policy student's results JSON")
    args = parser.parse_args(argv)
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    teacher, student = load(args.teacher), load(args.student)
    if is_generative(teacher):
        if not args.base:
            parser.error(f"{args.teacher} is a generative task's results: give --base (the base model, no prompt)")
        named = {"base": load(args.base), "teacher": teacher, "student": student}
        if args.on_policy:
            named["extra"] = {"SFT, then on-policy": load(args.on_policy)}
    else:
        named = {"teacher": teacher, "student": student}
        if args.gold_student:
            named["gold_student"] = load(args.gold_student)
    try:
        check_same_rows({**{k: v for k, v in named.items() if k != "extra"}, **named.get("extra", {})})
    except ValueError as error:
        parser.error(str(error))
    print(generative_table(**named) if is_generative(teacher) else label_table(**named))


if __name__ == "__main__":
    main()
