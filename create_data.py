"""Stage 1: a vLLM teacher answers every query *with* the long prompt; we keep the query and its final answer.

    python create_data.py --input_file example-data/language_id.jsonl --output_file data/teacher.jsonl \
        --model_name Qwen/Qwen3-30B-A3B-Thinking-2507 --tensor_parallel_size 4 --reasoning-parser qwen3

    # CPU, the embedded model, answers restricted to the label set:
    python create_data.py --model_name models/SmolLM2-135M-Instruct --constrain_labels --max_samples 50

    # a generative task (the prompt file declares a `check`, no labels): the target is the whole final answer
    python create_data.py --prompt_file prompts/answer_in_french.md --input_file example-data/general_questions.jsonl

    # vLLM replicas as a Ray Data pipeline, on this node or the Ray cluster at RAY_ADDRESS (distill/ray_stage.py)
    python create_data.py --engine ray --num_replicas 4 --tensor_parallel_size 2 --model_name ...

Writes, beside --output_file:
  <output>.jsonl          one row per answered query: {"id", "messages": [user query, assistant label],
                          the input's other columns, "teacher": {label, votes, finish reasons, ...}}; for a
                          generative task the assistant turn is the teacher's whole final answer (after any
                          reasoning) and "teacher" holds answer_chars instead of label and votes
  <output>.rejects.jsonl  queries without a valid answer after --max_retries: id, text, reason, raw outputs.
                          A generative answer is rejected when cut at --max_tokens (cut_at_max_tokens), empty
                          (empty_answer) or still inside the reasoning (unclosed_reasoning)
  <output>.run.json       resolved args, command line, git revision, effective sampling, counts, throughput,
                          the teacher tokenizer's hash (what stage 2 checks before KD)
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
import json
import signal
import sys
from pathlib import Path

from distill import engine, ray_stage, shards
from distill.prompts import DEFAULT_PROMPT, load_prompt
from distill.records import (InputError, RunRecord, append_jsonl, output_paths, read_jsonl, read_queries,
                             repair_torn_tail)
from distill.soft_targets import (SIDECAR_SUFFIX, read_sidecar, sidecar_line, sidecar_path, sync_sidecar,
                                  tokenizer_hash)
from distill.splits import select, split_of
from distill.synthesis import label_target_agreement
from distill.teacher import (SAMPLING_FLAGS, StopRequest, StreamStats, Teacher, VllmEngine, add_sampling_args,
                             effective_sampling, model_sampling_defaults, sampling_params, stream)

DEFAULT_TEACHER = "Qwen/Qwen3-30B-A3B-Thinking-2507"
DEFAULT_MAX_TOKENS = 8192  # when the model's generation_config sets no max_new_tokens
# Settings that change what the teacher's answers mean: a resumed run must use the same (effective) ones.
RESUME_KEYS = ("model", "prompt_sha256", "num_samples", "constrain_labels", *SAMPLING_FLAGS, "max_tokens",
               "save_logprobs")


def build_parser():
    """Every flag of stage 1, vLLM's engine flags included; builds no model."""
    engine.configure_env()
    parser = engine.stage_parser(__doc__)
    parser.add_argument("--input-file", default="example-data/language_id.jsonl",
                        help=".txt (one query per line), .jsonl/.csv with a text column, or a datasets name")
    parser.add_argument("--text-field", default="text", help="the query column of a .jsonl/.csv/datasets input")
    parser.add_argument("--output-file", default="data/teacher.jsonl",
                        help="chat JSONL; the rejects file, run record and sidecar go beside it")
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT),
                        help="the long prompt, with the task (labels or a check) in its front matter")
    parser.add_argument("--model-name", dest="model", default=DEFAULT_TEACHER, help="teacher model (hub name or path)")
    parser.add_argument("--max-tokens", type=int,
                        help=f"per answer, reasoning included (unset: the model's, else {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--max-retries", type=int, default=3, help="fresh samples for an answer that breaks the contract")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="answers per query; the label is their majority (a generative task keeps the first "
                             "valid answer: free texts are not voted on)")
    parser.add_argument("--max-samples", type=int,
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
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)  # removed; kept to explain why
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
    parser.set_defaults(model=DEFAULT_TEACHER)  # vLLM's --model shares the dest
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The first N rows of an input can all be held out (the first 16 of example-data/language_id.jsonl are), and
    # training drops those: a sample for training comes from the train side unless --split says otherwise.
    args.split = args.split or ("train" if args.max_samples else "all")
    if args.batch_size is not None:
        parser.error("--batch_size was removed: stage 1 streams queries through the engine and writes each row as "
                     "it finishes; use --max_in_flight to bound the requests in the engine")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in [0, {args.num_shards})")
    if min(args.num_samples, args.max_in_flight or 1, args.save_logprobs or 1) < 1 or args.max_retries < 0:
        parser.error("--num_samples, --max_in_flight and --save_logprobs must be >= 1 and --max_retries >= 0")
    if args.engine == "ray":
        ray_stage.check_args(args, parser)
    return args


