"""Stage 1 on Ray Data (create_data.py --engine ray, distill/ray_stage.py), on CPU.

The slow tests share one local Ray cluster started as docs/scale-out.md starts a real one: `ray start --head` and two
`ray start --address` worker nodes of one CPU each, so the two replicas of a run land on two Ray nodes. Every Ray run
costs ~30-60 s of replica start-up on 2 cores (Ray workers import vLLM and build an engine each).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

import create_data
from distill import ray_stage
from distill.run_files import read_sidecar, sidecar_path
from tests.conftest import CLI_ENV, REPO, run_cli, run_main
from tests.test_create_data import (
    MAX_LEN,
    Launch,
    check_survivors,
    complete_rows,
    example_subset,
    ids_once,
    input_ids,
    newline_count,
    paths,
    run_record,
)

RAY = Path(sys.executable).parent / "ray"
# The test cluster runs without Ray's token authentication: it listens on this machine only, and the tests must not
# create ~/.ray/auth_token.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
# A stopped test node has nothing left to drain (Ray waits up to 30 s for a node's work to finish by default).
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
REPLICA_TITLE = "MapBatches(TeacherReplica)"  # in the process title Ray gives a replica's actor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- fast: the checks that need no cluster ----------------------------------------------------------------------


def test_resource_error_counts_room_per_node():
    # 2 replicas of TP 4 on two 8-GPU nodes: room for 4
    assert ray_stage.resource_error([{"GPU": 8}, {"GPU": 8}], 4, {"GPU": 4}) is None
    error = ray_stage.resource_error([{"GPU": 8}, {"GPU": 8}], 5, {"GPU": 4})
    assert "--num_replicas 5 x 4 GPU" in error and "have 8, 8 GPU each, room for 4" in error
    # 6 GPUs in all, but a TP-4 replica's GPUs must share a node: no room at all
    error = ray_stage.resource_error([{"GPU": 3, "CPU": 8}, {"GPU": 3}], 1, {"GPU": 4})
    assert "have 3, 3 GPU each, room for 0" in error and "--tensor_parallel_size" in error
    # a CPU-only head (no GPU key) counts as a node with none
    error = ray_stage.resource_error([{"CPU": 2}], 1, {"GPU": 1})
    assert "have 0 GPU each, room for 0" in error
    assert ray_stage.resource_error([{"CPU": 0}, {"CPU": 1}, {"CPU": 1}], 2, {"CPU": 1}) is None
    assert "room for 2" in ray_stage.resource_error([{"CPU": 0}, {"CPU": 1}, {"CPU": 1}], 3, {"CPU": 1})


def test_probe_address():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ray_stage.probe_address(f"127.0.0.1:{server.getsockname()[1]}")  # something answers: no error
        ray_stage.probe_address(f"ray://127.0.0.1:{server.getsockname()[1]}")
    closed = free_port()
    with pytest.raises(ray_stage.ClusterError, match=f"nothing answers at 127.0.0.1:{closed} .*ray start --head"):
        ray_stage.probe_address(f"127.0.0.1:{closed}")
    with pytest.raises(ray_stage.ClusterError, match="not host:port"):
        ray_stage.probe_address("://")


def test_engine_ray_flags_are_checked():
    base = ["--engine", "ray", "--model_name", "m"]
    args = create_data.parse_args([*base, "--num-replicas", "3", "--cpus_per_replica", "2"])
    assert (args.num_replicas, args.cpus_per_replica, args.rows_per_task) == (3, 2, ray_stage.DEFAULT_ROWS_PER_TASK)
    for bad in (["--num_replicas", "0"], ["--rows_per_task", "0"], ["--num_shards", "2"]):
        with pytest.raises(SystemExit):
            create_data.parse_args([*base, *bad])


def test_unreachable_ray_address_fails_at_once(tiny_model, tmp_path):
    """A RAY_ADDRESS where nothing listens: a clear error from the TCP probe, nothing written (run_cli's timeout is
    the guard against a hang)."""
    port = free_port()
    output = tmp_path / "teacher.jsonl"
    result = run_cli("bash", "create_data_ray.sh", "--max_samples", 4, *MAX_LEN, check=False, timeout=180,
                     env={"RAY_ADDRESS": f"127.0.0.1:{port}", "MODEL": str(tiny_model), "OUTPUT": str(output),
                          "PYTHON": sys.executable, **RAY_ENV})
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"error: RAY_ADDRESS=127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} within 3 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(path.exists() for path in paths(output))  # not even a run record saying "running"


# ---- slow: a local Ray cluster, head + 2 worker nodes ----------------------------------------------------------


class RayNode:
    """`ray start --block` in its own session: stopping it ends every process of that Ray node (raylet, workers)."""

    def __init__(self, args: list, log: Path):
        self.log = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen([str(RAY), "start", "--block", *map(str, args)], cwd=REPO,
                                         env={**CLI_ENV, **RAY_ENV, **NO_DRAIN}, stdout=handle,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "will now block forever" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"ray node did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter() if _sid(p) == self.proc.pid]

    def stop(self) -> None:
        members = self.processes()
        self.proc.send_signal(signal.SIGTERM)  # ray start --block stops its node's processes
        try:
            self.proc.wait(timeout=45)  # a node drains for up to 30 s first
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for process in members:  # what did not stop with it
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def _sid(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def started_node(args: list, log: Path, attempts: int = 3) -> RayNode:
    """A Ray node, started again if it gave up: on 2 busy cores (the other pytest worker runs beside this one) a
    `ray start` can exit on a deadline before the head answers it ("Failed to get node info ... Deadline Exceeded")."""
    for attempt in range(1, attempts + 1):
        node = RayNode(args, log.with_name(f"{log.stem}-{attempt}.log"))
        try:
            node.wait_started()
            return node
        except AssertionError:
            node.stop()
            if attempt == attempts:
                raise


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """The address of a Ray cluster on this machine: a head with no CPU (so no replica runs there) and two worker
    nodes with one CPU each, started one after the other as a cluster's nodes would be."""
    logs = tmp_path_factory.mktemp("ray-logs")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", 200_000_000, "--disable-usage-stats"]
    nodes = []
    try:
        nodes.append(started_node(["--head", "--port", port, "--num-cpus", 0, "--include-dashboard", "false",
                                   "--temp-dir", temp_dir, *common], logs / "head.log"))
        for index in (1, 2):
            nodes.append(started_node(["--address", f"127.0.0.1:{port}", "--num-cpus", 1, *common],
                                      logs / f"worker{index}.log"))
        yield {"address": f"127.0.0.1:{port}", "nodes": nodes}
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_env(cluster) -> dict:
    return {"RAY_ADDRESS": cluster["address"], **RAY_ENV}


