"""Stage 3: how the student does on data it never trained on, against gold labels and against its teacher.

    python evaluate.py --model_path models/<run>                        # the student, no prompt, held-out split
    python evaluate.py --model_path models/SmolLM2-135M-Instruct --with_prompt --constrain_labels \
        --output_file data/eval_teacher.json                            # the teacher given the prompt, same rows
    python evaluate.py --model_path models/<run> --teacher_file data/eval_teacher.json   # + agreement, cost ratio

Runs through vLLM, batched and greedy. A LoRA adapter is served with vLLM's LoRA support on GPU; on CPU, where
that path is >10x slower, it is merged once into <adapter>/merged and served as a plain model. The report says
which path ran. Scores the held-out side of the group split train_sft_trl.py uses (--split to change it).

--teacher_file takes stage 1's JSONL or a results JSON of a --with_prompt run (which also yields the cost ratio).
Writes the results JSON (metrics, confusion matrix, per-example predictions with raw outputs) and a PNG heatmap
beside it; logs the same to wandb when WANDB_API_KEY or WANDB_MODE is set.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from distill import engine
from distill.prompts import DEFAULT_PROMPT, load_prompt, render, render_teacher, student_messages
from distill.records import InputError, RunRecord, read_jsonl, read_queries
from distill.splits import HELDOUT_FRACTION, SPLIT_SEED, select


def parse_args(argv=None):
    engine.configure_env()
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help="LoRA adapter dir or full model (default: newest adapter in models/)")
    parser.add_argument("--base-model", help="base of the adapter (default: from adapter_config.json)")
    parser.add_argument("--test-file", default="example-data/language_id.jsonl")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label", help="gold label column (rows without one: no accuracy)")
    parser.add_argument("--split", choices=["heldout", "train", "all"], default="heldout")
    parser.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION)
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--output-file", help="results JSON (default: <model_path>/eval_<split>.json)")
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT), help="label set; the prompt with --with_prompt")
    parser.add_argument("--with-prompt", action="store_true",
                        help="evaluate a teacher/base model given the prompt, parsed exactly as stage 1 parses")
    parser.add_argument("--constrain-labels", action="store_true", help="with --with_prompt: as create_data.py's")
    parser.add_argument("--teacher-file", help="stage-1 JSONL or a --with_prompt results JSON: adds agreement")
    parser.add_argument("--max-tokens", type=int, help="default 16 for the student, 8192 with --with_prompt")
    parser.add_argument("--latency-requests", type=int, default=20,
                        help="requests timed one at a time for the median latency (0 to skip)")
    parser.add_argument("--no-lingua", action="store_true", help="skip the lingua baseline")
    parser.add_argument("--quiet", action="store_true", help="no line per sample")
    engine.add_engine_args(parser)
    args = parser.parse_args(argv)
    args.model_path = args.model_path or newest_adapter()
    args.max_tokens = args.max_tokens or (8192 if args.with_prompt else 16)
    if args.constrain_labels and not args.with_prompt:
        parser.error("--constrain_labels applies to --with_prompt runs; the student is scored on what it writes")
    return args


def newest_adapter(root: Path = Path("models")) -> str:
    adapters = sorted(root.glob("*/adapter_config.json"), key=lambda p: p.stat().st_mtime)
    if not adapters:
        sys.exit("error: no --model_path given and no adapter under models/; run train_trl.sh first")
    return str(adapters[-1].parent)


def merged_copy(adapter_dir: Path, base_model: str) -> Path:
    """The adapter merged into its base, cached in <adapter>/merged and rebuilt when the adapter changes."""
    import hashlib

    merged = adapter_dir / "merged"
    stamp = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    if (merged / "adapter.sha256").exists() and (merged / "adapter.sha256").read_text() == stamp:
        return merged
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = adapter_dir / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    (tmp / "adapter.sha256").write_text(stamp)
    shutil.rmtree(merged, ignore_errors=True)
    tmp.rename(merged)
    print(f"evaluate: merged the adapter into {merged} ({time.time() - started:.1f} s)")
    return merged


def load_teacher_labels(path: str) -> tuple[dict, dict | None]:
    """id -> teacher label, and the cost block when the file is a --with_prompt results JSON."""
    if path.endswith(".jsonl"):
        return {row["id"]: row["messages"][-1]["content"] for row in read_jsonl(path)}, None
    results = json.loads(Path(path).read_text())
    return {e["id"]: e["prediction"] for e in results["examples"]}, results.get("cost")


def main(argv=None):
    args = parse_args(argv)
    record = RunRecord("evaluate", vars(args))
    try:
        prompt = load_prompt(args.prompt_file)
        queries = read_queries(args.test_file, args.text_field)
        teacher_labels, teacher_cost = load_teacher_labels(args.teacher_file) if args.teacher_file else ({}, None)
    except (InputError, ValueError, OSError, KeyError) as error:
        sys.exit(f"error: {error}")
    rows = select(queries.rows, args.split, args.heldout_fraction, args.split_seed)[: args.max_samples]
    if not rows:
        sys.exit(f"error: no rows of {args.test_file} on the {args.split} split")

    model_path = Path(args.model_path)
    adapter = (model_path / "adapter_config.json").exists()
    serving = "full model"
    lora_request = None
    overrides = {"model": str(model_path)}
    if adapter:
        adapter_config = json.loads((model_path / "adapter_config.json").read_text())
        base_model = args.base_model or adapter_config["base_model_name_or_path"]
        if engine.on_gpu():
            from vllm.lora.request import LoRARequest

            serving = "vLLM LoRA adapter on the base model"
            overrides = {"model": base_model, "enable_lora": True, "max_lora_rank": adapter_config["r"]}
            lora_request = LoRARequest("student", 1, str(model_path))
        else:
            serving = "adapter merged into the base (CPU: vLLM's LoRA path is >10x slower)"
            overrides = {"model": str(merged_copy(model_path, base_model))}
    mode = "teacher/base model with the prompt" if args.with_prompt else "student without the prompt"
    print(f"evaluate: {mode}, {args.model_path} ({serving}); {len(rows)} rows of {args.test_file} "
          f"({args.split} split)")

    llm = engine.build_llm(args, **overrides)
    tokenizer = llm.get_tokenizer()
    if args.with_prompt:
        texts = [render_teacher(tokenizer, prompt.teacher_messages(row["text"])) for row in rows]
    else:
        texts = [render(tokenizer, student_messages(row["text"])) for row in rows]
    prompt_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    expects_reasoning = args.with_prompt and texts[0].rstrip().endswith("<think>")
    outputs, seconds, latencies = generate(llm, prompt_ids, prompt, args, lora_request)
    predictions = [parse(text, prompt, args, expects_reasoning) for text in outputs]

    from distill.metrics import lingua_predictions, score, worst_labels

    golds = [row.get(args.label_field) for row in rows]
    teacher = [teacher_labels.get(row["id"]) for row in rows] if args.teacher_file else None
    examples = [
        {"id": row["id"], "text": row["text"], "gold": gold, "prediction": pred, "raw": raw,
         **({"teacher": t} if teacher else {}), "input_tokens": len(ids)}
        for row, gold, pred, raw, ids, t in zip(rows, golds, predictions, outputs, prompt_ids, teacher or [None] * len(rows))
    ]
    if not args.quiet:
        print_live(examples)
    results = score(golds, predictions, prompt.labels, teacher)
    results["worst_labels"] = worst_labels(results, examples)
    if not args.no_lingua and any(g is not None for g in golds):
        lingua = lingua_predictions([row["text"] for row in rows], prompt.labels)
        results.setdefault("baselines", {})["lingua"] = {
            "accuracy": score(golds, lingua, prompt.labels)["accuracy_vs_gold"],
            "agreement_with_teacher": score(golds, lingua, prompt.labels, teacher)["agreement_with_teacher"],
        }
    results["cost"] = {
        "input_tokens_per_request": statistics.mean(len(ids) for ids in prompt_ids),
        "median_latency_seconds": statistics.median(latencies) if latencies else None,
        "latency_requests": len(latencies),
        "batch_seconds": round(seconds, 2),
        "requests_per_second": round(len(rows) / seconds, 2),
    }
    if teacher_cost and not args.with_prompt:
        results["cost"]["vs_teacher_with_prompt"] = cost_ratio(teacher_cost, results["cost"])
    output_file = Path(args.output_file or model_path / f"eval_{args.split}.json")
    full = {
        "mode": mode,
        "model_path": str(model_path),
        "serving": serving,
        "test_file": args.test_file,
        "split": args.split,
        "gold_field": args.label_field,
        "teacher_file": args.teacher_file,
        **results,
        "examples": examples,
    }
    record.finish(output_file, **full)
    plot_confusion(results, output_file.with_suffix(".png"), f"{Path(args.model_path).name}: {mode}, {args.split}")
    print_report(full)
    print(f"evaluate: results -> {output_file}, heatmap -> {output_file.with_suffix('.png')}")
    log_wandb(full, output_file)


def generate(llm, prompt_ids, prompt, args, lora_request):
    """Greedy outputs for every row in one batched call, then a few requests one at a time for latency."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    constraint = StructuredOutputsParams(choice=list(prompt.labels)) if args.constrain_labels else None
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured_outputs=constraint)
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    started = time.time()
    outputs = llm.generate(requests, params, lora_request=lora_request)
    seconds = time.time() - started
    latencies = []
    for request in requests[: args.latency_requests]:
        started = time.time()
        llm.generate([request], params, lora_request=lora_request, use_tqdm=False)
        latencies.append(time.time() - started)
    return [output.outputs[0].text for output in outputs], seconds, latencies


