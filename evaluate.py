"""Stage 3: how the student does on data it never trained on, against gold labels and against its teacher.

    python evaluate.py --model_path models/<run>                        # the student, no prompt, held-out split
    python evaluate.py --model_path models/SmolLM2-135M-Instruct --with_prompt --constrain_labels \
        --output_file data/eval_teacher.json                            # the teacher given the prompt, same rows
    python evaluate.py --model_path models/<run> --teacher_file data/eval_teacher.json   # + agreement, cost ratio

Runs through vLLM, batched and greedy. A LoRA adapter is served with vLLM's LoRA support on GPU (max_lora_rank from
every rank in the adapter); on CPU, where that path is >10x slower, or with --merge_lora, it is merged once into
<adapter>/merged and served as a plain model. The report says which path ran. max_model_len defaults to the longest
prompt plus --max_tokens. Scores the held-out side of the group split train_sft_trl.py used: a --heldout_fraction or
--split_seed other than the adapter's (from its distill_run.json) is refused; --split train|all is allowed and the
report says those rows were trained on.

--teacher_file takes stage 1's JSONL or a results JSON of a --with_prompt run (which also yields the cost ratio).
Writes the results JSON (metrics, confusion matrix, per-example predictions with raw outputs) and a PNG heatmap
beside it; logs the same to wandb when WANDB_API_KEY or WANDB_MODE is set.

A generative prompt file (a `check` instead of labels, e.g. prompts/in_short.md) is scored strictly: an answer passes
when the check passes and it is an answer (not cut at --max_tokens, empty, a restatement of the prompt, a loop, or
off its question's topic; distill/checks.py). The report gives that strict pass rate, the check's rate alone, the
count of each reason, chrF against the teacher's answer to the same query (with --teacher_file), mean answer
length and cost; no heatmap. The student then answers in up to 64 tokens (--max_tokens). --judge_model M also has
model M grade every answer against the prompt's judge_rubric (prompts/judge.md), and reports how often it agrees
with the strict pass.

    python evaluate.py --model_path models/<run> --prompt_file prompts/answer_in_french.md \
        --test_file example-data/general_questions.jsonl --teacher_file data/french.jsonl
"""

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from distill import engine, serving
from distill.prompts import DEFAULT_PROMPT, load_prompt, render, render_teacher, student_messages
from distill.records import InputError, RunRecord, read_jsonl, read_queries
from distill.splits import HELDOUT_FRACTION, SPLIT_SEED, select


