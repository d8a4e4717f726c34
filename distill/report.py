"""Owns how evaluation's results are printed, drawn and logged; must not compute a metric (metrics.py).

How evaluate.py shows its results: a line per example as they are scored, the console report (accuracy beside the
baselines and the confusion matrix, or a generative task's pass rates), the confusion-matrix PNG, and the wandb eval
run. The numbers themselves come from distill/metrics.py and are saved in the results JSON before any of this runs.

    report.show(results, output_file, wandb=True)   # the console report, the PNG beside output_file, a wandb run
    report.compare(["data/eval_teacher.json", "data/eval_student.json"], png=None, wandb=False)  # models x rules
"""

import json
import textwrap
from pathlib import Path


def show(full: dict, output_file: Path, wandb: bool) -> None:
    """Everything a finished evaluation shows, from its results JSON (`full`); a wandb eval run too with `wandb`."""
    if full["task"] == "generative":
        print_generative_report(full)
        print(f"evaluate: results -> {output_file}")
    else:
        png = output_file.with_suffix(".png")
        plot_confusion(full, png, f"{Path(full['model_path']).name}: {full['mode']}, {full['split']}")
        print_report(full)
        print(f"evaluate: results -> {output_file}, heatmap -> {png}")
    if wandb:
        log_wandb(full, output_file)


def fmt(value, percent=True):
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3g}"


def print_live(examples):
    right = seen = 0
    for e in examples:
        if e["gold"] is not None:
            seen += 1
            right += e["prediction"] == e["gold"]
        mark = "?" if e["gold"] is None else ("✓" if e["prediction"] == e["gold"] else "✗")
        text = e["text"].replace("\n", " ")[:60]
        print(f"{mark} pred={e['prediction'] or 'UNPARSED':<8} gold={e['gold'] or '-':<3} "
              f"acc={fmt(right / seen if seen else None):>6}  {text}")


def print_live_generative(examples):
    passed = 0
    for seen, e in enumerate(examples, start=1):
        passed += e["passed"]
        text, answer = (value.replace("\n", " ") for value in (e["text"][:40], e["answer"][:50]))
        why = "" if e["passed"] else f" [{e['reason'] if e['reason'] != 'ok' else 'check failed'}]"
        print(f"{'✓' if e['passed'] else '✗'} strict={fmt(passed / seen):>6}  {text!r} -> {answer or 'EMPTY'!r}{why}")


def print_generative_report(r):
    print(f"\n== {r['mode']} | {r['model_path']} | {r['split']} split of {r['test_file']}, n={r['n']}")
    non_answers = ", ".join(f"{k} {v}" for k, v in sorted(r["non_answers"].items())) or "none"
    print(f"strict pass rate: {fmt(r['strict_pass_rate'])} ({r['n_strict_passed']} of {r['n']} pass the check and "
          f"answer the question)   check alone: {fmt(r['check_pass_rate'])} ({r['check_description']})   "
          f"chrF vs teacher: {fmt(r['agreement_with_teacher_chrf'], False)} (n={r['n_with_teacher']})")
    print(f"not answers: {non_answers}")
    if r.get("judge_model"):
        print(f"judge {r['judge_model']}: judged pass rate {fmt(r['judged_pass_rate'])} (n={r['n_judged']}, "
              f"{r['judge_unparsed']} unparsed); agrees with the strict pass on {fmt(r['agreement_with_strict'])} "
              f"(judge yes / strict no: {r['judge_yes_strict_no']}, judge no / strict yes: {r['judge_no_strict_yes']})")
    print(f"mean answer: {r['mean_answer_chars']:.1f} characters, {r['mean_answer_tokens']:.1f} tokens; "
          f"{r['empty_answers']} empty")
    if r.get("rules"):
        print_rules(r)
    for failure in r["failures"][:3]:
        print(f"failed ({failure['reason']}): {failure['text'][:50]!r} -> {failure['answer'][:80]!r}")
    print_cost(r["cost"])


def print_rules(r):
    """Each rule's pass rate, and beside the teacher's answers its rate, the transfer and the answers lost/gained."""
    print(f"rules: all pass {fmt(r['all_rules_pass_rate'])} ({r['n_all_rules_passed']} of {r['n']}); strict "
          f"non-answer rate {fmt(r['non_answer_rate'])}")
    print(f"  {'rule':24} {'pass':>7} {'teacher':>8} {'transfer':>8} {'lost':>5} {'gained':>6}  what it asks")
    for rule_id, rule in r["rules"].items():
        teacher = "teacher_pass_rate" in rule
        print(f"  {rule_id + ('*' if rule['baseline_follows'] else ''):24} {fmt(rule['pass_rate']):>7} "
              f"{fmt(rule.get('teacher_pass_rate')):>8} {fmt(rule.get('transfer')):>8} "
              f"{rule['lost'] if teacher else '-':>5} {rule['gained'] if teacher else '-':>6}  {rule['text']}")
    if any(rule["baseline_follows"] for rule in r["rules"].values()):
        print("  * the base model follows this rule without the prompt (the prompt file says baseline_follows)")