def user_sampling(args) -> dict:
    return {flag: getattr(args, flag) for flag in SAMPLING_FLAGS}


def teacher_params(defaults, args, model_defaults: dict, constraint=None, stop_sampling: dict | None = None):
    """The teacher's SamplingParams: the model's defaults, then the user's flags, then where the task's answers stop
    (TaskPrompt.stop_sampling)."""
    max_tokens = args.max_tokens or model_defaults.get("max_tokens", DEFAULT_MAX_TOKENS)
    return sampling_params(defaults, user_sampling(args), max_tokens=max_tokens, structured_outputs=constraint,
                           logprobs=args.save_logprobs, **(stop_sampling or {}))


def resume_settings(args, prompt_sha256: str, model_defaults: dict) -> dict:
    """What a resumed run must share with the run it continues; sampling as the engine will apply it."""
    from vllm import SamplingParams

    # The task's stop strings come from the prompt file, which prompt_sha256 already pins.
    params = teacher_params(SamplingParams.from_optional(**model_defaults), args, model_defaults)
    return {"model": args.model, "prompt_sha256": prompt_sha256, "num_samples": args.num_samples,
            "constrain_labels": args.constrain_labels, **effective_sampling(params),
            "save_logprobs": args.save_logprobs}


def resume_state(out: Path, rejects: Path, record: Path, settings: dict, overwrite: bool) -> set[str]:
    """Ids already finished by an earlier run of the same command (none with --overwrite)."""
    sidecar = sidecar_path(out)
    if overwrite:
        for path in (out, rejects, record, sidecar):
            path.unlink(missing_ok=True)
        return set()
    if not out.exists() and not rejects.exists():
        return set()
    if record.exists():
        previous = json.loads(record.read_text()).get("settings", {})
        changed = [key for key in RESUME_KEYS if previous.get(key) != settings[key]]
        if changed:
            raise InputError(f"{out} was made with other settings ({', '.join(changed)}); pass --overwrite to start over")
    for path in (out, rejects):
        cut = repair_torn_tail(path)
        if cut:
            print(f"resume: cut a torn last line ({cut} bytes) from {path}")
    if settings["save_logprobs"]:
        dropped = sync_sidecar(out, sidecar)
        for what, ids in dropped.items():
            if ids:
                print(f"resume: {len(ids)} {what.replace('_', ' ')} dropped, to be asked again: {', '.join(ids[:5])}")
    return {row["id"] for path in (out, rejects) if path.exists() for row in read_jsonl(path)}


