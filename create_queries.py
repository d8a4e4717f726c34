"""Stage 0 (optional): when you have the prompt but no queries, the model writes them (Snell et al.); the output is
a stage-1 input file.

    # the embedded model writes 100 queries for the French task, spread over topics
    python create_queries.py --prompt_file prompts/answer_in_french.md --num_queries 100 \
        --output_file data/queries_french.jsonl --model_name models/SmolLM2-135M-Instruct --max_tokens 48 \
        --topics space cooking python travel animals --temperature 1.0
    # a label task: 20 queries per label, each asked for with its label as the target
    python create_queries.py --prompt_file prompts/language_identification.md --per_label 20 \
        --output_file data/queries_langid.jsonl --max_tokens 4096 --reasoning-parser qwen3
    # then stage 1 labels them as usual (their topic / label_target columns are carried through)
    python create_data.py --input_file data/queries_french.jsonl --prompt_file prompts/answer_in_french.md ...

Each request shows the model the task prompt, one target (a topic from --topics/--topics_file, or for a label task
the label its answer should be) and --diversity K examples drawn per request (from --seed_examples, or else from
the queries kept so far) with the engine's --seed. The answer's first message line is the query, stripped of
quotes, numbering and labels; one shorter than --min_chars or longer than --max_chars is rejected. Then
deduplication (distill/dedup.py): normalised exact duplicates, and near duplicates whose word-shingle Jaccard with
a kept query (or a seed example) reaches --near_duplicate_threshold.

Writes, beside --output_file:
  <output>.jsonl          one row per kept query: {"id": "syn-<sha1 12 hex>", "text", "topic" or "label_target",
                          "group" (the topic, else the id, for the train/held-out split), "request", "origin":
                          {model, prompt_sha256, seed}}
  <output>.rejects.jsonl  every other request: {"id": "request-<n>", "reason", "text" (the query, if one was read),
                          "raw" (the model's output)}; reasons: empty, too_short, too_long, cut_at_max_tokens,
                          unclosed_reasoning, duplicate, near_duplicate, copies_seed_example, near_seed_example
  <output>.run.json       resolved args, prompt sha256, model, seed, effective sampling, counts by reason

It asks until each target has its share of --num_queries (or --per_label per label) or --max_attempts requests
(default 4 per missing query) were made, and says which. Rows are fsynced as they finish; re-running resumes
(kept queries count, and are in the near-duplicate index) and asks only for the rest; a larger --num_queries adds
queries. --overwrite starts over. Every vLLM engine flag and sampling flag of create_data.py is accepted.
"""

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from distill import engine, input_checks, stage1
from distill.dedup import NEAR_DUPLICATE_THRESHOLD, NearDuplicateIndex
from distill.defaults import QUERY_MAX_TOKENS, REASONING_QUERY_MAX_TOKENS, TEACHER_MODEL, max_tokens
from distill.prompts import load_prompt
from distill.records import InputError, RunRecord, read_queries
from distill.run_files import RunFiles
from distill.sampling import (
    SAMPLING_FLAGS,
    EngineDefaultsError,
    add_sampling_args,
    engine_sampling,
    expected_sampling,
    model_sampling_defaults,
)
from distill.synthesis import DEFAULT_DIVERSITY, MAX_CHARS, MIN_CHARS, Plan, QueryWriter, spread, synthesise
from distill.teacher import StopRequest, StreamStats, VllmEngine

ATTEMPTS_PER_QUERY = 4
# A resumed run must ask the same model the same way for the same targets, else its output mixes two recipes.
RESUME_KEYS = ("model", "prompt_sha256", "target_field", "targets", "constrain_one_line", *SAMPLING_FLAGS, "max_tokens")