def print_report(r):
    print(f"\n== {r['mode']} | {r['model_path']} | {r['split']} split of {r['test_file']}, n={r['n']}")
    print(f"accuracy vs gold '{r['gold_field']}': {fmt(r['accuracy_vs_gold'])} (n={r['n_with_gold']})   "
          f"agreement with teacher: {fmt(r['agreement_with_teacher'])} (n={r['n_with_teacher']})   "
          f"parse rate: {fmt(r['parse_rate'])} ({r['unparsed']} unparsed)")
    baselines = r.get("baselines", {})
    if baselines:
        print("baselines on the same rows: " + ", ".join(
            f"{name} {fmt(b['accuracy'])}" + (f" ('{b['label']}')" if "label" in b else "")
            for name, b in baselines.items()))
    if "confusion_matrix" in r:
        cm = r["confusion_matrix"]
        short = [c if c != "unparsed" else "unp" for c in cm["columns_predicted"]]
        print("\nconfusion matrix (rows gold, columns predicted):\n      " + " ".join(f"{c:>4}" for c in short))
        for label, row in zip(cm["rows_gold"], cm["matrix"]):
            print(f"{label:>5} " + " ".join(f"{v:>4}" if v else "   ." for v in row))
        print("\nlabel  precision recall    f1  support")
        for label, s in r["per_label"].items():
            print(f"{label:>5}  {s['precision']:9.2f} {s['recall']:6.2f} {s['f1']:5.2f} {s['support']:8d}")
        print(f"macro F1 {r['macro_f1']:.3f}")
        for worst in r["worst_labels"]:
            print(f"worst: {worst['label']} (F1 {worst['f1']:.2f}): " + "; ".join(
                f"{e['text'][:40]!r} -> {e['predicted']}" for e in worst["errors"]))
    print_cost(r["cost"])


def print_cost(c):
    print(f"cost: {c['input_tokens_per_request']:.1f} input tokens/request, median latency "
          f"{fmt(c['median_latency_seconds'], False)} s (batch 1, {c['latency_requests']} requests), "
          f"{c['requests_per_second']} requests/s batched"
          + (f", {c['output_tokens_per_request']:.1f} output tokens/request" if "output_tokens_per_request" in c
             else ""))
    if "vs_teacher_with_prompt" in c:
        v = c["vs_teacher_with_prompt"]
        print(f"vs the teacher with its prompt: {v['input_tokens']:.1f}x fewer input tokens"
              + (f", {v['median_latency']:.1f}x lower median latency" if "median_latency" in v else ""))


