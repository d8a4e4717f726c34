"""Owns stage 1 from its flags to the records an answer adds; must not parse flags or print usage (create_data.py).

Stage 1's teacher, from the flags to the records a final answer adds to the run's files: built the same way by
create_data.py's own engine (`answer_queries`) and by every Ray replica (distill/ray_stage.py); create_queries.py
shares the tokenizer step (and distill/sampling.py's sampling).

    teacher = build_teacher(args, prompt)
    settings = run_settings(args, prompt.sha256, model_sampling_defaults(args))   # read without an engine
    llm = engine.build_llm(args)
    params = teacher_sampling(llm, args, teacher, settings)                        # checked against settings
    for outcome in stream(VllmEngine(llm), teacher, rows, params, ...):
        append(answer_records(outcome, args, teacher))   # [{"row"}, ...] or [{"reject"}], with sidecar lines

A written row is {"id", "messages": [user query, assistant answer], the input's other columns, "teacher": {...}}:
for a label task the answer is the label the samples voted for ("teacher" holds label and votes), for a generative
task the whole final answer ("teacher" holds answer_chars). A conversation's row holds its turns, then the answer.
With --keep all a generative query gives one row per valid sample: id `<id>#<k>`, "query_id" <id>, and its group
(the id when it has none), so the split keeps them together. A rejected query keeps its text (and conversation), the
reason and every raw output (create_data.py's docstring has the file formats).
"""

import signal
import sys
from collections import Counter
from contextlib import contextmanager

from distill import defaults, engine, shards
from distill.records import InputError, query_id
from distill.render import conversation, query_of, takes_system_role
from distill.sampling import SAMPLING_FLAGS, engine_sampling, expected_sampling
from distill.soft_targets import sidecar_line
from distill.splits import split_of
from distill.synthesis import label_target_agreement
from distill.teacher import StopRequest, StreamStats, Teacher, VllmEngine, stream

# Settings that change what the teacher's answers mean: a resumed run, or a shard merged with others, must share them.
RESUME_KEYS = ("model", "prompt_sha256", "num_samples", "constrain_labels", *SAMPLING_FLAGS, "max_tokens",
               "save_logprobs", "keep", "keep_rule_failures")


def run_settings(args, prompt_sha256: str, model_defaults: dict) -> dict:
    """What a resumed run must share with the run it continues (RESUME_KEYS): sampling as the engine will apply it.
    The task's stop strings come from the prompt file, which prompt_sha256 pins."""
    max_tokens = defaults.max_tokens(args.max_tokens, model_defaults, defaults.TEACHER_MAX_TOKENS)
    sampling = expected_sampling(args, model_defaults, max_tokens)
    return {"model": args.model, "prompt_sha256": prompt_sha256, "num_samples": args.num_samples,
            "constrain_labels": args.constrain_labels, **sampling, "save_logprobs": args.save_logprobs,
            "keep": args.keep,
            "keep_rule_failures": args.keep_rule_failures}


def teacher_sampling(llm, args, teacher: Teacher, settings: dict):
    """The teacher's SamplingParams: the run's sampling, the label constraint, --save_logprobs, and where the task's
    answers stop (TaskPrompt.stop_sampling)."""
    return engine_sampling(llm, args, settings, structured_outputs=teacher.constraint(), logprobs=args.save_logprobs,
                           **teacher.prompt.stop_sampling())


# ---- the teacher ------------------------------------------------------------------------------------------------


def load_tokenizer(args):
    """The model's tokenizer and the context it is served with (--max-model-len, else its max positions)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    return tokenizer, args.max_model_len or AutoConfig.from_pretrained(args.model).max_position_embeddings


def build_teacher(args, prompt) -> Teacher:
    """The teacher's rendering and parsing for --model_name (the driver and every Ray replica build the same)."""
    tokenizer, max_model_len = load_tokenizer(args)
    teacher = Teacher(tokenizer, prompt, max_model_len, args.constrain_labels, args.keep_rule_failures)
    check_reasoning_parser("--constrain_labels", args.constrain_labels, teacher.expects_reasoning, args)
    return teacher


def check_reasoning_parser(flag: str, constrained: bool, expects_reasoning: bool, args) -> None:
    """A constraint on the answer of a model that reasons first needs vLLM's reasoning parser, which leaves the
    reasoning free and constrains what follows it; InputError without one."""
    if constrained and expects_reasoning and not args.reasoning_parser:
        raise InputError(f"{flag} on a thinking model needs --reasoning-parser (e.g. qwen3), else the constraint "
                         f"would cut the reasoning")


# ---- a final answer -> the records it adds to the files ---------------------------------------------------------


def answer_records(outcome, args, teacher: Teacher) -> list[dict]:
    """What one query's outcome adds to the files: [{"reject": ...}], or [{"row": ...}] with, under --save_logprobs,
    the row's {"sidecar": ...} line; with --keep all (a generative task) one such record per valid sample."""
    if outcome.answer is None:
        return [{"reject": rejected_row(outcome)}]
    labels = None if teacher.prompt.is_generative else teacher.prompt.labels
    kept = range(len(outcome.samples)) if args.keep == "all" else [None]
    records = [{"row": answer_row(outcome, args.save_raw, k)} for k in kept]
    if args.save_logprobs:
        for k, record in zip(kept, records):
            record["sidecar"] = sidecar_line(outcome, teacher.tokenizer, args.save_logprobs, labels,
                                             None if k is None else outcome.samples[k], record["row"]["id"])
    return records


