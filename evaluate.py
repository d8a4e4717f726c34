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

Before anything is scored, the served model must reproduce the adapter's fingerprint.json (written by training,
distill/fingerprint.py, docs/fingerprint.md): the probes' prompts rendered here must be training's ids, and each
probe's mean answer log-probability in the engine training's, within a tolerance set by a noise floor measured at
training; else it stops naming the cause and the fix. A fingerprint whose adapter moves no probe beyond that
tolerance (a dropped adapter would pass) is refused unless --allow_inconclusive. --skip_fingerprint scores anyway
(the results JSON records either); an adapter without a fingerprint gets a warning.

--teacher_file takes stage 1's JSONL or a results JSON of a --with_prompt run (which also yields the cost ratio).
A --test_file of conversations (a messages column) is answered at its last user turn; the student reads the turns
before with the prompt file's student side (student_system_prompt, student_template), refused unless it is the one
the adapter's distill_run.json stores.
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

A prompt file's rules (front matter `rules`, docs/prompt-files.md) are each scored too: every rule's pass rate, the
all-rules pass rate and the strict non-answer rate; with --teacher_file each rule's transfer (this model's rate / the
teacher's) and the answers it lost and gained. --compare draws several results files side by side, no model loaded:

    python evaluate.py --compare data/demo/in_short/eval_base.json data/demo/in_short/eval_teacher.json   # + PNG