def build_parser():
    """Every flag of stage 3, vLLM's engine flags included; builds no model."""
    import os

    engine.configure_env()
    parser = engine.stage_parser(__doc__)
    parser.add_argument("--model-path", help="LoRA adapter dir or full model (unset: the newest adapter in models/)")
    parser.add_argument("--base-model", help="base of the adapter (unset: from adapter_config.json)")
    parser.add_argument("--test-file", default="example-data/language_id.jsonl",
                        help=".txt, .jsonl/.csv with a text column, or a datasets name")
    parser.add_argument("--text-field", default="text", help="the query column of a .jsonl/.csv/datasets input")
    parser.add_argument("--label-field", default="label", help="gold label column (rows without one: no accuracy)")
    parser.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                        help="which side of the group split to score (train/all: rows the adapter trained on)")
    parser.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION,
                        help="share of groups held out; must be the adapter's (from its distill_run.json)")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                        help="seed of the group split; must be the adapter's")
    parser.add_argument("--max-samples", type=int, help="score only the first N rows of the split")
    parser.add_argument("--output-file", help="results JSON (unset: <model_path>/eval_<split>.json)")
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT), help="label set; the prompt with --with_prompt")
    parser.add_argument("--with-prompt", action="store_true",
                        help="evaluate a teacher/base model given the prompt, parsed exactly as stage 1 parses")
    parser.add_argument("--constrain-labels", action="store_true", help="with --with_prompt: as create_data.py's")
    parser.add_argument("--teacher-file", help="stage-1 JSONL or a --with_prompt results JSON: adds agreement")
    parser.add_argument("--max-tokens", type=int,
                        help="unset: 16 for the student on a label task, 64 on a generative task, 8192 with "
                             "--with_prompt")
    parser.add_argument("--latency-requests", type=int, default=20,
                        help="requests timed one at a time for the median latency (0 to skip)")
    parser.add_argument("--judge-model",
                        help="generative tasks: a model served through vLLM that grades each answer (does it answer "
                             "the question and follow the prompt's judge_rubric?); reports the judged pass rate and "
                             "its agreement with the strict pass")
    parser.add_argument("--judge-max-tokens", type=int, default=8192,
                        help="the judge's budget per verdict, reasoning included")
    parser.add_argument("--no-lingua", action="store_true", help="skip the lingua baseline")
    parser.add_argument("--quiet", action="store_true", help="no line per sample")
    parser.add_argument("--merge-lora", action="store_true",
                        help="on GPU, serve the adapter merged into its base (bf16) instead of through vLLM's LoRA "
                             "support (on CPU merging is the default)")
    # As train_sft_trl.py: wandb when WANDB_API_KEY or WANDB_MODE is set, and --report_to none turns it off.
    parser.add_argument("--report-to", choices=["wandb", "none"],
                        default="wandb" if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "none",
                        help="log the results as a wandb eval run")
    engine.add_engine_args(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model_path = args.model_path or newest_adapter()
    if args.constrain_labels and not args.with_prompt:
        parser.error("--constrain_labels applies to --with_prompt runs; the student is scored on what it writes")
    return args


def newest_adapter(root: Path = Path("models")) -> str:
    adapters = sorted(root.glob("*/adapter_config.json"), key=lambda p: p.stat().st_mtime)
    if not adapters:
        sys.exit("error: no --model_path given and no adapter under models/; run train_trl.sh first")
    return str(adapters[-1].parent)


def default_max_tokens(with_prompt: bool, generative: bool) -> int:
    # A label student answers in a few tokens; a free-form answer of a sentence or two needs room.
    if with_prompt:
        return 8192
    return 64 if generative else 16


def load_teacher_labels(path: str) -> tuple[dict, dict | None]:
    """id -> teacher label (or generative answer), and the cost block when the file is a --with_prompt results
    JSON. A generative teacher's empty answer (its output broke the contract) is no reference and is left out."""
    if path.endswith(".jsonl"):
        return {row["id"]: row["messages"][-1]["content"] for row in read_jsonl(path)}, None
    results = json.loads(Path(path).read_text())
    if results.get("task") == "generative":
        return {e["id"]: e["answer"] for e in results["examples"] if e["answer"]}, results.get("cost")
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
    if args.constrain_labels and prompt.is_generative:
        sys.exit(f"error: --constrain_labels needs a label set, and {args.prompt_file} declares a generative task")
    args.max_tokens = args.max_tokens or default_max_tokens(args.with_prompt, prompt.is_generative)
    rows = select(queries.rows, args.split, args.heldout_fraction, args.split_seed)[: args.max_samples]
    if not rows:
        sys.exit(f"error: no rows of {args.test_file} on the {args.split} split")

    model_path = Path(args.model_path)
    try:
        split_check = serving.check_split(model_path, args.split, args.heldout_fraction, args.split_seed)
        served = serving.serve(model_path, args.base_model, args.merge_lora, engine.on_gpu())
    except ValueError as error:
        sys.exit(f"error: {error}")
    for note in split_check.notes:
        print(f"evaluate: {note}", file=sys.stderr)
    if args.teacher_file and not serving.shares_ids(teacher_labels, rows):
        print(f"evaluate: warning: {args.teacher_file} shares no id with the {len(rows)} rows of the {args.split} "
              f"split scored: no agreement with the teacher to report", file=sys.stderr)
    mode = "teacher/base model with the prompt" if args.with_prompt else "student without the prompt"
    print(f"evaluate: {mode}, {args.model_path} ({served.description}); {len(rows)} rows of {args.test_file} "
          f"({args.split} split)")

    from transformers import AutoTokenizer

    # Loaded before the engine starts, since max_model_len depends on the prompts; an adapter's own tokenizer is
    # the one it trained with (and the one its merged copy carries).
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_path,
                                              trust_remote_code=args.trust_remote_code)
    if args.with_prompt:
        texts = [render_teacher(tokenizer, prompt.teacher_messages(row["text"])) for row in rows]
    else:
        texts = [render(tokenizer, student_messages(row["text"])) for row in rows]
    prompt_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    if args.max_model_len is None:
        served.engine_overrides["max_model_len"] = serving.max_model_len(
            prompt_ids, args.max_tokens, served.config_source, args.trust_remote_code)
    llm = engine.build_llm(args, **served.engine_overrides)
    generation = generate(llm, tokenizer, rows, prompt_ids, prompt, args, served.lora_request())
    served_max_model_len = llm.model_config.max_model_len

    teacher = [teacher_labels.get(row["id"]) for row in rows] if args.teacher_file else None
    if prompt.is_generative:
        results = generative_results(prompt, rows, prompt_ids, generation, teacher, tokenizer, args.quiet)
    else:
        results = label_results(prompt, rows, prompt_ids, generation, teacher, args)
    if args.judge_model and prompt.is_generative:
        del llm  # the judge gets the memory of the model it grades
        results.update(judged(args, prompt, results["examples"]))
    examples = results.pop("examples")
    results["cost"] = cost(prompt_ids, generation, prompt.is_generative)
    if teacher_cost and not args.with_prompt:
        results["cost"]["vs_teacher_with_prompt"] = cost_ratio(teacher_cost, results["cost"])
    output_file = Path(args.output_file or model_path / f"eval_{args.split}.json")
    full = {
        "mode": mode,
        "model_path": str(model_path),
        "serving": served.description,
        "max_model_len": served_max_model_len,
        "sampling": generation.sampling,
        "split_check": dataclasses.asdict(split_check),
        "test_file": args.test_file,
        "split": args.split,
        "gold_field": args.label_field,
        "teacher_file": args.teacher_file,
        **results,
        "examples": examples,
    }
    record.finish(output_file, **full)
    if prompt.is_generative:
        print_generative_report(full)
        print(f"evaluate: results -> {output_file}")
    else:
        plot_confusion(results, output_file.with_suffix(".png"), f"{Path(args.model_path).name}: {mode}, {args.split}")
        print_report(full)
        print(f"evaluate: results -> {output_file}, heatmap -> {output_file.with_suffix('.png')}")
    if args.report_to == "wandb":
        log_wandb(full, output_file)