def carried(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in ("id", "text", "messages")}


def answer_row(outcome, save_raw: bool, k: int | None = None) -> dict:
    """The row of an answered query; with `k`, the row of its k-th valid sample (--keep all)."""
    row = outcome.row
    samples = outcome.samples if k is None else [outcome.samples[k]]
    answer = outcome.answer if k is None else samples[0].parsed.answer
    # A generative answer is free text: its length says more than a vote count over distinct texts.
    result = ({"answer_chars": len(answer)} if outcome.generative
              else {"label": answer, "votes": dict(outcome.votes)})
    if k is not None:
        result.update(sample=k, samples_kept=len(outcome.samples))
    if samples[0].parsed.broken_rules:  # --keep_rule_failures: the rules this answer breaks
        result["broken_rules"] = list(samples[0].parsed.broken_rules)
    teacher = {
        **result,
        "invalid_samples": len(outcome.failures),
        "finish_reasons": [sample.finish_reason for sample in samples],
        "reasoning_chars": [sample.parsed.reasoning_chars for sample in samples],
        **input_hash(outcome),
    }
    if save_raw:  # with --keep all, the failed samples' raw outputs go with the first row only
        teacher["raw"] = [sample.text for sample in samples + (outcome.failures if not k else [])]
    ids = {"id": row["id"]} if k is None else {"id": f"{row['id']}#{k}", "query_id": row["id"],
                                                 "group": row.get("group") or row["id"]}
    return {**ids, "messages": conversation(query_of(row)) + [{"role": "assistant", "content": answer}],
            **carried(row), "teacher": teacher}


def rejected_row(outcome) -> dict:
    row = outcome.row
    failures = [{"reason": s.parsed.reason, "finish_reason": s.finish_reason, "raw": s.text,
                 **({"broken_rules": list(s.parsed.broken_rules)} if s.parsed.broken_rules else {})}
                for s in outcome.failures]
    conversation_turns = {"messages": row["messages"]} if "messages" in row else {}
    return {"id": row["id"], "text": row["text"], **conversation_turns, **carried(row), "reason": outcome.reason,
            "failures": failures, **input_hash(outcome)}


def input_hash(outcome) -> dict:
    """The query's input hash, which a resume compares with the input then (RunFiles.resume, `current_inputs`)."""
    return {"input_sha256": outcome.input_sha256} if outcome.input_sha256 else {}


def current_inputs(teacher: Teacher, rows: list[dict]):
    """query id -> Teacher.input_sha256 of that query as the input and prompt file give it now (None for an id
    this run did not select), rendered only when a resume asks: RunFiles.resume's `input_sha256`."""
    by_id = {row["id"]: row for row in rows}
    return lambda query: teacher.input_sha256(query_of(by_id[query])) if query in by_id else None


# ---- writing them as they come ----------------------------------------------------------------------------------


@contextmanager
def answer_writer(files, stats: StreamStats, selected: int, done: int):
    """A function that appends finished answers' records to the run's files (RunFiles.appender) and moves the
    progress bar, with the stream's figures beside it. create_data's engine loop and the Ray driver both write
    through one."""
    from tqdm import tqdm

    with files.appender() as append, tqdm(total=selected, initial=done, desc="teacher", unit="query") as progress:
        def write(records: list[dict]) -> None:
            append(records)
            progress.update(len(records))
            figures = stats.summary()
            progress.set_postfix(written=stats.answered, rejected=stats.rejected, refresh=False,
                                 **{"q/s": figures["queries_per_second"],
                                    "tok/s": figures["generated_tokens_per_second"],
                                    "cache_hit": figures["prefix_cache_hit_rate"]})

        yield write


def answer_queries(args, teacher: Teacher, todo: list[dict], selected: int, settings: dict, files):
    """Streams `todo` through one vLLM engine in this process, each query's records written the moment its answer is
    final. Returns (the stream's figures, the signal that stopped the run or None)."""
    llm = engine.build_llm(args)
    params = teacher_sampling(llm, args, teacher, settings)
    vllm_engine = VllmEngine(llm)
    stop = StopRequest("create_data")
    stats = StreamStats()  # from here: engine start-up is not generation time
    with answer_writer(files, stats, selected, selected - len(todo)) as write:
        for outcome in stream(vllm_engine, teacher, todo, params, num_samples=args.num_samples,
                              max_retries=args.max_retries,
                              max_in_flight=args.max_in_flight or vllm_engine.max_num_seqs, stop=stop.requested,
                              stats=stats):
            write(answer_records(outcome, args, teacher))
    return stats.summary(), stop.signal


# ---- the end of a run ---------------------------------------------------------------------------------------


