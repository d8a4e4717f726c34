"""Stage 1: a vLLM teacher answers every query *with* the long prompt; we keep the query and its final answer.

    python create_data.py --input_file example-data/language_id.jsonl --output_file data/teacher.jsonl \
        --model_name Qwen/Qwen3-30B-A3B-Thinking-2507 --tensor_parallel_size 4 --reasoning-parser qwen3

    # CPU, the embedded model, answers restricted to the label set:
    python create_data.py --model_name models/SmolLM2-135M-Instruct --constrain_labels --max_samples 50

    # a generative task (the prompt file declares a `check`, no labels): the target is the whole final answer
    python create_data.py --prompt_file prompts/answer_in_french.md --input_file example-data/general_questions.jsonl
    # conversations (a `messages` column), two answers each kept as two training rows
    python create_data.py --prompt_file prompts/in_short.md --input_file example-data/in_short_conversations.jsonl \
        --num_samples 2 --keep all

    # vLLM replicas as a Ray Data pipeline, on this node or the Ray cluster at RAY_ADDRESS (distill/ray_stage.py)
    python create_data.py --engine ray --num_replicas 4 --tensor_parallel_size 2 --model_name ...

Writes, beside --output_file:
  <output>.jsonl          one row per answered query: {"id", "messages": [user query, assistant label],
                          the input's other columns, "teacher": {label, votes, finish reasons, ...}}; for a
                          generative task the assistant turn is the teacher's whole final answer (after any
                          reasoning) and "teacher" holds answer_chars instead of label and votes. A conversation
                          input's row holds its turns, then the answer; with --keep all a generative query
                          gives one row per valid sample, ids <id>#<k> with "query_id" and the query's group
  <output>.rejects.jsonl  queries without a valid answer after --max_retries: id, text, reason, raw outputs.
                          A generative answer is rejected when cut at --max_tokens (cut_at_max_tokens), empty
                          (empty_answer), still inside the reasoning (unclosed_reasoning), no answer (echo, loop,
                          off_topic) or when it breaks a verifiable rule of the prompt file (rule:<id>; each
                          failure lists broken_rules; --keep_rule_failures keeps such answers instead)
  <output>.run.json       resolved args, command line, git revision, effective sampling, counts (rows per query
                          too), throughput, the teacher tokenizer's hash (what stage 2 checks before KD), the
                          prompt file's student side (what stage 2 trains with) and system_merged_into_user
  <output>.logprobs.jsonl with --save_logprobs K: per written row, the teacher's top-K log-probabilities of each
                          answer token (token ids + values), for a label task its distribution over the labels, with
                          --num_samples > 1 the vote shares (format: distill/soft_targets.py)

Queries stream through the engine: at most --max_in_flight requests are in it, each query's row is written (and
fsynced) the moment its answer is final, and a sample that breaks the answer contract is redrawn at once. Sampling
starts from the model's generation_config (e.g. Qwen3 Thinking: temperature 0.6, top_p 0.95, top_k 20); only the
sampling flags you set change it. Ctrl-C or SIGTERM stops admitting queries, keeps what finished and records the
run as interrupted. Re-running the same command resumes: ids already in the output or the rejects file are skipped
and a line torn by a crash is cut; with --save_logprobs a row counts as done only with its sidecar line (a row or a
sidecar line without its partner is dropped and the query asked again). --overwrite starts over. Every vLLM engine
flag (e.g. --max-model-len, --gpu-memory-utilization, --reasoning-parser) is accepted too; underscores and dashes are
interchangeable.
"""

import argparse
import sys

from distill import engine, input_checks, ray_stage, shards, stage1
from distill.defaults import TEACHER_MAX_TOKENS, TEACHER_MODEL
from distill.input_checks import positive_int
from distill.prompts import DEFAULT_PROMPT, load_prompt
from distill.records import InputError, RunRecord, query_id, read_queries
from distill.run_files import RunFiles
from distill.sampling import EngineDefaultsError, add_sampling_args, model_sampling_defaults
from distill.soft_targets import tokenizer_hash
from distill.splits import select, split_of
from distill.teacher import StreamStats


