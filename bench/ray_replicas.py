"""Bench (g): stage 1 on Ray Data with 1 vs 2 vLLM replicas (create_data.py --engine ray), the same queries, one run.

    .venv/bin/python bench/ray_replicas.py --model models/SmolLM2-135M-Instruct --queries 48

Each side is a real `create_data.py --engine ray` run on a Ray instance of its own on this machine (RAY_ADDRESS is
unset here on purpose), replicas of --cpus_per_replica CPUs each, the label task constrained and greedy. Throughput
is read from the run records, two ways: end to end, queries over the time from the first replica's first batch to
the last row on disk (start-up excluded, a replica that comes up late included); and once all are up, the sum of
the replicas' own rates (rows over the time each one worked). On a 2-core machine the second replica takes the
second core, so the ratio is what one more core buys beside whatever else runs (the load average is printed); on
a cluster each replica brings its own GPUs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(replicas: int, args, source: Path, workdir: Path) -> dict:
    """One create_data.py --engine ray run; its run record, with the wall time and the load average after it."""
    output = workdir / f"replicas-{replicas}" / "teacher.jsonl"
    command = [sys.executable, "create_data.py", "--engine", "ray", "--num_replicas", str(replicas),
               "--cpus_per_replica", str(args.cpus_per_replica), "--rows_per_task", str(args.rows_per_task),
               "--input_file", str(source), "--output_file", str(output), "--model_name", args.model,
               "--constrain_labels", "--max_tokens", "8", "--temperature", "0", "--max-model-len", "4096"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench ray_replicas: the {replicas}-replica run failed:\n{result.stderr[-3000:]}")
    record = json.loads(output.with_name("teacher.run.json").read_text())
    record["bench_wall_seconds"] = time.monotonic() - started
    record["bench_load"] = os.getloadavg()[0]
    return record


def replica_rate(record: dict) -> float:
    """The sum of the replicas' own rates (rows over the time each one worked): the pool's throughput once every
    replica is up, which a replica starting late on a busy machine does not drag down."""
    ray = record["stream"]["ray"]
    return sum(rows / ray["seconds_by_replica"][name] for name, rows in ray["rows_by_replica"].items())


def report(name: str, record: dict) -> None:
    stream, ray = record["stream"], record["stream"]["ray"]
    per_replica = ", ".join(f"{rows} in {ray['seconds_by_replica'][replica]:.0f} s"
                            for replica, rows in ray["rows_by_replica"].items())
    print(f"  {name:<11} {stream['seconds']:6.1f} s from the first batch to the last row "
          f"({record['bench_wall_seconds']:5.1f} s with Ray and replica start-up, load {record['bench_load']:.1f}): "
          f"{stream['queries_per_second']:5.2f} queries/s; replicas' own rates summed {replica_rate(record):5.2f} "
          f"queries/s (rows per replica: {per_replica})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--cpus_per_replica", type=int, default=1)
    parser.add_argument("--rows_per_task", type=int, default=4,
                        help="small, so that a replica coming up late still gets its share")
    args = parser.parse_args()
    lines = (REPO / "example-data" / "language_id.jsonl").read_text(encoding="utf-8").splitlines()[: args.queries]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "queries.jsonl"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        one, two = run(1, args, source, Path(tmp)), run(2, args, source, Path(tmp))
    for record in (one, two):
        counts = record["counts"]
        assert counts["written_total"] + counts["rejected_total"] == len(lines), counts
    print(f"\nbench ray_replicas: {len(lines)} queries ({args.model}, constrained labels, greedy, max_tokens 8), "
          f"1 vs 2 Ray replicas x {args.cpus_per_replica} CPU, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    report("1 replica", one)
    report("2 replicas", two)
    ratio = two["stream"]["queries_per_second"] / one["stream"]["queries_per_second"]
    print(f"  throughput 2 / 1 replicas: {ratio:.2f}x end to end, "
          f"{replica_rate(two) / replica_rate(one):.2f}x once both are up")


if __name__ == "__main__":
    main()