def main(argv=None):
    args = parse_args(argv)
    record = RunRecord("create_data", vars(args))
    # Everything that can fail on bad input or flags fails here, before the engine starts.
    try:
        prompt = load_prompt(args.prompt_file)
        queries = read_queries(args.input_file, args.text_field)
    except (InputError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    if args.constrain_labels and prompt.is_generative:
        sys.exit(f"error: --constrain_labels needs a label set, and {args.prompt_file} declares a generative task "
                 f"(check: {prompt.check}); drop the flag")
    rows = select(queries.rows, args.split)[: args.max_samples]
    if not rows:
        sys.exit(f"error: no queries of {args.input_file} on the {args.split} side of the split; "
                 f"--split all takes every one")
    # What stage 2 can learn from: it drops the held-out side of the same split (default fraction and seed).
    selected_train_side = sum(split_of(row) == "train" for row in rows)
    try:
        model_defaults = model_sampling_defaults(args)
    except (ValueError, OSError) as error:
        sys.exit(f"error: --model_name {args.model}: cannot read its config ({error})")
    settings = resume_settings(args, prompt.sha256, model_defaults)
    out, rejects_path, record_path = output_paths(args.output_file)
    if args.merge_shards:
        out.parent.mkdir(parents=True, exist_ok=True)
        return merge_shards(args.merge_shards, rows, out, rejects_path, record_path, record, settings)
    rows = shards.select_shard(rows, args.shard_index, args.num_shards)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = resume_state(out, rejects_path, record_path, settings, args.overwrite)
    except InputError as error:
        sys.exit(f"error: {error}")
    todo = [row for row in rows if row["id"] not in done]
    print(f"create_data: {len(rows)} queries ({queries.empty} empty and {queries.duplicates} duplicate lines skipped; "
          f"--split {args.split}, {selected_train_side} of them on the train side), {len(rows) - len(todo)} done by an "
          f"earlier run, {len(todo)} to go")

    teacher = build_teacher(args, prompt)
    if args.constrain_labels and teacher.expects_reasoning and not args.reasoning_parser:
        sys.exit("error: --constrain_labels on a thinking model needs --reasoning-parser (e.g. qwen3), "
                 "else the label constraint would cut the reasoning")
    if args.engine == "ray" and todo:
        try:  # an unreachable cluster or one too small fails here, in seconds, before the run record says running
            ray_stage.connect(args)
        except ray_stage.ClusterError as error:
            sys.exit(f"error: {error}")
    teacher_tokenizer = {"teacher_tokenizer_sha256": tokenizer_hash(teacher.tokenizer),
                         "logprobs_top_k": args.save_logprobs}
    record.finish(record_path, status="running", settings=settings, model_sampling_defaults=model_defaults,
                  **teacher_tokenizer)

    stats, stopped = label(args, teacher, todo, len(rows), settings, model_defaults, out, rejects_path)
    status = f"interrupted ({signal.Signals(stopped).name})" if stopped else "finished"
    written, rejected = read_jsonl(out), read_jsonl(rejects_path)
    totals = {"written": len(written), "rejected": len(rejected)}
    trainable = {"selected_train_side": selected_train_side,
                 "written_train_side": sum(split_of(row) == "train" for row in written)}
    # The merge's check on the finished files: every selected id exactly once (rows of ids that an earlier run with
    # a wider selection finished do not count against it).
    selected_ids = {row["id"] for row in rows}
    coverage = [] if stopped else shards.coverage_errors(
        rows, [row for row in written + rejected if row["id"] in selected_ids])
    result = record.finish(
        record_path,
        status="interrupted" if stopped else ("finished" if not coverage else "failed"),
        coverage_errors=coverage,
        settings=settings,
        model_sampling_defaults=model_defaults,
        model=args.model,
        prompt_file=args.prompt_file,
        task="generative" if prompt.is_generative else "label",
        expects_reasoning=teacher.expects_reasoning,
        **teacher_tokenizer,
        counts={
            "input_lines": queries.lines,
            "skipped_empty": queries.empty,
            "duplicates": queries.duplicates,
            "selected": len(rows),
            **trainable,
            "resumed": len(rows) - len(todo),
            "written_this_run": stats["labelled"],
            "rejected_this_run": stats["rejected"],
            "reject_reasons_this_run": stats["reject_reasons"],
            "written_total": totals["written"],
            "rejected_total": totals["rejected"],
            # queries create_queries.py wrote for a label: how many the teacher gave that label
            "label_targets": label_target_agreement(written),
        },
        stream=stats,
        generation_seconds=stats["seconds"],
        queries_per_second=stats["queries_per_second"] if todo else None,
    )
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["reject_reasons"].items()) or "none"
    print(f"create_data: {status}: {len(rows)} selected -> {totals['written']} written, {totals['rejected']} rejected "
          f"(this run: {stats['labelled']} + {stats['rejected']}, reasons: {reasons}); {queries.empty} empty, "
          f"{queries.duplicates} duplicates skipped; {stats['seconds']:.1f} s, {result['queries_per_second']} "
          f"queries/s, {stats['generated_tokens_per_second']} generated tokens/s, prefix-cache hit rate "
          f"{stats['prefix_cache_hit_rate']} -> {out}, {rejects_path.name}, {record_path.name}")
    print(f"create_data: training can use {trainable['written_train_side']} of the {totals['written']} written rows "
          f"(the train side of the split: {trainable['selected_train_side']} of the {len(rows)} selected, --split "
          f"{args.split}{', first ' + str(args.max_samples) if args.max_samples else ''}); the other "
          f"{totals['written'] - trainable['written_train_side']} are held out for evaluation")
    if result["counts"]["label_targets"]:
        targets = result["counts"]["label_targets"]
        print(f"create_data: {targets['labelled_as_target']} of {targets['queries']} queries written for a label got it "
              f"from the teacher ({100 * targets['share']:.1f}%; per label in the run record)")
    if stopped:
        sys.exit(128 + stopped)
    if coverage:
        sys.exit(f"error: {out} and {rejects_path.name} do not hold every selected id exactly once: "
                 + "; ".join(coverage))