def finish(args, files, rows, resumed, stats, stopped, *, prompt, queries, teacher, **record) -> dict:
    """The run record of a run that ended: finished only when the output and the rejects hold every selected id
    exactly once (the merge's check; rows of ids an earlier run with a wider selection finished do not count)."""
    written, rejected = files.written(), files.rejected()
    selected = {row["id"] for row in rows}
    coverage = [] if stopped else shards.coverage_errors(
        rows, [row for row in written + rejected if query_id(row) in selected])
    return files.write(
        status="interrupted" if stopped else ("finished" if not coverage else "failed"),
        coverage_errors=coverage, **record, model=args.model, prompt_file=args.prompt_file,
        task="generative" if prompt.is_generative else "label", expects_reasoning=teacher.expects_reasoning,
        input_kind=queries.kind, student=prompt.student.to_dict(),  # the student side stage 2 trains with
        system_merged_into_user=not takes_system_role(teacher.tokenizer),
        counts={"input_lines": queries.lines, "skipped_empty": queries.empty, "duplicates": queries.duplicates,
                "selected": len(rows), "resumed": resumed, "written_this_run": stats["labelled"],
                # what stage 2 can learn from: it drops the held-out side of the same split
                "selected_train_side": sum(split_of(row) == "train" for row in rows),
                "written_train_side": sum(split_of(row) == "train" for row in written),
                "rejected_this_run": stats["rejected"], "reject_reasons_this_run": stats["reject_reasons"],
                "rules_broken": rules_broken(written, rejected),
                "written_total": len(written), "rejected_total": len(rejected),
                "rows_per_query": shards.rows_per_query(written),
                # queries create_queries.py wrote for a label: how many the teacher gave that label
                "label_targets": label_target_agreement(written)},
        stream=stats, generation_seconds=stats["seconds"],
        queries_per_second=stats["queries_per_second"] if len(rows) > resumed else None)


def rules_broken(written: list[dict], rejected: list[dict]) -> dict:
    """Per verifiable rule, how many queries the teacher's answers broke it in: rejected (any of a rejected query's
    samples broke it) and kept (--keep_rule_failures). Read from the files, so a resumed or Ray run counts alike."""
    counts = {"rejected": Counter(), "kept": Counter()}
    for row in rejected:
        counts["rejected"].update({rule for failure in row.get("failures", [])
                                   for rule in failure.get("broken_rules", ())})
    for row in written:
        counts["kept"].update(row.get("teacher", {}).get("broken_rules", ()))  # a row written by hand has none
    return {kind: dict(counter) for kind, counter in counts.items()}


def report(args, files, record: dict, stats: dict, stopped: int | None) -> None:
    """create_data's summary of a run that ended, from its run record; exits 128 + the signal that stopped it, or 1
    when the files do not hold every selected id exactly once."""
    counts, status = record["counts"], f"interrupted ({signal.Signals(stopped).name})" if stopped else "finished"
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["reject_reasons"].items()) or "none"
    print(f"create_data: {status}: {counts['selected']} selected -> {counts['written_total']} written, "
          f"{counts['rejected_total']} rejected (this run: {stats['labelled']} + {stats['rejected']}, reasons: "
          f"{reasons}); {counts['skipped_empty']} empty, {counts['duplicates']} duplicates skipped; "
          f"{stats['seconds']:.1f} s, {record['queries_per_second']} queries/s, {stats['generated_tokens_per_second']} "
          f"generated tokens/s, prefix-cache hit rate {stats['prefix_cache_hit_rate']} -> {files.out}, "
          f"{files.rejects.name}, {files.record_path.name}")
    if args.keep == "all":
        print("create_data: rows per query (--keep all): " + ", ".join(
            f"{rows}: {queries}" for rows, queries in counts["rows_per_query"].items()))
    print(f"create_data: training can use {counts['written_train_side']} of the {counts['written_total']} written rows "
          f"(the train side of the split: {counts['selected_train_side']} of the {counts['selected']} selected, "
          f"--split {args.split}{', first ' + str(args.max_samples) if args.max_samples else ''}); the other "
          f"{counts['written_total'] - counts['written_train_side']} are held out for evaluation")
    rejected, kept = counts["rules_broken"]["rejected"], counts["rules_broken"]["kept"]
    by_count = sorted({**rejected, **kept}, key=lambda rule: (-rejected.get(rule, 0) - kept.get(rule, 0), rule))
    if by_count:
        print("create_data: teacher answers that broke a rule (queries, all runs): " + ", ".join(
            f"{rule}: {rejected.get(rule, 0)} rejected" + (f", {kept[rule]} kept" if rule in kept else "")
            for rule in by_count))
    if counts["label_targets"]:
        targets = counts["label_targets"]
        print(f"create_data: {targets['labelled_as_target']} of {targets['queries']} queries written for a label "
              f"got it "
              f"from the teacher ({100 * targets['share']:.1f}%; per label in the run record)")
    if stopped:
        sys.exit(128 + stopped)
    if record["coverage_errors"]:
        sys.exit(f"error: {files.out} and {files.rejects.name} do not hold every selected id exactly once: "
                 + "; ".join(record["coverage_errors"]))