def parse(text, prompt, args, expects_reasoning):
    from distill.answers import parse_student, parse_teacher

    if args.with_prompt:
        return parse_teacher(text, prompt, expects_reasoning, args.constrain_labels).label
    return parse_student(text, prompt.labels)


def cost_ratio(teacher: dict, student: dict) -> dict:
    ratio = {"input_tokens": teacher["input_tokens_per_request"] / student["input_tokens_per_request"]}
    if teacher.get("median_latency_seconds") and student.get("median_latency_seconds"):
        ratio["median_latency"] = teacher["median_latency_seconds"] / student["median_latency_seconds"]
    return ratio


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
    c = r["cost"]
    print(f"cost: {c['input_tokens_per_request']:.1f} input tokens/request, median latency "
          f"{fmt(c['median_latency_seconds'], False)} s (batch 1, {c['latency_requests']} requests), "
          f"{c['requests_per_second']} requests/s batched")
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


def log_wandb(full, output_file: Path):
    import os

    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        return
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prompt-distillation"), job_type="eval",
                     name=f"eval-{Path(full['model_path']).name}-{full['split']}",
                     config={k: full[k] for k in ("mode", "model_path", "serving", "test_file", "split")})
    run.summary.update({k: full[k] for k in ("accuracy_vs_gold", "agreement_with_teacher", "parse_rate", "n")})
    run.summary.update({f"cost/{k}": v for k, v in full["cost"].items() if not isinstance(v, dict)})
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


if __name__ == "__main__":
    main()