def build_parser():
    """Every flag of stage 0, vLLM's engine flags included; builds no model."""
    engine.configure_env()
    parser = engine.stage_parser(__doc__)
    parser.add_argument("--prompt-file", required=True,
                        help="required: the task prompt (labels or a check in its front matter)")
    parser.add_argument("--output-file", required=True,
                        help="required: queries JSONL; rejects and run record go beside it")
    parser.add_argument("--model-name", dest="model", default=TEACHER_MODEL, help="the model that writes queries")
    count = parser.add_mutually_exclusive_group(required=True)
    count.add_argument("--num-queries", type=int, help="queries to keep, spread evenly over the targets")
    count.add_argument("--per-label", type=int, help="queries to keep per label (label tasks)")
    topics = parser.add_mutually_exclusive_group()
    topics.add_argument("--topics", nargs="+", help="topics to cover, one per request in turn")
    topics.add_argument("--topics-file", help="topics, one per line")
    parser.add_argument("--seed-examples", help="example queries (.txt/.jsonl/.csv with a text column)")
    parser.add_argument("--diversity", type=int, default=DEFAULT_DIVERSITY,
                        help="examples shown per request, drawn afresh each time (0: none)")
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS, help="shorter queries are rejected (too_short)")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS, help="longer queries are rejected (too_long)")
    parser.add_argument("--near-duplicate-threshold", type=float, default=NEAR_DUPLICATE_THRESHOLD,
                        help="word-shingle Jaccard similarity at which a query is a near duplicate")
    parser.add_argument("--constrain-one-line", action="store_true",
                        help="vLLM structured outputs: the answer (after any reasoning) is one line of --min_chars "
                             "to --max_chars characters")
    parser.add_argument("--max-attempts", type=int, help=f"requests this run may make (unset: "
                                                         f"{ATTEMPTS_PER_QUERY} per missing query)")
    parser.add_argument("--max-tokens", type=int,
                        help=f"per request (unset: the model's, else {QUERY_MAX_TOKENS}; "
                             f"{REASONING_QUERY_MAX_TOKENS} if it reasons)")
    parser.add_argument("--max-in-flight", type=int, help="requests in the engine at once (unset: --max-num-seqs)")
    parser.add_argument("--overwrite", action="store_true", help="delete the previous output and start over")
    add_sampling_args(parser)
    engine.add_engine_args(parser)
    parser.set_defaults(model=TEACHER_MODEL)  # vLLM's --model shares the dest
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.num_queries or args.per_label or 0) < 1:
        parser.error("--num_queries / --per_label must be >= 1")
    if args.diversity < 0 or not 1 <= args.min_chars <= args.max_chars or (args.max_attempts or 1) < 1:
        parser.error("--diversity must be >= 0, 1 <= --min_chars <= --max_chars, and --max_attempts >= 1")
    if not 0 < args.near_duplicate_threshold <= 1:
        parser.error("--near_duplicate_threshold must be in (0, 1]")
    return args


def read_topics(args) -> list[str] | None:
    if args.topics_file:
        lines = Path(args.topics_file).read_text(encoding="utf-8-sig").splitlines()
        topics = [line.strip() for line in lines if line.strip()]
        if not topics:
            raise InputError(f"{args.topics_file}: no topics (one per line)")
    else:
        topics = args.topics
    if topics and len(set(topics)) != len(topics):
        repeated = sorted(topic for topic, times in Counter(topics).items() if times > 1)
        raise InputError(f"{args.topics_file or '--topics'}: repeated topics {', '.join(repeated)}")
    return topics


def make_plan(args, prompt, topics, seeds) -> Plan:
    """Targets: the topics, else a label task's labels, else one target without a topic."""
    if args.per_label and (topics or prompt.is_generative):
        raise InputError(f"--per_label needs a label task without --topics; {args.prompt_file} "
                         f"{'is generative' if prompt.is_generative else 'got --topics too'}")
    if topics:
        return Plan("topic", spread(topics, args.num_queries), seeds, args.diversity, args.seed)
    if not prompt.is_generative:
        quotas = ({label: args.per_label for label in prompt.labels} if args.per_label
                  else spread(list(prompt.labels), args.num_queries))
        return Plan("label_target", quotas, seeds, args.diversity, args.seed)
    return Plan(None, {None: args.num_queries}, seeds, args.diversity, args.seed)


def run_settings(args, prompt, plan, writer, model_defaults: dict) -> dict:
    """Provenance and what a resumed run must share: sampling as the engine will apply it (the model's defaults,
    then the user's flags), without starting the engine."""
    needed = REASONING_QUERY_MAX_TOKENS if writer.expects_reasoning else QUERY_MAX_TOKENS
    sampling = expected_sampling(args, model_defaults, max_tokens(args.max_tokens, model_defaults, needed))
    return {"model": args.model, "prompt_sha256": prompt.sha256, "seed": args.seed,
            "constrain_one_line": args.constrain_one_line,
            "target_field": plan.target_field,
            "targets": [str(target) for target in plan.quotas],  # names only: a larger --num_queries may resume
            "quotas": {str(target): quota for target, quota in plan.quotas.items()}, **sampling}


def restore(plan: Plan, index: NearDuplicateIndex, seeds: list[str], kept: list, rejected: list) -> None:
    """Seed examples and earlier kept queries into the index and the plan; request numbers continue."""
    for seed in seeds:
        index.add(seed, origin="seed")
    for row in kept:
        index.add(row["text"])
        plan.keep(row)
    numbers = [int(match.group(1)) for row in rejected + kept
               if (match := re.fullmatch(r"request-(\d+)", row.get("request") or row["id"]))]
    plan.requests_made = max(numbers, default=0)