def plot_confusion(results, path: Path, title: str):
    if "confusion_matrix" not in results:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = results["confusion_matrix"]
    matrix = np.array(cm["matrix"])
    fig, ax = plt.subplots(figsize=(9, 7.5))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cm["columns_predicted"])), cm["columns_predicted"], rotation=45)
    ax.set_yticks(range(len(cm["rows_gold"])), cm["rows_gold"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black", fontsize=8)
    ax.set_title(f"{title}\naccuracy vs gold {fmt(results['accuracy_vs_gold'])}, n={results['n_with_gold']}",
                 fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What a wandb eval run's summary holds, per kind of task.
SUMMARY_KEYS = {
    "label": ("accuracy_vs_gold", "agreement_with_teacher", "parse_rate", "n"),
    "generative": ("strict_pass_rate", "n_strict_passed", "check_pass_rate", "agreement_with_teacher_chrf",
                   "n_with_teacher", "mean_answer_chars",
                   "mean_answer_tokens", "empty_answers", "n", "non_answer_rate"),
}


def log_wandb(full, output_file: Path):
    import os

    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prompt-distillation"), job_type="eval",
                     name=f"eval-{Path(full['model_path']).name}-{full['split']}",
                     config={k: full[k] for k in ("mode", "model_path", "serving", "test_file", "split")})
    run.summary.update({k: full[k] for k in SUMMARY_KEYS[full["task"]]})
    run.summary.update({f"cost/{k}": v for k, v in full["cost"].items() if not isinstance(v, dict)})
    if full["task"] == "generative":
        run.summary.update({f"rules/{rule_id}": rule["pass_rate"] for rule_id, rule in full.get("rules", {}).items()})
        if full.get("rules"):
            run.summary["all_rules_pass_rate"] = full["all_rules_pass_rate"]
        columns = ["id", "text", "answer", "passed", "check_passed", "reason", "teacher", "chrf"]
        table = wandb.Table(columns=columns, data=[[e.get(c) for c in columns] for e in full["examples"]])
        run.log({"answers": table})
        run.finish()
        return
    if "confusion_matrix" in full:
        cm = full["confusion_matrix"]
        keep = [e for e in full["examples"] if e["gold"] is not None]
        columns = cm["columns_predicted"]
        run.log({
            "confusion_matrix": wandb.plot.confusion_matrix(
                y_true=[columns.index(e["gold"]) for e in keep],
                preds=[columns.index(e["prediction"] or "unparsed") for e in keep], class_names=columns),
            "confusion_matrix_png": wandb.Image(str(output_file.with_suffix(".png"))),
        })
    table = wandb.Table(columns=["id", "text", "gold", "prediction", "raw"])
    for e in full["examples"]:
        table.add_data(e["id"], e["text"], e["gold"], e["prediction"], e["raw"])
    run.log({"predictions": table})
    run.finish()


# ---- several results files side by side: models x rules ------------------------------------------------------

COMPARE_EXTRA = ("all rules", "strict pass")


def compare(paths: list[str], png: str | None, wandb: bool) -> Path:
    """`evaluate.py --compare`: a models x rules table of pass rates from results JSONs (a row per file, named by
    the file: eval_teacher.json is "teacher"), printed and drawn as a heatmap PNG (`png`, else rules_compare.png
    beside the first file); logged to wandb as a table and the image with `wandb`. Returns the PNG's path."""
    models = {}
    for path in paths:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        if results.get("task") != "generative":
            raise ValueError(f"{path}: not a generative task's results; --compare shows the rules of generative tasks")
        models[model_name(Path(path), paths)] = results
    columns, rows = compare_table(models)
    titles = print_compare(models, columns, rows)
    png = Path(png) if png else Path(paths[0]).with_name("rules_compare.png")
    plot_compare(titles, rows, png)
    print(f"evaluate: heatmap -> {png}")
    if wandb:
        log_compare(columns, rows, png)
    return png


def model_name(path: Path, paths: list[str]) -> str:
    """The file's stem without 'eval_' (the demo's eval_teacher.json -> teacher); with its folder when two files
    share a stem."""
    name = path.stem.removeprefix("eval_")
    return name if sum(Path(other).stem == path.stem for other in paths) == 1 else f"{path.parent.name}/{name}"


def compare_table(models: dict[str, dict]) -> tuple[list[str], list[tuple[str, list]]]:
    """(column names: every rule id in order of first appearance, then COMPARE_EXTRA; [(model, pass rates)]), a
    rate None where a model's results lack the rule (e.g. a judged rule scored without --judge_model)."""
    rule_ids = list(dict.fromkeys(rule_id for results in models.values() for rule_id in results.get("rules", {})))
    rows = [(name, [results.get("rules", {}).get(rule_id, {}).get("pass_rate") for rule_id in rule_ids]
             + [results.get("all_rules_pass_rate"), results["strict_pass_rate"]])
            for name, results in models.items()]
    return rule_ids + list(COMPARE_EXTRA), rows


def print_compare(models: dict[str, dict], columns: list[str], rows: list[tuple[str, list]]) -> list[str]:
    """Prints the table and its notes; returns the column titles, a rule the base follows marked with *."""
    follows = {rule_id for results in models.values() for rule_id, rule in results.get("rules", {}).items()
               if rule["baseline_follows"]}
    titles = [column + ("*" if column in follows else "") for column in columns]
    width = max(len(name) for name, _ in rows) + 2
    print(f"{'':{width}}" + "  ".join(f"{title:>{max(len(title), 6)}}" for title in titles))
    for name, rates in rows:
        print(f"{name:{width}}" + "  ".join(f"{fmt(rate):>{max(len(title), 6)}}" for rate, title in zip(rates, titles)))
    texts = {rule_id: rule["text"] for results in models.values() for rule_id, rule in results.get("rules", {}).items()}
    some = next(iter(models.values()))
    notes = ["; ".join(f"{rule_id}: {text}" for rule_id, text in texts.items()),
             f"n={some['n']} answers per model ({some['split']} split of {some['test_file']}); all rules = every rule "
             f"passes (IFEval's prompt-level strict); strict pass = the check passes and the answer is an answer"
             + ("; * the base model follows the rule without the prompt" if follows else "")]
    print("\n".join(textwrap.fill(note, 118) for note in notes))
    return titles


def plot_compare(columns: list[str], rows: list[tuple[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array([[np.nan if rate is None else 100 * rate for rate in rates] for _, rates in rows])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.2 + 0.55 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title("pass rate per rule (%); * the base model follows the rule without the prompt", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_compare(columns: list[str], rows: list[tuple[str, list]], png: Path) -> None:
    import os

    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prompt-distillation"), job_type="compare",
                     name=f"compare-{'-'.join(name for name, _ in rows)}")
    run.log({"rules_table": wandb.Table(columns=["model", *columns], data=[[name, *rates] for name, rates in rows]),
             "rules_heatmap": wandb.Image(str(png))})
    run.finish()