def replicas(cluster) -> list[psutil.Process]:
    found = []
    for node in cluster["nodes"]:
        for process in node.processes():
            try:
                if REPLICA_TITLE in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
    return found


@pytest.mark.slow
def test_cluster_without_room_fails_before_any_replica_starts(ray_cluster, tiny_model, tmp_path):
    output = tmp_path / "teacher.jsonl"
    result = run_cli("create_data.py", "--engine", "ray", "--num_replicas", 3, "--input_file",
                     example_subset(tmp_path / "in.jsonl", 4), "--output_file", output, "--model_name", tiny_model,
                     *MAX_LEN, env=ray_env(ray_cluster), check=False, timeout=180)
    assert result.returncode == 1, result.stderr[-2000:]
    assert ("error: --num_replicas 3 x 1 CPU (a replica's CPUs on one node) needs room for 3 replicas; the "
            "cluster's 3 node(s) have 1, 1, 0 CPU each, room for 2") in result.stderr, result.stderr[-2000:]
    assert not any(path.exists() for path in paths(output)) and not replicas(ray_cluster)


@pytest.mark.slow
def test_two_replicas_label_like_one_process(ray_cluster, tmp_path, shared_engines, tiny_model):
    """Greedy, on two Ray nodes: the same rows and logprob sidecar as a single-process run, every id once. The tiny
    model, not the embedded one: what is compared is the plumbing (rows, votes, sidecar), and two replicas of the
    embedded model took 277 s of the suite's 15 minutes (2026-11-30)."""
    source = example_subset(tmp_path / "in12.jsonl", 12)
    flags = ["--input_file", source, "--model_name", tiny_model, "--constrain_labels", "--max_tokens", 8,
             "--temperature", 0, "--save_logprobs", 3, *MAX_LEN]
    run_main("create_data.py", *flags, "--output_file", tmp_path / "single" / "teacher.jsonl")
    output = tmp_path / "ray" / "teacher.jsonl"
    # Ray Data hands tasks to a replica as soon as it is up; the tiny model answers all 4 tasks before the other
    # replica's engine is built (seen 2026-11-30), so this run waits for both: the test is about two replicas.
    result = run_cli("create_data.py", *flags, "--output_file", output, "--engine", "ray", "--num_replicas", 2,
                     "--rows_per_task", 3,
                     env={**ray_env(ray_cluster), "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"})

    by_id = {row["id"]: row for row in complete_rows(paths(output)[0])}
    single = {row["id"]: row for row in complete_rows(paths(tmp_path / "single" / "teacher.jsonl")[0])}
    assert sorted(ids_once(output)) == sorted(input_ids(source)) and max(ids_once(output).values()) == 1
    assert by_id == single  # labels, votes, finish reasons, carried columns: row for row
    sidecar = read_sidecar(sidecar_path(output))
    single_sidecar = read_sidecar(sidecar_path(tmp_path / "single" / "teacher.jsonl"))
    assert sidecar.keys() == by_id.keys()  # one line per written row
    for row_id, line in sidecar.items():
        expected = single_sidecar[row_id]
        assert (line["answer_token_ids"], line["top_ids"]) == (expected["answer_token_ids"], expected["top_ids"])
        # other batch shapes may move a float32 log-probability in its last printed digit
        flat = [value for position in line["top_logprobs"] for value in position]
        assert flat == pytest.approx([value for position in expected["top_logprobs"] for value in position], abs=2e-3)
    record = run_record(output)
    assert record["status"] == "finished" and record["coverage_errors"] == []
    assert record["counts"]["written_this_run"] + record["counts"]["rejected_this_run"] == 12
    ray_figures = record["stream"]["ray"]
    assert ray_figures["cluster"]["nodes"] == 3 and ray_figures["replica_resources"] == {"CPU": 1}
    assert len(ray_figures["rows_by_replica"]) == 2, ray_figures  # both replicas answered
    assert sum(ray_figures["rows_by_replica"].values()) == 12
    assert ray_figures["seconds_by_replica"].keys() == ray_figures["rows_by_replica"].keys()
    assert all(0 < seconds <= record["stream"]["seconds"] + 1 for seconds in ray_figures["seconds_by_replica"].values())
    assert "12 selected -> 12 written" in result.stdout


