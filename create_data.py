"""Stage 1: a vLLM teacher answers every query *with* the long prompt; we keep the query and its final answer.

    python create_data.py --input_file example-data/language_id.jsonl --output_file data/teacher.jsonl \
        --model_name Qwen/Qwen3-30B-A3B-Thinking-2507 --tensor_parallel_size 4 --reasoning-parser qwen3

    # CPU, the embedded model, answers restricted to the label set:
    python create_data.py --model_name models/SmolLM2-135M-Instruct --constrain_labels --max_samples 50

Writes, beside --output_file:
  <output>.jsonl          one row per answered query: {"id", "messages": [user query, assistant label],
                          the input's other columns, "teacher": {label, votes, finish reasons, ...}}
  <output>.rejects.jsonl  queries without a valid answer after --max_retries: id, text, reason, raw outputs
  <output>.run.json       resolved args, command line, git revision, counts, wall time, throughput

Re-running the same command resumes: ids already in the output or the rejects file are skipped and a line torn
by a crash is cut. --overwrite starts over. Every vLLM engine flag (e.g. --max-model-len, --gpu-memory-utilization,
--reasoning-parser) is accepted too; underscores and dashes are interchangeable.
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from distill import engine
from distill.prompts import DEFAULT_PROMPT, load_prompt, render_teacher
from distill.records import InputError, RunRecord, append_jsonl, read_jsonl, read_queries, repair_torn_tail
from distill.splits import select

DEFAULT_TEACHER = "Qwen/Qwen3-30B-A3B-Thinking-2507"
# Settings that change what the teacher's answers mean: a resumed run must use the same ones.
RESUME_KEYS = ("model", "prompt_sha256", "temperature", "num_samples", "constrain_labels", "max_tokens")


def parse_args(argv=None) -> argparse.Namespace:
    engine.configure_env()
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-file", default="example-data/language_id.jsonl",
                        help=".txt (one query per line), .jsonl/.csv with a text column, or a datasets name")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--output-file", default="data/teacher.jsonl")
    parser.add_argument("--prompt-file", default=str(DEFAULT_PROMPT))
    parser.add_argument("--model-name", dest="model", help=f"teacher model (default {DEFAULT_TEACHER})")
    parser.add_argument("--temperature", type=float, default=0.15)
    parser.add_argument("--max-tokens", type=int, default=8192, help="per answer, reasoning included")
    parser.add_argument("--max-retries", type=int, default=3, help="fresh samples for an answer that breaks the contract")
    parser.add_argument("--num-samples", type=int, default=1, help="answers per query; the label is their majority")
    parser.add_argument("--max-samples", type=int, help="use only the first N queries (before sharding)")
    parser.add_argument("--split", choices=["all", "train", "heldout"], default="all",
                        help="keep only this side of the group split that training and evaluation use")
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--constrain-labels", action="store_true",
                        help="vLLM structured outputs: the answer (after any reasoning) must be one of the labels")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per generate call; rows land per batch")
    parser.add_argument("--save-raw", action="store_true", help="keep the teacher's raw outputs in each row")
    parser.add_argument("--overwrite", action="store_true", help="delete the previous output and start over")
    parser.add_argument("--merge-shards", metavar="GLOB",
                        help="no generation: merge shard outputs (and their rejects) into --output_file, checking "
                             "that every selected id appears exactly once (create_data_h100x8.sh does this)")
    engine.add_engine_args(parser)
    parser.set_defaults(model=DEFAULT_TEACHER)
    args = parser.parse_args(argv)
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in [0, {args.num_shards})")
    if args.num_samples < 1 or args.max_retries < 0:
        parser.error("--num_samples must be >= 1 and --max_retries >= 0")
    return args


def shard(rows: list, index: int, count: int) -> list:
    """Contiguous slice `index` of `count`; the first len % count shards take one extra row."""
    per_shard, extra = divmod(len(rows), count)
    start = index * per_shard + min(index, extra)
    return rows[start : start + per_shard + (index < extra)]


def output_paths(output_file: str) -> tuple[Path, Path, Path]:
    out = Path(output_file)
    stem = out.with_suffix("")
    return out, stem.with_name(stem.name + ".rejects.jsonl"), stem.with_name(stem.name + ".run.json")


def resume_state(out: Path, rejects: Path, record: Path, settings: dict, overwrite: bool) -> set[str]:
    """Ids already finished by an earlier run of the same command (none with --overwrite)."""
    if overwrite:
        for path in (out, rejects, record):
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
    rows = select(queries.rows, args.split)
    if args.max_samples:
        rows = rows[: args.max_samples]
    rows = shard(rows, args.shard_index, args.num_shards)
    settings = {key: getattr(args, key) for key in RESUME_KEYS if hasattr(args, key)} | {"prompt_sha256": prompt.sha256}
    out, rejects_path, record_path = output_paths(args.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge_shards:
        return merge_shards(args.merge_shards, rows, out, rejects_path, record_path, record)
    try:
        done = resume_state(out, rejects_path, record_path, settings, args.overwrite)
    except InputError as error:
        sys.exit(f"error: {error}")
    todo = [row for row in rows if row["id"] not in done]
    print(f"create_data: {len(rows)} queries ({queries.empty} empty and {queries.duplicates} duplicate lines skipped), "
          f"{len(rows) - len(todo)} done by an earlier run, {len(todo)} to go")

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    max_len = args.max_model_len or AutoConfig.from_pretrained(args.model).max_position_embeddings
    expects_reasoning = render_teacher(tokenizer, prompt.teacher_messages("x")).rstrip().endswith("<think>")
    if args.constrain_labels and expects_reasoning and not args.reasoning_parser:
        sys.exit("error: --constrain_labels on a thinking model needs --reasoning-parser (e.g. qwen3), "
                 "else the label constraint would cut the reasoning")
    record.finish(record_path, status="running", settings=settings)

    llm = engine.build_llm(args) if todo else None
    counts = Counter()
    started = time.time()
    from tqdm import tqdm

    with open(out, "a", encoding="utf-8") as out_file, open(rejects_path, "a", encoding="utf-8") as rejects_file, \
            tqdm(total=len(rows), initial=len(rows) - len(todo), desc="teacher", unit="query") as progress:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            # Tokenized per batch: a million queries' ids would not fit in memory, nor wait well before the first row.
            prompt_ids = {row["id"]: tokenizer(render_teacher(tokenizer, prompt.teacher_messages(row["text"])),
                                               add_special_tokens=False).input_ids for row in batch}
            written, rejected = label_batch(llm, batch, prompt_ids, prompt, args, max_len, expects_reasoning)
            append_jsonl(out_file, written)
            append_jsonl(rejects_file, rejected)
            counts["written"] += len(written)
            counts["rejected"] += len(rejected)
            counts.update(f"reject:{row['reason']}" for row in rejected)
            progress.update(len(batch))
            progress.set_postfix(written=counts["written"], rejected=counts["rejected"])
    seconds = time.time() - started
    totals = {"written": len(read_jsonl(out)), "rejected": len(read_jsonl(rejects_path))}
    result = record.finish(
        record_path,
        status="finished",
        settings=settings,
        model=args.model,
        prompt_file=args.prompt_file,
        expects_reasoning=expects_reasoning,
        counts={
            "input_lines": queries.lines,
            "skipped_empty": queries.empty,
            "duplicates": queries.duplicates,
            "selected": len(rows),
            "resumed": len(rows) - len(todo),
            "written_this_run": counts["written"],
            "rejected_this_run": counts["rejected"],
            "reject_reasons_this_run": {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("reject:")},
            "written_total": totals["written"],
            "rejected_total": totals["rejected"],
        },
        generation_seconds=round(seconds, 2),
        queries_per_second=round(len(todo) / seconds, 3) if todo and seconds else None,
    )
    reasons = ", ".join(f"{k}: {v}" for k, v in result["counts"]["reject_reasons_this_run"].items()) or "none"
    print(f"create_data: {len(rows)} selected -> {totals['written']} written, {totals['rejected']} rejected "
          f"(this run: {counts['written']} + {counts['rejected']}, reasons: {reasons}); {queries.empty} empty, "
          f"{queries.duplicates} duplicates skipped; {seconds:.1f} s, {result['queries_per_second']} queries/s "
          f"-> {out}, {rejects_path.name}, {record_path.name}")


def merge_shards(pattern: str, rows: list, out: Path, rejects_path: Path, record_path: Path, record: RunRecord):
    from glob import glob

    shards = [Path(p) for p in sorted(glob(pattern)) if not p.endswith(".rejects.jsonl")]
    if not shards:
        sys.exit(f"error: no shard files match {pattern}")
    written, rejected, shard_records = [], [], []
    for shard_file in shards:
        _, shard_rejects, shard_record = output_paths(str(shard_file))
        written += read_jsonl(shard_file)
        rejected += read_jsonl(shard_rejects) if shard_rejects.exists() else []
        shard_records.append(json.loads(shard_record.read_text()) if shard_record.exists() else {})
    seen = Counter(row["id"] for row in written + rejected)
    expected = {row["id"] for row in rows}
    problems = {
        "appear more than once": [i for i, n in seen.items() if n > 1],
        "are missing": sorted(expected - seen.keys()),
        "were not selected": sorted(seen.keys() - expected),
    }
    errors = [f"{len(ids)} ids {what} (e.g. {', '.join(ids[:5])})" for what, ids in problems.items() if ids]
    if errors:
        sys.exit(f"error: shards {pattern} do not cover the input exactly once: " + "; ".join(errors))
    for path, merged in ((out, written), (rejects_path, rejected)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged), encoding="utf-8")
        tmp.replace(path)
    record.finish(record_path, status="finished", merged_from=[str(s) for s in shards],
                  counts={"selected": len(rows), "written_total": len(written), "rejected_total": len(rejected)},
                  shards=[r.get("counts") for r in shard_records],
                  generation_seconds=max((r.get("generation_seconds") or 0 for r in shard_records), default=0))
    print(f"create_data: merged {len(shards)} shards -> {len(written)} written ({out}), {len(rejected)} rejected "
          f"({rejects_path.name}); every one of the {len(rows)} selected ids exactly once")


def label_batch(llm, batch, prompt_ids, prompt, args, max_len, expects_reasoning):
    """Teacher answers for one batch: (rows to write, rows to reject). Samples that break the contract are
    redrawn up to --max_retries times; a query's label is the majority of its valid samples."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from distill.answers import parse_teacher

    constraint = StructuredOutputsParams(choice=list(prompt.labels)) if args.constrain_labels else None
    valid = {row["id"]: [] for row in batch}
    invalid = {row["id"]: [] for row in batch}
    too_long = {row["id"] for row in batch if len(prompt_ids[row["id"]]) >= max_len}
    live = [row for row in batch if row["id"] not in too_long]
    for attempt in range(args.max_retries + 1):
        pending = [row for row in live if len(valid[row["id"]]) < args.num_samples]
        if not pending:
            break
        params = [
            SamplingParams(
                n=args.num_samples - len(valid[row["id"]]) if attempt == 0 else 1,
                temperature=args.temperature,
                max_tokens=min(args.max_tokens, max_len - len(prompt_ids[row["id"]])),
                structured_outputs=constraint,
            )
            for row in pending
        ]
        prompts = [TokensPrompt(prompt_token_ids=prompt_ids[row["id"]]) for row in pending]
        # LLM.generate returns outputs in request order; strict zip guards that pairing.
        for row, output in zip(pending, llm.generate(prompts, params, use_tqdm=False), strict=True):
            for sample in output.outputs:
                parsed = parse_teacher(sample.text, prompt, expects_reasoning, args.constrain_labels)
                bucket = valid if parsed.label else invalid
                bucket[row["id"]].append((parsed, sample.text, sample.finish_reason))
    written, rejected = [], []
    for row in batch:
        carried = {key: value for key, value in row.items() if key not in ("id", "text")}
        samples, failures = valid[row["id"]], invalid[row["id"]]
        if not samples:
            reason = "too_long" if row["id"] in too_long else Counter(p.reason for p, _, _ in failures).most_common(1)[0][0]
            rejected.append({"id": row["id"], "text": row["text"], **carried, "reason": reason,
                             "failures": [{"reason": p.reason, "finish_reason": f, "raw": raw} for p, raw, f in failures]})
            continue
        votes = Counter(parsed.label for parsed, _, _ in samples)
        label = votes.most_common(1)[0][0]
        teacher = {
            "label": label,
            "votes": dict(votes),
            "invalid_samples": len(failures),
            "finish_reasons": [finish for _, _, finish in samples],
            "reasoning_chars": [parsed.reasoning_chars for parsed, _, _ in samples],
        }
        if args.save_raw:
            teacher["raw"] = [raw for _, raw, _ in samples + failures]
        written.append({
            "id": row["id"],
            "messages": [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": label}],
            **carried,
            "teacher": teacher,
        })
    return written, rejected


if __name__ == "__main__":
    main()