"""

import dataclasses
import sys
from collections import Counter
from pathlib import Path

from distill import defaults, engine, fingerprint, input_checks, report, serving
from distill.defaults import STUDENT_MAX_TOKENS, TEACHER_MAX_TOKENS, wandb_enabled
from distill.input_checks import positive_int
from distill.judge import judge_examples
from distill.metrics import cost, cost_ratio
from distill.prompts import BARE_STUDENT, DEFAULT_PROMPT, load_prompt
from distill.records import InputError, RunRecord, load_teacher_answers, query_fields, read_queries
from distill.render import merges_system, query_of, student_ids, student_messages, teacher_ids, teacher_messages
from distill.splits import HELDOUT_FRACTION, SPLIT_SEED, select


def build_parser():
    """Every flag of stage 3, vLLM's engine flags included; builds no model."""
    engine.configure_env()
    parser = engine.stage_parser(__doc__)
    parser.add_argument("--model-path", help="LoRA adapter dir or full model (unset: the newest adapter in models/)")
    parser.add_argument("--base-model", help="base of the adapter (unset: from adapter_config.json)")
    parser.add_argument("--test-file", default="example-data/language_id.jsonl",
                        help="queries as create_data.py reads them: .txt, .jsonl/.csv, .parquet/.arrow, a dataset "
                             "dir or a datasets name, with a text or a messages (conversation) column")
    parser.add_argument("--text-field", default="text", help="the query column of a .jsonl/.csv/datasets input")
    parser.add_argument("--messages-field", default="messages", help="the conversation column, as create_data.py's")
    parser.add_argument("--dataset-split", default="train", help="the split of a dataset dir or datasets name")
    parser.add_argument("--label-field", default="label", help="gold label column (rows without one: no accuracy)")
    parser.add_argument("--ignore-unknown-labels", action="store_true",
                        help="drop (and count) rows whose gold label is outside the prompt's label set instead of "
                             "refusing the test file")
    parser.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                        help="which side of the group split to score (train/all: rows the adapter trained on)")
    parser.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION,
                        help="share of groups held out; must be the adapter's (from its distill_run.json)")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                        help="seed of the group split; must be the adapter's")
    parser.add_argument("--max-samples", type=positive_int, help="score only the first N rows of the split")
    parser.add_argument("--output-file", help="results JSON (unset: <model_path>/eval_<split>.json); with --compare "
                                              "the heatmap PNG (unset: rules_compare.png beside the first FILE)")
    parser.add_argument("--compare", nargs="+", metavar="FILE",
                        help="no model: print a models x rules table of pass rates from these results JSONs and draw "
                             "it as a heatmap PNG (logged to wandb when it is on)")
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT), help="label set; the prompt with --with_prompt")
    parser.add_argument("--with-prompt", action="store_true",
                        help="evaluate a teacher/base model given the prompt, parsed exactly as stage 1 parses")
    parser.add_argument("--constrain-labels", action="store_true", help="with --with_prompt: as create_data.py's")
    parser.add_argument("--teacher-file", help="stage-1 JSONL or a --with_prompt results JSON: adds agreement")
    parser.add_argument("--teacher-min-share", type=float, default=1.0,
                        help="share of the rows scored that --teacher_file must answer (an answer that broke the "
                             "contract counts), else it is refused as made for other rows")
    parser.add_argument("--max-tokens", type=int,
                        help="unset: 16 for the student on a label task, 64 on a generative task, 8192 with "
                             "--with_prompt")
    parser.add_argument("--latency-requests", type=int, default=20,
                        help="requests timed one at a time for the median latency (0 to skip)")
    parser.add_argument("--judge-model",
                        help="generative tasks: a model served through vLLM that grades each answer (does it answer "
                             "the question and follow the prompt's judge_rubric?); reports the judged pass rate and "
                             "its agreement with the strict pass")
    parser.add_argument("--judge-max-tokens", type=int, default=TEACHER_MAX_TOKENS,
                        help="the judge's budget per verdict, reasoning included")
    parser.add_argument("--no-lingua", action="store_true", help="skip the lingua baseline")
    parser.add_argument("--quiet", action="store_true", help="no line per sample")
    parser.add_argument("--skip-fingerprint", action="store_true",
                        help="score without checking that the served model reproduces the adapter's fingerprint.json "
                             "(the results JSON records the skip)")
    parser.add_argument("--allow-inconclusive", action="store_true",
                        help="score an adapter whose fingerprint cannot tell it from its base model (it moves no "
                             "probe beyond the tolerance), with a warning; the results JSON records it")
    parser.add_argument("--merge-lora", action="store_true",
                        help="on GPU, serve the adapter merged into its base (bf16) instead of through vLLM's LoRA "
                             "support (on CPU merging is the default)")
    # As train_sft_trl.py: wandb when WANDB_API_KEY or WANDB_MODE is set, and --report_to none turns it off.
    parser.add_argument("--report-to", choices=["wandb", "none"],
                        default="wandb" if wandb_enabled() else "none",
                        help="log the results as a wandb eval run")
    engine.add_engine_args(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model_path = args.model_path or (None if args.compare else newest_adapter())
    if args.constrain_labels and not args.with_prompt:
        parser.error("--constrain_labels applies to --with_prompt runs; the student is scored on what it writes")
    if not 0 <= args.teacher_min_share <= 1:
        parser.error(f"--teacher_min_share {args.teacher_min_share}: give a share between 0 and 1")
    return args


def newest_adapter(root: Path = Path("models")) -> str:
    adapters = sorted(root.glob("*/adapter_config.json"), key=lambda p: p.stat().st_mtime)
    if not adapters:
        sys.exit("error: no --model_path given and no adapter under models/; run train_trl.sh first")
    return str(adapters[-1].parent)


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    record = RunRecord("evaluate", vars(args))
    prompt, rows, teacher_of, teacher_cost, dropped_labels = read_inputs(args)
    split_check = check_split(args, prompt, rows)
    tokenizer, prompt_ids, system_merged = render_prompts(args, prompt, rows)
    trained = trained_fingerprint(args, tokenizer, prompt.student)  # a template skew stops here, before the engine
    served = serve(args)
    mode = "teacher/base model with the prompt" if args.with_prompt else "student without the prompt"
    print(f"evaluate: {mode}, {args.model_path} ({served.description}); {len(rows)} rows of {args.test_file} "
          f"({args.split} split)")

    if args.max_model_len is None:  # the prompts decide the context, so they are rendered before the engine starts
        served.engine_overrides["max_model_len"] = context_length(args, served, prompt_ids, trained)
    llm = engine.build_llm(args, **served.engine_overrides)
    fingerprint_check = check_served(args, llm, served, trained)
    generation = serving.generate(llm, tokenizer, rows, prompt_ids, prompt, args, served.lora_request())
    served_max_model_len = llm.model_config.max_model_len

    teacher_answers = [teacher_of.get(row["id"]) for row in rows] if args.teacher_file else None
    if prompt.is_generative:
        results = generative_results(prompt, rows, prompt_ids, generation, teacher_answers, tokenizer, args.quiet)
    else:
        results = label_results(prompt, rows, prompt_ids, generation, teacher_answers, args)
    if args.judge_model and prompt.is_generative:
        del llm  # the judge gets the memory of the model it grades
        results.update(judge_examples(args, prompt, results["examples"]))
    examples = results.pop("examples")
    results["cost"] = cost(prompt_ids, generation, prompt.is_generative)
    if teacher_cost and not args.with_prompt:
        results["cost"]["vs_teacher_with_prompt"] = cost_ratio(teacher_cost, results["cost"])

    output_file = results_file(args)
    full = {"mode": mode, "model_path": str(Path(args.model_path)), "serving": served.description,
            "max_model_len": served_max_model_len, "sampling": generation.sampling,
            "split_check": dataclasses.asdict(split_check), "fingerprint": dataclasses.asdict(fingerprint_check),
            "test_file": args.test_file, "split": args.split, "system_merged_into_user": system_merged,
            "student": None if args.with_prompt else prompt.student.to_dict(),
            "gold_field": args.label_field, "unknown_gold_labels_dropped": dict(dropped_labels),
            "teacher_file": args.teacher_file, **results, "examples": examples}
    record.write(output_file, **full)
    report.show(full, output_file, wandb=args.report_to == "wandb")


def results_file(args) -> Path:
    """--output_file, or eval_<split>.json beside the model."""
    return Path(args.output_file or Path(args.model_path) / f"eval_{args.split}.json")


def compare(args) -> None:
    """--compare: the rules of several results files side by side (distill/report.py), no model loaded."""
    try:
        report.compare(args.compare, args.output_file, wandb=args.report_to == "wandb")
    except (ValueError, OSError, KeyError) as error:
        sys.exit(f"error: --compare: {error}")


def read_inputs(args):
    """The task prompt, the rows to score, the teacher's answers by id and its cost (if any), and the gold labels
    outside the label set that --ignore_unknown_labels dropped; bad input and flags fail here, before any model
    loads."""
    try:
        input_checks.check_model("--model_path", args.model_path, "a training run's output dir (an adapter), a model "
                                 "directory or a hub id")
        if args.base_model:
            input_checks.check_model("--base_model", args.base_model)
        input_checks.check_writable("--output_file", results_file(args))
        prompt = load_prompt(args.prompt_file)
        queries = read_queries(args.test_file, args.text_field, args.dataset_split, args.messages_field)
        input_checks.require_rows(args.test_file, queries)
        teacher_of, teacher_cost = load_teacher_answers(args.teacher_file) if args.teacher_file else ({}, None)
    except (InputError, ValueError, OSError, KeyError) as error:
        sys.exit(f"error: {error}")
    if args.constrain_labels and prompt.is_generative:
        sys.exit(f"error: --constrain_labels needs a label set, and {args.prompt_file} declares a generative task")
    # Greedy, so not the model's sampling defaults: what a teacher's answer or the student's label or sentence needs.
    needed = TEACHER_MAX_TOKENS if args.with_prompt else STUDENT_MAX_TOKENS["generative" if prompt.is_generative
                                                                            else "label"]
    args.max_tokens = defaults.max_tokens(args.max_tokens, {}, needed)
    rows = select(queries.rows, args.split, args.heldout_fraction, args.split_seed)[: args.max_samples]
    if not rows:
        sys.exit(f"error: no rows of {args.test_file} on the {args.split} split")
    try:
        rows, dropped = (rows, Counter()) if prompt.is_generative else input_checks.gold_labels(
            rows, queries.places, prompt.labels, args.label_field, args.ignore_unknown_labels)
        if dropped:
            print(f"evaluate: --ignore_unknown_labels: {dropped.total()} rows dropped, their gold {args.label_field} "
                  f"outside the label set ({', '.join(f'{label}: {n}' for label, n in dropped.items())}); "
                  f"{len(rows)} scored", file=sys.stderr)
        if not rows:
            raise InputError(f"{args.test_file}: every row scored has a gold {args.label_field} outside the label set")
        if args.teacher_file:
            input_checks.check_teacher_coverage(args.teacher_file, rows, args.teacher_min_share)
    except (InputError, ValueError, OSError, KeyError) as error:
        sys.exit(f"error: {error}")
    return prompt, rows, teacher_of, teacher_cost, dropped


def check_split(args, prompt, rows) -> serving.SplitCheck:
    """The rows' split and the prompt file's student side against the adapter's run record (a mismatch stops the
    run)."""
    try:
        split_check = serving.check_split(Path(args.model_path), args.split, args.heldout_fraction, args.split_seed)
        if not args.with_prompt:
            serving.check_student(Path(args.model_path), prompt.student)
    except ValueError as error:
        sys.exit(f"error: {error}")
    for note in split_check.notes:
        print(f"evaluate: {note}", file=sys.stderr)
    return split_check


def serve(args) -> serving.Serving:
    """How the model is served: an adapter through vLLM's LoRA support on GPU, else merged (once, cached)."""
    try:
        return serving.serve(Path(args.model_path), args.base_model, args.merge_lora, engine.on_gpu())
    except ValueError as error:
        sys.exit(f"error: {error}")


def context_length(args, served, prompt_ids, trained) -> int:
    """What the data needs: the longest prompt plus --max_tokens, and each fingerprint probe scored whole (+1 token)."""
    needs = [(prompt_ids, args.max_tokens)] + ([([p["input_ids"] for p in trained["probes"]], 1)] if trained else [])
    return max(serving.max_model_len(ids, tokens, served.config_source, args.trust_remote_code)
               for ids, tokens in needs)


def trained_fingerprint(args, tokenizer, student=BARE_STUDENT) -> dict | None:
    """The model's fingerprint.json, after checking that it can tell the adapter from its base (else refused unless
    --allow_inconclusive) and that this evaluation renders its probes' prompts to the ids training did; None when
    skipped or absent (an adapter trained before fingerprints: a warning)."""
    try:
        trained = None if args.skip_fingerprint else fingerprint.load(args.model_path)
        if trained:
            fingerprint.check_conclusive(trained, args.allow_inconclusive)
            fingerprint.check_ids(trained, [student_ids(tokenizer, p["query"], student) for p in trained["probes"]],
                                  tokenizer)
    except fingerprint.FingerprintMismatch as error:
        sys.exit(f"error: {error}")
    if trained is None and not args.skip_fingerprint and serving.is_adapter(Path(args.model_path)):
        print(f"evaluate: warning: {args.model_path} has no {fingerprint.FINGERPRINT} (trained before fingerprints): "
              f"cannot check that the served model is the trained student", file=sys.stderr)
    return trained


def check_served(args, llm, served, trained) -> fingerprint.FingerprintCheck:
    """The served engine's mean log-probability of each probe's answer against training's, through the path that
    will score (vLLM LoRA or merged); stops the run on a mismatch, before any row is scored."""
    if trained is None:
        return fingerprint.FingerprintCheck("skipped" if args.skip_fingerprint else "absent")
    served_dtype = str(llm.model_config.dtype).removeprefix("torch.")
    try:
        fingerprint.check_stop(trained, fingerprint.served_stop_ids(llm), llm.get_tokenizer())
        check = fingerprint.compare(trained, fingerprint.served_logprobs(llm, trained, served.lora_request()),
                                    served_dtype, served.mismatch_advice, args.allow_inconclusive)
    except fingerprint.FingerprintMismatch as error:
        sys.exit(f"error: {error}\n(--skip_fingerprint scores anyway)")
    fingerprint.show(check)
    return check


def render_prompts(args, prompt, rows):
    """The tokenizer, every row's prompt ids (the teacher's with the long prompt, or the student's query, a text or a
    conversation, with its own side of the prompt file) and whether a system turn went into the first user turn. An
    adapter's own tokenizer is the one it trained with (and the one its merged copy carries)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_path,
                                              trust_remote_code=args.trust_remote_code)
    queries = [query_of(row) for row in rows]
    if not args.with_prompt:
        return (tokenizer, [student_ids(tokenizer, query, prompt.student) for query in queries],
                merges_system(tokenizer, [student_messages(query, prompt.student) for query in queries]))
    return (tokenizer, [teacher_ids(tokenizer, prompt, query) for query in queries],
            merges_system(tokenizer, [teacher_messages(prompt, query) for query in queries]))


def label_results(prompt, rows, prompt_ids, generation, teacher_labels, args) -> dict:
    """Accuracy, agreement, confusion matrix, baselines and the examples of a label task."""
    from distill.metrics import lingua_predictions, score, worst_labels

    golds = [row.get(args.label_field) for row in rows]
    predictions = generation.answers
    examples = [
        {"id": row["id"], **query_fields(row), "gold": gold, "prediction": pred, "raw": raw,
         **({"teacher": t} if teacher_labels else {}), "input_tokens": len(ids)}
        for row, gold, pred, raw, ids, t in zip(rows, golds, predictions, generation.raw, prompt_ids,
                                                teacher_labels or [None] * len(rows))
    ]
    if not args.quiet:
        report.print_live(examples)
    results = {"task": "label", **score(golds, predictions, prompt.labels, teacher_labels)}
    results["worst_labels"] = worst_labels(results, examples)
    if not args.no_lingua and any(g is not None for g in golds):
        lingua = lingua_predictions([row["text"] for row in rows], prompt.labels)
        results.setdefault("baselines", {})["lingua"] = {
            "accuracy": score(golds, lingua, prompt.labels)["accuracy_vs_gold"],
            "agreement_with_teacher": score(golds, lingua, prompt.labels, teacher_labels)["agreement_with_teacher"],
        }
    return {**results, "examples": examples}


def generative_results(prompt, rows, prompt_ids, generation, teacher_answers, tokenizer, quiet: bool) -> dict:
    """Strict pass rate (the prompt's check passes and the answer is an answer: not cut, empty, an echo of the
    prompt, a loop or off topic), the check's rate alone, chrF against the teacher's answers, lengths, failures
    and examples. Every answer is judged as written within --max_tokens; a cut one fails strictly and is kept."""
    from distill.checks import describe
    from distill.metrics import score_generative, score_rules, strict_verdicts

    answers = [answer or "" for answer in generation.answers]
    teacher_answers = teacher_answers or [None] * len(rows)
    judged = strict_verdicts(prompt, [row["text"] for row in rows], answers, generation.reasons, teacher_answers)
    examples = []
    for row, answer, raw, ids, output_tokens, reference, verdict in zip(
            rows, answers, generation.raw, prompt_ids, generation.output_tokens, teacher_answers, judged):
        known = ({"teacher": reference, "chrf": verdict["chrf"], "teacher_rules": verdict["teacher_rules"]}
                 if reference is not None else {})
        examples.append({"id": row["id"], **query_fields(row), "answer": answer, "passed": verdict["passed"],
                         "check_passed": verdict["check_passed"], "reason": verdict["reason"],
                         "rules": verdict["rules"], **known,
                         "raw": raw, "input_tokens": len(ids), "output_tokens": output_tokens,
                         "answer_tokens": len(tokenizer(answer, add_special_tokens=False).input_ids)})
    if not quiet:
        report.print_live_generative(examples)
    return {"task": "generative", "check": prompt.check, "check_description": describe(prompt.check),
            **score_generative(examples), **score_rules(prompt.rules, examples), "examples": examples}


if __name__ == "__main__":
    main()