def build_teacher(args, prompt) -> Teacher:
    """The teacher's rendering and parsing for --model_name (the driver and every Ray replica build the same)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    max_len = args.max_model_len or AutoConfig.from_pretrained(args.model).max_position_embeddings
    return Teacher(tokenizer, prompt, max_len, args.constrain_labels)


def engine_params(llm, args, teacher, model_defaults: dict, settings: dict):
    """The SamplingParams of a started engine; raises RuntimeError if vLLM's defaults are not the ones the resume
    check recorded (they were read from the model's generation_config without an engine)."""
    params = teacher_params(llm.get_default_sampling_params(), args, model_defaults, teacher.constraint(),
                            teacher.prompt.stop_sampling())
    if effective_sampling(params) != {key: settings[key] for key in effective_sampling(params)}:
        raise RuntimeError(f"vLLM's sampling defaults {effective_sampling(params)} differ from the ones read from "
                           f"the model's generation_config ({settings}); the resume check would be wrong")
    return params


def answer_records(answer, args, teacher) -> dict:
    """What one final Answer adds to the files: {"row": ...} or {"reject": ...}, and with --save_logprobs the
    row's {"sidecar": ...} line."""
    if answer.label is None:
        return {"reject": rejected_row(answer)}
    records = {"row": labelled_row(answer, args.save_raw)}
    if args.save_logprobs:
        labels = None if teacher.prompt.is_generative else teacher.prompt.labels
        records["sidecar"] = sidecar_line(answer, teacher.tokenizer, args.save_logprobs, labels)
    return records


class OutputFiles:
    """The output, rejects and sidecar files of a run, open for appending. `write` takes answer_records dicts and
    appends them with one fsync per file: sidecar lines first, so a crash leaves at worst a sidecar line without
    its row (resume_state drops it), never a row without its sidecar line."""

    def __init__(self, out: Path, rejects_path: Path, save_logprobs: bool):
        self.paths = {"sidecar": sidecar_path(out) if save_logprobs else None, "row": out, "reject": rejects_path}

    def __enter__(self):
        self.handles = {kind: open(path, "a", encoding="utf-8") for kind, path in self.paths.items() if path}
        return self

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.close()

    def write(self, records: list[dict]) -> None:
        for kind, handle in self.handles.items():  # in the order of self.paths: sidecar, row, reject
            append_jsonl(handle, [record[kind] for record in records if kind in record])


def show_progress(progress, stats: StreamStats, finished: int) -> None:
    progress.update(finished)
    figures = stats.summary()
    progress.set_postfix(written=stats.labelled, rejected=stats.rejected, refresh=False,
                         **{"q/s": figures["queries_per_second"], "tok/s": figures["generated_tokens_per_second"],
                            "cache_hit": figures["prefix_cache_hit_rate"]})


def label(args, teacher, todo, selected, settings, model_defaults, out, rejects_path) -> tuple[dict, int | None]:
    """Stream `todo` through the teacher, writing each row as it finishes. Returns (figures, signal that stopped
    the run or None)."""
    if not todo:
        return StreamStats().summary(), None
    if args.engine == "ray":
        return ray_stage.label(args, teacher, todo, selected, settings, model_defaults, out, rejects_path)
    llm = engine.build_llm(args)
    try:
        params = engine_params(llm, args, teacher, model_defaults, settings)
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    vllm_engine = VllmEngine(llm)
    stop = StopRequest("create_data")
    stats = StreamStats()  # from here: engine start-up is not generation time
    from tqdm import tqdm

    with OutputFiles(out, rejects_path, bool(args.save_logprobs)) as files, \
            tqdm(total=selected, initial=selected - len(todo), desc="teacher", unit="query") as progress:
        for answer in stream(vllm_engine, teacher, todo, params, num_samples=args.num_samples,
                             max_retries=args.max_retries, max_in_flight=args.max_in_flight or vllm_engine.max_num_seqs,
                             stop=stop.requested, stats=stats):
            files.write([answer_records(answer, args, teacher)])
            show_progress(progress, stats, 1)
    return stats.summary(), stop.signal


def carried(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in ("id", "text")}


def labelled_row(answer, save_raw: bool) -> dict:
    row = answer.row
    # A generative answer is free text: its length says more than a vote count over distinct texts.
    outcome = {"answer_chars": len(answer.label)} if answer.generative else {"label": answer.label,
                                                                               "votes": dict(answer.votes)}
    teacher = {
        **outcome,
        "invalid_samples": len(answer.failures),
        "finish_reasons": [sample.finish_reason for sample in answer.samples],
        "reasoning_chars": [sample.parsed.reasoning_chars for sample in answer.samples],
    }
    if save_raw:
        teacher["raw"] = [sample.text for sample in answer.samples + answer.failures]
    return {"id": row["id"], "messages": [{"role": "user", "content": row["text"]},
                                          {"role": "assistant", "content": answer.label}],
            **carried(row), "teacher": teacher}


def rejected_row(answer) -> dict:
    row = answer.row
    failures = [{"reason": s.parsed.reason, "finish_reason": s.finish_reason, "raw": s.text} for s in answer.failures]
    return {"id": row["id"], "text": row["text"], **carried(row), "reason": answer.reason, "failures": failures}


def merge_shards(pattern: str, rows: list, out: Path, rejects_path: Path, record_path: Path, record: RunRecord,
                 settings: dict):
    """One output from the shards' outputs, if together they hold every selected id exactly once and were all
    made with `settings`. The merged run record keeps the settings, so create_data.py run again on the merged
    output resumes from it (and finds nothing to do)."""
    from glob import glob

    shard_files = [Path(p) for p in sorted(glob(pattern)) if not p.endswith((".rejects.jsonl", SIDECAR_SUFFIX))]
    if not shard_files:
        sys.exit(f"error: no shard files match {pattern}")
    try:
        written, rejected, shard_records = shards.read_shards(shard_files, lambda p: output_paths(str(p))[1],
                                                              lambda p: output_paths(str(p))[2])
    except InputError as error:
        sys.exit(f"error: {error}")
    errors = shards.settings_errors(shard_records, settings, RESUME_KEYS)
    errors += shards.coverage_errors(rows, written + rejected)
    unfinished = [str(path) for path, shard in shard_records.items() if shard.get("status") != "finished"]
    if unfinished:
        errors.append(f"shards not finished: {', '.join(unfinished)}")
    if errors:
        sys.exit(f"error: shards {pattern} do not cover the input exactly once with the same settings: "
                 + "; ".join(errors))
    merged_files = [(out, written), (rejects_path, rejected)]
    if settings["save_logprobs"]:
        merged_files.append((sidecar_path(out), merged_sidecars(shard_files, written)))
    for path, merged in merged_files:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged), encoding="utf-8")
        tmp.replace(path)
    records = list(shard_records.values())
    record.finish(record_path, status="finished", settings=settings, merged_from=[str(s) for s in shard_files],
                  teacher_tokenizer_sha256=records[0].get("teacher_tokenizer_sha256"),
                  logprobs_top_k=settings["save_logprobs"],
                  counts={"selected": len(rows), "written_total": len(written), "rejected_total": len(rejected)},
                  shards=[r.get("counts") for r in records],
                  generation_seconds=max((r.get("generation_seconds") or 0 for r in records), default=0))
    print(f"create_data: merged {len(shard_files)} shards -> {len(written)} written ({out}), {len(rejected)} rejected "
          f"({rejects_path.name}); every one of the {len(rows)} selected ids exactly once")


def merged_sidecars(shard_files: list[Path], written: list[dict]) -> list[dict]:
    """The shards' sidecar lines in the merged rows' order; every written row must have one."""
    lines = {}
    for shard in shard_files:
        lines.update(read_sidecar(sidecar_path(shard)) if sidecar_path(shard).exists() else {})
    missing = [row["id"] for row in written if row["id"] not in lines]
    if missing:
        sys.exit(f"error: {len(missing)} rows have no line in their shard's {SIDECAR_SUFFIX} "
                 f"(e.g. {', '.join(missing[:5])}); re-run those shards to resume them")
    return [lines[row["id"]] for row in written]


if __name__ == "__main__":
    main()