def label_results(prompt, rows, prompt_ids, generation, teacher, args) -> dict:
    """Accuracy, agreement, confusion matrix, baselines and the examples of a label task."""
    from distill.metrics import lingua_predictions, score, worst_labels

    golds = [row.get(args.label_field) for row in rows]
    predictions = generation.answers
    examples = [
        {"id": row["id"], "text": row["text"], "gold": gold, "prediction": pred, "raw": raw,
         **({"teacher": t} if teacher else {}), "input_tokens": len(ids)}
        for row, gold, pred, raw, ids, t in zip(rows, golds, predictions, generation.raw, prompt_ids,
                                                teacher or [None] * len(rows))
    ]
    if not args.quiet:
        print_live(examples)
    results = {"task": "label", **score(golds, predictions, prompt.labels, teacher)}
    results["worst_labels"] = worst_labels(results, examples)
    if not args.no_lingua and any(g is not None for g in golds):
        lingua = lingua_predictions([row["text"] for row in rows], prompt.labels)
        results.setdefault("baselines", {})["lingua"] = {
            "accuracy": score(golds, lingua, prompt.labels)["accuracy_vs_gold"],
            "agreement_with_teacher": score(golds, lingua, prompt.labels, teacher)["agreement_with_teacher"],
        }
    return {**results, "examples": examples}


def generative_results(prompt, rows, prompt_ids, generation, teacher, tokenizer, quiet: bool) -> dict:
    """Strict pass rate (the prompt's check passes and the answer is an answer: not cut, empty, an echo of the
    prompt, a loop or off topic), the check's rate alone, chrF against the teacher's answers, lengths, failures
    and examples. Every answer is judged as written within --max_tokens; a cut one fails strictly and is kept."""
    from distill.checks import describe
    from distill.metrics import judge_answers, score_generative

    answers = [answer or "" for answer in generation.answers]
    teacher = teacher or [None] * len(rows)
    judged = judge_answers(prompt, [row["text"] for row in rows], answers, generation.reasons, teacher)
    examples = []
    for row, answer, raw, ids, output_tokens, reference, verdict in zip(
            rows, answers, generation.raw, prompt_ids, generation.output_tokens, teacher, judged):
        known = {"teacher": reference, "chrf": verdict["chrf"]} if reference is not None else {}
        examples.append({"id": row["id"], "text": row["text"], "answer": answer, "passed": verdict["passed"],
                         "check_passed": verdict["check_passed"], "reason": verdict["reason"], **known,
                         "raw": raw, "input_tokens": len(ids), "output_tokens": output_tokens,
                         "answer_tokens": len(tokenizer(answer, add_special_tokens=False).input_ids)})
    if not quiet:
        print_live_generative(examples)
    return {"task": "generative", "check": prompt.check, "check_description": describe(prompt.check),
            **score_generative(examples), "examples": examples}


def judged(args, prompt, examples: list[dict]) -> dict:
    """--judge_model: each answer graded by the judge (examples gain "judge": True/False/None), the judged pass
    rate and its agreement with the strict pass."""
    import gc

    from transformers import AutoTokenizer

    from distill.judge import agreement, judge_answers
    from distill.teacher import sampling_params

    gc.collect()
    llm = engine.build_llm(args, model=args.judge_model)
    tokenizer = AutoTokenizer.from_pretrained(args.judge_model, trust_remote_code=args.trust_remote_code)
    params = sampling_params(llm.get_default_sampling_params(), {"temperature": 0.0}, max_tokens=args.judge_max_tokens)
    verdicts = judge_answers(llm, tokenizer, prompt, [e["text"] for e in examples], [e["answer"] for e in examples],
                             params)
    for example, verdict in zip(examples, verdicts):
        example["judge"] = verdict
    return {"judge_model": args.judge_model, **agreement(verdicts, [e["passed"] for e in examples])}


