"""Bench (d): stage 1 as a stream (distill.teacher.stream) vs batch-synchronous generation (the code path before it).

    .venv/bin/python bench/stream_vs_batch.py --model models/SmolLM2-135M-Instruct --queries 24 --window 8

One engine, the same teacher requests (long prompt + query), free-form, greedy, up to --max_tokens each: some
answers stop after a few tokens, others run to the limit. Batch-synchronous: --window queries per `llm.generate`
call, redraws in a second call, rows written when the whole batch is done. Stream: at most --window requests in
the engine, each row written (and fsynced) the moment it is final, redraws sent at once. Prints the throughput
ratio, the time to the first row on disk, and the rows on disk at half of each run's time (what a kill -9 then
would have left; tests/test_create_data.py kills real runs).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill import engine  # noqa: E402
from distill.prompts import load_prompt  # noqa: E402
from distill.sampling import sampling_params  # noqa: E402
from distill.teacher import StreamStats, Teacher, VllmEngine, stream  # noqa: E402


class TimedWriter:
    """Appends rows to a JSONL file with fsync, as create_data.py does, and notes when each row reached the disk."""

    def __init__(self, started: float):
        self.handle = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=True)
        self.started, self.times = started, []

    def write(self, rows: list[dict]) -> None:
        self.handle.write("".join(json.dumps(row) + "\n" for row in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.times += [time.monotonic() - self.started] * len(rows)


def batch_synchronous(llm, teacher, rows, params, window, max_retries):
    """The loop create_data.py ran before the stream: one generate call per batch, redraws as further calls."""
    from vllm.inputs import TokensPrompt

    started = time.monotonic()
    writer, tokens = TimedWriter(started), []
    for start in range(0, len(rows), window):
        batch = rows[start : start + window]
        prompts = {row["id"]: TokensPrompt(prompt_token_ids=teacher.token_ids(row["text"])) for row in batch}
        labels = {}
        for _ in range(max_retries + 1):
            pending = [row for row in batch if row["id"] not in labels]
            if not pending:
                break
            outputs = llm.generate([prompts[row["id"]] for row in pending], params, use_tqdm=False)
            for row, output in zip(pending, outputs, strict=True):
                tokens.append(len(output.outputs[0].token_ids))
                label = teacher.parse(output.outputs[0].text).answer
                if label:
                    labels[row["id"]] = label
        writer.write([{"id": row["id"], "label": labels.get(row["id"])} for row in batch])
    return time.monotonic() - started, writer.times, tokens


def streamed(llm, teacher, rows, params, window, max_retries):
    stats = StreamStats()
    writer = TimedWriter(stats.started)
    for outcome in stream(VllmEngine(llm), teacher, rows, params, max_retries=max_retries, max_in_flight=window,
                          stats=stats):
        writer.write([{"id": outcome.row["id"], "label": outcome.answer}])
    return time.monotonic() - stats.started, writer.times, stats


def timed(run, *args):
    """run(*args) and the CPU seconds this process spent in it, and the load average after: on a shared machine a
    wall time far above the CPU time means another process took the cores."""
    cpu = time.process_time()
    result = run(*args)
    return *result, time.process_time() - cpu, os.getloadavg()[0]


def report(name, seconds, times, tokens, queries, cpu_seconds, load):
    half = sum(1 for t in times if t <= seconds / 2)
    print(f"  {name:<18} {seconds:6.1f} s ({cpu_seconds:.0f} CPU s, load {load:.1f})  "
          f"{queries / seconds:5.2f} queries/s  "
          f"{tokens / seconds:6.1f} tokens/s  first row on disk {times[0]:5.1f} s  rows on disk at half time "
          f"({seconds / 2:.0f} s): {half}/{queries}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--window", type=int, default=8,
                        help="the batch size of one, the in-flight window of the other")
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--max_retries", type=int, default=0)
    args = parser.parse_args()
    engine.configure_env()
    rows = [json.loads(line) for line in Path("example-data/language_id.jsonl").read_text().splitlines()]
    rows = rows[: args.queries]

    from vllm import LLM

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, enable_prefix_caching=True,
              max_model_len=4096, seed=0)
    teacher = Teacher(llm.get_tokenizer(), load_prompt(), 4096)
    params = sampling_params(llm.get_default_sampling_params(), {"temperature": 0.0}, max_tokens=args.max_tokens)
    llm.generate([teacher.render("warm-up")], params, use_tqdm=False)  # the long prompt enters the prefix cache

    batch_seconds, batch_times, batch_tokens, batch_cpu, batch_load = timed(
        batch_synchronous, llm, teacher, rows, params, args.window, args.max_retries)
    stream_seconds, stream_times, stats, stream_cpu, stream_load = timed(
        streamed, llm, teacher, rows, params, args.window, args.max_retries)

    n = len(rows)
    print(f"\nbench stream_vs_batch: {n} teacher requests ({args.model}, free-form, greedy, max_tokens "
          f"{args.max_tokens}, window/batch {args.window}, max_retries {args.max_retries})")
    print(f"  generated tokens per request: min {min(batch_tokens)}, median {statistics.median(batch_tokens):.0f}, "
          f"max {max(batch_tokens)}")
    report("batch-synchronous", batch_seconds, batch_times, sum(batch_tokens), n, batch_cpu, batch_load)
    report("stream", stream_seconds, stream_times, stats.generated_tokens, n, stream_cpu, stream_load)
    print(f"  throughput stream / batch: {batch_seconds / stream_seconds:.2f}x; first row {batch_times[0]:.1f} s -> "
          f"{stream_times[0]:.1f} s")


if __name__ == "__main__":
    main()