def main(argv=None):
    args = parse_args(argv)
    files = RunFiles(args.output_file, RunRecord("create_queries", vars(args)), RESUME_KEYS)
    # Everything that can fail on bad input or flags fails here, before the engine starts.
    try:
        input_checks.check_writable("--output_file", args.output_file)
        prompt = load_prompt(args.prompt_file)
        topics = read_topics(args)
        seeds = [row["text"] for row in read_queries(args.seed_examples).rows] if args.seed_examples else []
        plan = make_plan(args, prompt, topics, seeds)
        model_defaults = model_sampling_defaults(args)
    except (InputError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")

    tokenizer, max_model_len = stage1.load_tokenizer(args)
    writer = QueryWriter(tokenizer, prompt, max_model_len, args.min_chars, args.max_chars)
    settings = run_settings(args, prompt, plan, writer, model_defaults)
    try:
        kept, rejected = files.resume(settings, args.overwrite)
    except InputError as error:
        sys.exit(f"error: {error}")
    index = NearDuplicateIndex(args.near_duplicate_threshold)
    restore(plan, index, seeds, kept, rejected)
    missing = sum(plan.missing().values())
    max_attempts = args.max_attempts or ATTEMPTS_PER_QUERY * missing
    print(f"create_queries: {sum(plan.quotas.values())} queries wanted over {len(plan.quotas)} target(s), "
          f"{len(kept)} kept by an earlier run, {missing} to go (at most {max_attempts} requests)")
    files.mark_running(settings=settings)

    counts, stats, stopped = write_queries(args, writer, plan, index, files, settings, max_attempts)
    finish(args, files, settings, plan, counts, stats, stopped, len(kept))


def write_queries(args, writer, plan, index, files, settings, max_attempts):
    """Start the engine (only when queries are missing) and stream requests until the plan is met or the budget
    spent. Returns (outcomes by reason, stream figures, the signal that stopped the run or None)."""
    if not plan.missing():
        return Counter(), StreamStats().summary(), None
    try:
        stage1.check_reasoning_parser("--constrain_one_line", args.constrain_one_line, writer.expects_reasoning, args)
        llm = engine.build_llm(args)
        constraint = writer.one_line_constraint() if args.constrain_one_line else None
        params = engine_sampling(llm, args, settings, structured_outputs=constraint)
    except (InputError, EngineDefaultsError) as error:
        sys.exit(f"error: {error}")
    vllm_engine = VllmEngine(llm)
    stop, stats = StopRequest("create_queries"), StreamStats()
    origin = {"model": args.model, "prompt_sha256": settings["prompt_sha256"], "seed": args.seed}
    from tqdm import tqdm

    with files.appender() as append, tqdm(total=sum(plan.missing().values()), desc="queries", unit="query") as progress:
        def show(counts):
            progress.n = counts["kept"]
            progress.set_postfix(dropped=sum(counts.values()) - counts["kept"], refresh=True)

        counts = synthesise(vllm_engine, writer, plan, index, params, append, origin=origin,
                            max_attempts=max_attempts, max_in_flight=args.max_in_flight or vllm_engine.max_num_seqs,
                            stop=stop.requested, stats=stats, on_result=show)
    return counts, stats.summary(), stop.signal


def finish(args, files, settings, plan, counts, stats, stopped, resumed):
    missing = plan.missing()
    if stopped:
        status = "interrupted"
    else:
        status = "finished" if not missing else "budget_spent"
    totals = {"kept_total": len(files.written()), "rejected_total": len(files.rejected())}
    files.write(status=status, settings=settings, model=args.model, prompt_file=args.prompt_file, seed=args.seed,
                 counts={"resumed": resumed, "requests_this_run": sum(counts.values()),
                         "by_reason_this_run": dict(counts), **totals},
                 missing={str(target): number for target, number in missing.items()}, stream=stats)
    reasons = ", ".join(f"{reason}: {number}" for reason, number in counts.most_common() if reason != "kept")
    print(f"create_queries: {status}: {totals['kept_total']} kept in all ({counts['kept']} this run from "
          f"{sum(counts.values())} requests; dropped: {reasons or 'none'}) -> {files.out}, {files.rejects.name}, "
          f"{files.record_path.name}")
    if missing and not stopped:
        print(f"create_queries: the attempt budget is spent with {sum(missing.values())} queries still missing; "
              f"re-run (it resumes) or raise --max_attempts", file=sys.stderr)
    if stopped:
        sys.exit(128 + stopped)


if __name__ == "__main__":
    main()
