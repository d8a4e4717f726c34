"""How evaluate.py shows its results: a line per example as they are scored, the console report (accuracy beside the
baselines and the confusion matrix, or a generative task's pass rates), the confusion-matrix PNG, and the wandb eval
run. The numbers themselves come from distill/metrics.py and are saved in the results JSON before any of this runs.

    report.show(results, output_file, wandb=True)   # the console report, the PNG beside output_file, a wandb run
"""

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
    for failure in r["failures"][:3]:
        print(f"failed ({failure['reason']}): {failure['text'][:50]!r} -> {failure['answer'][:80]!r}")
    print_cost(r["cost"])


def print_report(r):
    print(f"\n== {r['mode']} | {r['model_path']} | {r['split']} split of {r['test_file']}, n={r['n']}")
    print(f"accuracy vs gold '{r['gold_field']}': {fmt(r['accuracy_vs_gold'])} (n={r['n_with_gold']})   "
          f"agreement with teacher: {fmt(r['agreement_with_teacher'])} (n={r['n_with_teacher']})   "
          f"parse rate: {fmt(r['parse_rate'])} ({r['unparsed']} unparsed)")
    baselines = r.get("baselines", {})
    if baselines:
        print("baselines on the same rows: " + ", ".join(
            f"{name} {fmt(b['accuracy'])}" + (f" ('{b['label']}')" if "label" in b else "") for name, b in baselines.items()))
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
    ax.set_title(f"{title}\naccuracy vs gold {fmt(results['accuracy_vs_gold'])}, n={results['n_with_gold']}", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What a wandb eval run's summary holds, per kind of task.
SUMMARY_KEYS = {
    "label": ("accuracy_vs_gold", "agreement_with_teacher", "parse_rate", "n"),
    "generative": ("strict_pass_rate", "n_strict_passed", "check_pass_rate", "agreement_with_teacher_chrf", "n_with_teacher", "mean_answer_chars",
                   "mean_answer_tokens", "empty_answers", "n"),
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