def cost(prompt_ids, generation, generative: bool) -> dict:
    figures = {
        "input_tokens_per_request": statistics.mean(len(ids) for ids in prompt_ids),
        "median_latency_seconds": statistics.median(generation.latencies) if generation.latencies else None,
        "latency_requests": len(generation.latencies),
        "batch_seconds": round(generation.seconds, 2),
        "requests_per_second": round(len(prompt_ids) / generation.seconds, 2),
    }
    if generative:  # free text: what the model writes (reasoning included) costs as much as what it reads
        figures["output_tokens_per_request"] = statistics.mean(generation.output_tokens)
    return figures


@dataclasses.dataclass
class Generation:
    raw: list[str]  # every row's output as the model wrote it
    answers: list[str | None]  # labels (None: unparsed), or generative answers (None: broke the contract)
    output_tokens: list[int]
    reasons: list[str]  # "ok", or why the output broke the answer contract (a generative task's cut / empty / ...)
    seconds: float
    latencies: list[float]
    sampling: dict


def generate(llm, tokenizer, rows, prompt_ids, prompt, args, lora_request) -> Generation:
    """Greedy answers for every row, then a few rows one at a time for latency. Greedy (temperature 0) is
    evaluation's one override of the model's sampling defaults. With --with_prompt the rows go through stage 1's
    teacher path (distill.teacher: same rendering, constraint and parsing, no redraws), so a query gets the label
    (or generative answer) create_data.py gives it at --temperature 0."""
    from distill.teacher import Teacher, VllmEngine, effective_sampling, sampling_params

    teacher = None
    if args.with_prompt:
        teacher = Teacher(tokenizer, prompt, llm.model_config.max_model_len, args.constrain_labels)
    # The task's stop strings hold for every model scored on it (base, teacher, student), so answers compare alike.
    params = sampling_params(llm.get_default_sampling_params(), {"temperature": 0.0}, max_tokens=args.max_tokens,
                             structured_outputs=teacher.constraint() if teacher else None, **prompt.stop_sampling())
    if teacher:
        answer, items = teacher_answers(VllmEngine(llm, lora_request), teacher, params), rows
    else:
        answer, items = student_answers(llm, params, lora_request, prompt), prompt_ids
    started = time.time()
    outputs, answers, output_tokens, reasons = answer(items)
    seconds = time.time() - started
    latencies = []
    for item in items[: args.latency_requests]:
        started = time.time()
        answer([item])
        latencies.append(time.time() - started)
    return Generation(outputs, answers, output_tokens, reasons, seconds, latencies, effective_sampling(params))


def teacher_answers(vllm_engine, teacher, params):
    from distill.answers import split_reasoning
    from distill.teacher import stream

    def answer(rows):
        """Answers stream back in any order; each is put back in its row's place by id."""
        answers = stream(vllm_engine, teacher, rows, params, max_in_flight=vllm_engine.max_num_seqs)
        by_id = {a.row["id"]: a for a in answers}
        answers = [by_id[row["id"]] for row in rows]
        first = [(a.samples + a.failures)[0] if a.samples + a.failures else None for a in answers]
        raw = [sample.text if sample else "" for sample in first]
        # The contract alone (no query: echo, loop and topic are judged with the student's answers, in one place).
        reasons = [teacher.parse(sample.text, sample.finish_reason).reason if sample else "empty_answer"
                   for sample in first]
        if teacher.prompt.is_generative:
            # Scored as written within --max_tokens, cut or not, exactly as the student's answers are: stage 1
            # refuses a cut answer as a training target, but a score must measure teacher and student alike.
            labels = [(split_reasoning(text, teacher.expects_reasoning)[0] or "").strip() for text in raw]
        else:
            labels = [a.label for a in answers]
        return raw, labels, [sample.output_tokens if sample else 0 for sample in first], reasons

    return answer


def student_answers(llm, params, lora_request, prompt):
    """The student answers with a bare label, or on a generative task with its whole (stripped) text."""
    from vllm.inputs import TokensPrompt

    from distill.answers import parse_generative, parse_student

    def answer(prompt_ids):
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        completions = [o.outputs[0] for o in llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)]
        outputs = [completion.text for completion in completions]
        if prompt.is_generative:
            answers = [text.strip() for text in outputs]
            reasons = [parse_generative(c.text, c.finish_reason).reason for c in completions]
        else:
            answers = [parse_student(text, prompt.labels) for text in outputs]
            reasons = ["ok" if label else "unparsed" for label in answers]
        return outputs, answers, [len(completion.token_ids) for completion in completions], reasons

    return answer


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


if __name__ == "__main__":
    main()