def _tiny_command(tiny_model, source: Path, output: Path) -> list:
    # free-form, 16 tokens and a redraw per query, 2 requests in flight: slow enough that a kill lands mid-run
    return ["create_data.py", "--engine", "ray", "--num_replicas", 2, "--rows_per_task", 5, "--input_file", source,
            "--output_file", output, "--model_name", tiny_model, "--max_tokens", 16, "--max_retries", 1,
            "--max_in_flight", 2, *MAX_LEN]


class RayLaunch(Launch):
    """create_data.py as tests/test_create_data.py launches it, attached to the test cluster."""

    def __init__(self, command, log: Path, cluster):
        self.log = log
        self.handle = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO,
                                     env={**CLI_ENV, "PYTHONUNBUFFERED": "1", **ray_env(cluster)},
                                     stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_replica_killed_mid_run_is_retried_by_ray(ray_cluster, tiny_model, tmp_path):
    source = example_subset(tmp_path / "in40.jsonl", 40, start=200)
    output = tmp_path / "teacher.jsonl"
    out, rejects, _ = paths(output)
    run = RayLaunch(_tiny_command(tiny_model, source, output), tmp_path / "run.log", ray_cluster)
    run.wait_for(lambda: newline_count(out, rejects) >= 4 and len(replicas(ray_cluster)) == 2,
                 "4 rows on disk with both replicas up")
    victim = replicas(ray_cluster)[0]
    on_disk = check_survivors({}, output, "before the kill")
    victim.kill()  # SIGKILL: the replica dies mid-batch
    assert len(on_disk) < 40, "the kill came after the run had finished"
    assert run.finish() == 0, run.output()

    # nothing written before the kill was lost or changed, and every id is there once
    final = check_survivors(on_disk, output, "after the kill", input_ids(source))
    assert sorted(final) == sorted(input_ids(source))  # nothing lost, nothing twice
    record = run_record(output)
    assert record["status"] == "finished" and record["coverage_errors"] == []
    assert sum(record["stream"]["ray"]["rows_by_replica"].values()) == 40
    assert not victim.is_running()