def build_parser():
    """Every flag of stage 1, vLLM's engine flags included; builds no model."""
    engine.configure_env()
    parser = engine.stage_parser(__doc__)
    parser.add_argument("--input-file", default="example-data/language_id.jsonl",
                        help=".txt (one query per line), .jsonl/.csv, a .parquet/.arrow file, a dataset dir "
                             "(save_to_disk) or a datasets name, with a text or a messages (conversation) column")
    parser.add_argument("--text-field", default="text", help="the query column of a .jsonl/.csv/datasets input")
    parser.add_argument("--messages-field", default="messages",
                        help="the conversation column (role/content turns ending in a user turn), read when a row "
                             "has no text column")
    parser.add_argument("--dataset-split", default="train", help="the split of a dataset dir or datasets name")
    parser.add_argument("--output-file", default="data/teacher.jsonl",
                        help="chat JSONL; the rejects file, run record and sidecar go beside it")
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT),
                        help="the long prompt, with the task (labels or a check) in its front matter")
    parser.add_argument("--model-name", dest="model", default=TEACHER_MODEL, help="teacher model (hub name or path)")
    parser.add_argument("--max-tokens", type=int,
                        help=f"per answer, reasoning included (unset: the model's, else {TEACHER_MAX_TOKENS})")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="fresh samples for an answer that breaks the contract")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="answers per query; the label is their majority (a generative task keeps the first "
                             "valid answer: free texts are not voted on; --keep all keeps each)")
    parser.add_argument("--keep", choices=["vote", "all"], default="vote",
                        help="vote: one row per query; all: a generative task writes every valid answer as a row "
                             "<id>#<k> in the query's group (a label task keeps its majority vote)")
    parser.add_argument("--max-samples", type=positive_int,
                        help="use only the first N selected queries (before sharding); without --split they come from "
                             "the train side, so that training can use every one")
    parser.add_argument("--split", choices=["all", "train", "heldout"],
                        help="keep only this side of the group split that training and evaluation use (unset: all, "
                             "or train with --max_samples)")
    parser.add_argument("--shard-index", type=int, default=0, help="this instance's shard, 0..num_shards-1")
    parser.add_argument("--num-shards", type=int, default=1, help="a query goes to shard hash(id) mod num_shards")
    parser.add_argument("--constrain-labels", action="store_true",
                        help="vLLM structured outputs: the answer (after any reasoning) must be one of the labels "
                             "(label tasks only)")
    parser.add_argument("--max-in-flight", type=int,
                        help="requests kept in the engine at once (unset: the engine's --max-num-seqs)")
    parser.add_argument("--keep-rule-failures", action="store_true",
                        help="keep a generative answer that breaks one of the prompt file's verifiable rules (its "
                             "row's teacher.broken_rules names them) instead of rejecting it (reason rule:<id>)")
    parser.add_argument("--save-raw", action="store_true", help="keep the teacher's raw outputs in each row")
    parser.add_argument("--save-logprobs", type=int, metavar="K",
                        help="keep the teacher's top-K log-probabilities of every answer token in "
                             "<output>.logprobs.jsonl, for stage 2's --distill_loss kd")
    parser.add_argument("--overwrite", action="store_true", help="delete the previous output and start over")
    parser.add_argument("--engine", choices=["vllm", "ray"], default="vllm",
                        help="vllm: one engine in this process; ray: a Ray Data pipeline over --num_replicas vLLM "
                             "replicas on this node or a Ray cluster (RAY_ADDRESS; see distill/ray_stage.py)")
    ray_stage.add_args(parser)
    parser.add_argument("--merge-shards", metavar="GLOB",
                        help="no generation: merge shard outputs (and their rejects) into --output_file, checking "
                             "that every selected id appears exactly once (create_data_h100x8.sh does this)")
    add_sampling_args(parser)
    engine.add_engine_args(parser)
    parser.set_defaults(model=TEACHER_MODEL)  # vLLM's --model shares the dest
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The first N rows of an input can all be held out (the first 16 of example-data/language_id.jsonl are), and
    # training drops those: a sample for training comes from the train side unless --split says otherwise.
    args.split = args.split or ("train" if args.max_samples else "all")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in [0, {args.num_shards})")
    if min(args.num_samples, args.max_in_flight or 1, args.save_logprobs or 1) < 1 or args.max_retries < 0:
        parser.error("--num_samples, --max_in_flight and --save_logprobs must be >= 1 and --max_retries >= 0")
    if args.engine == "ray":
        ray_stage.check_args(args, parser)
    return args


def main(argv=None):
    args = parse_args(argv)
    files = RunFiles(args.output_file, RunRecord("create_data", vars(args)), stage1.RESUME_KEYS,
                     sidecar=bool(args.save_logprobs))
    prompt, queries, rows, model_defaults = read_inputs(args)
    settings = stage1.run_settings(args, prompt.sha256, model_defaults)
    if args.merge_shards:
        return merge(args, files, rows, settings)
    rows = shards.select_shard(rows, args.shard_index, args.num_shards)
    try:  # the teacher's rendering, no weights: a resumed row whose input changed is refused
        teacher = stage1.build_teacher(args, prompt)
        finished = files.resume(settings, args.overwrite, stage1.current_inputs(teacher, rows))
    except InputError as error:
        sys.exit(f"error: {error}")
    done = {query_id(row) for part in finished for row in part}
    todo = [row for row in rows if row["id"] not in done]
    print(f"create_data: {len(rows)} queries ({queries.empty} empty and {queries.duplicates} duplicate lines skipped; "
          f"--split {args.split}, {sum(split_of(row) == 'train' for row in rows)} of them on the train side), "
          f"{len(rows) - len(todo)} done by an earlier run, {len(todo)} to go")

    try:
        # a Ray cluster unreachable or too small fails now, before the record says running
        if args.engine == "ray" and todo:
            ray_stage.connect(args)
    except (InputError, ray_stage.ClusterError) as error:
        sys.exit(f"error: {error}")
    tokenizer = {"teacher_tokenizer_sha256": tokenizer_hash(teacher.tokenizer), "logprobs_top_k": args.save_logprobs}
    # the student side from the start: stage 2 reads it even from a run that crashed
    files.mark_running(settings=settings, model_sampling_defaults=model_defaults, **tokenizer,
                 input_kind=queries.kind, student=prompt.student.to_dict())

    answer_queries = ray_stage.answer_queries if args.engine == "ray" else stage1.answer_queries
    try:
        stats, stopped = (answer_queries(args, teacher, todo, len(rows), settings, files) if todo
                          else (StreamStats().summary(), None))
    except EngineDefaultsError as error:
        sys.exit(f"error: {error}")
    record = stage1.finish(args, files, rows, len(rows) - len(todo), stats, stopped, prompt=prompt, queries=queries,
                           settings=settings, model_sampling_defaults=model_defaults, teacher=teacher, **tokenizer)
    stage1.report(args, files, record, stats, stopped)


def read_inputs(args):
    """The prompt, the input's queries, the selected rows and the model's sampling defaults: everything that can fail
    on bad input or flags fails here, before any model loads."""
    try:
        input_checks.check_writable("--output_file", args.output_file)
        prompt = load_prompt(args.prompt_file)
        queries = read_queries(args.input_file, args.text_field, args.dataset_split, args.messages_field)
        input_checks.require_rows(args.input_file, queries)
    except (InputError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    if args.keep == "all" and not prompt.is_generative:
        print(f"create_data: --keep all: {args.prompt_file} is a label task, which keeps the majority vote")
        args.keep = "vote"
    if args.constrain_labels and prompt.is_generative:
        sys.exit(f"error: --constrain_labels needs a label set, and {args.prompt_file} declares a generative task "
                 f"(check: {prompt.check}); drop the flag")
    rows = select(queries.rows, args.split)[: args.max_samples]
    if not rows:
        sys.exit(f"error: no queries of {args.input_file} on the {args.split} side of the split; --split all takes "
                 f"every one")
    try:
        input_checks.check_model("--model_name", args.model)
        model_defaults = model_sampling_defaults(args)
    except InputError as error:
        sys.exit(f"error: {error}")
    except (ValueError, OSError) as error:
        sys.exit(f"error: --model_name {args.model}: cannot read its config ({error})")
    return prompt, queries, rows, model_defaults


def merge(args, files, rows, settings):
    """--merge_shards: one output, and its run record, from the shards' outputs (RunFiles.merge)."""
    try:
        record = files.merge(args.merge_shards, rows, settings)
    except InputError as error:
        sys.exit(f"error: {error}")
    counts = record["counts"]
    print(f"create_data: merged {len(record['merged_from'])} shards -> {counts['written_total']} written "
          f"({files.out}), {counts['rejected_total']} rejected ({files.rejects.name}); every one of the {len(rows)} "
          f"selected ids exactly once")


if __name__ == "__main__":
    main()