def wait_until_no_replicas(cluster) -> None:
    deadline = time.monotonic() + 120  # a guard against a hang, not a timing claim
    while replicas(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    assert not replicas(cluster), "the stopped driver's replicas outlived it"


@pytest.mark.slow
def test_driver_killed_or_stopped_then_resumed_by_id(ray_cluster, tiny_model, tmp_path):
    source = example_subset(tmp_path / "in40.jsonl", 40, start=300)
    output = tmp_path / "teacher.jsonl"
    out, rejects, record_path = paths(output)
    command = _tiny_command(tiny_model, source, output)

    # 1. SIGKILL the driver mid-run (a crash): what is on disk stays, its replicas end with its Ray job
    run = RayLaunch(command, tmp_path / "run1.log", ray_cluster)
    run.wait_for(lambda: newline_count(out, rejects) >= 5, "5 rows on disk")
    run.kill()
    finished = check_survivors({}, output, "after the driver was killed")
    assert 5 <= len(finished) < 40 and json.loads(record_path.read_text())["status"] == "running"
    wait_until_no_replicas(ray_cluster)

    # 2. SIGTERM mid-run (a preemption): it stops, keeps what arrived and records the run as interrupted
    run = RayLaunch(command, tmp_path / "run2.log", ray_cluster)
    run.wait_for(lambda: newline_count(out, rejects) > len(finished), "a new row on disk")
    run.terminate()
    assert run.finish() == 128 + signal.SIGTERM, run.output()
    before, finished = len(finished), check_survivors(finished, output, "after the SIGTERM")
    assert f"{before} done by an earlier run, {40 - before} to go" in run.log.read_text()
    record = json.loads(record_path.read_text())
    assert record["status"] == "interrupted" and "interrupted (SIGTERM)" in run.log.read_text()
    assert record["counts"]["written_this_run"] + record["counts"]["rejected_this_run"] == len(finished) - before
    assert len(finished) < 40, "the SIGTERM came after the run had finished"
    wait_until_no_replicas(ray_cluster)

    # 3. the same command again: the pipeline is rebuilt from the ids not on disk, and runs to the end
    run = RayLaunch(command, tmp_path / "run3.log", ray_cluster)
    assert run.finish() == 0, run.output()
    assert f"{len(finished)} done by an earlier run, {40 - len(finished)} to go" in run.log.read_text()
    final = check_survivors(finished, output, "after the resume", input_ids(source))
    assert sorted(final) == sorted(input_ids(source))
    record = run_record(output)
    assert record["status"] == "finished" and record["counts"]["resumed"] == len(finished)
    assert record["counts"]["written_this_run"] + record["counts"]["rejected_this_run"] == 40 - len(finished)
    assert Counter(record["stream"]["ray"]["rows_by_replica"]).total() == 40 - len(finished)


def test_a_replica_hands_back_the_same_rows_in_each_packet_whatever_order_they_finish(monkeypatch):
    """Ray runs a task killed mid-batch again and drops as many of the new run's packets as the dead run delivered,
    so the k-th packet must hold the same rows in every run: consecutive rows of the batch, in input order."""
    import random
    from types import SimpleNamespace

    import distill.teacher

    rows = [{"id": f"r{number}", "text": f"query {number}"} for number in range(ray_stage.PACKET_ROWS + 3)]
    replica = object.__new__(ray_stage.TeacherReplica)
    replica.args = SimpleNamespace(num_samples=1, max_retries=0, max_in_flight=2)
    replica.teacher, replica.params, replica.engine, replica.name = None, None, None, "node:1"
    monkeypatch.setattr(ray_stage.stage1, "answer_records", lambda outcome, args, teacher: [{"row": outcome.row}])
    runs = []
    for seed in (0, 1, 2):
        finish_order = random.Random(seed).sample(rows, len(rows))  # engines finish requests in any order
        monkeypatch.setattr(distill.teacher, "stream", lambda engine, teacher, batch, params, order=finish_order,
                            **kwargs: (SimpleNamespace(row=row) for row in order))
        packets = [json.loads(block["packet"][0]) for block in replica({"query": [json.dumps(r) for r in rows]})]
        runs.append([[answer["id"] for answer in packet["answers"]] for packet in packets])
    ids = [row["id"] for row in rows]
    assert runs[0] == runs[1] == runs[2] == [ids[: ray_stage.PACKET_ROWS], ids[ray_stage.PACKET_ROWS:]]
