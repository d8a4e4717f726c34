"""Owns stage 1 on Ray Data across replicas and nodes; must not answer, render or write files except through stage1.

Stage 1 on Ray Data: `create_data.py --engine ray` runs the teacher as a Ray Data pipeline over --num_replicas
vLLM replicas, each with --tensor_parallel_size GPUs (on a CPU-only cluster: --cpus_per_replica CPUs), on this node
or on a Ray cluster of many nodes.

    # one node: no `ray start` needed, the run starts a Ray instance of its own on this machine
    python create_data.py --engine ray --num_replicas 2 --tensor_parallel_size 4 --model_name Qwen/... \
        --reasoning-parser qwen3
    # a cluster: `ray start --head` on one node, `ray start --address HEAD:6379` on every other, then on the head:
    RAY_ADDRESS=HEAD:6379 python create_data.py --engine ray --num_replicas 16 --tensor_parallel_size 4 ...

(create_data_ray.sh and scripts/ray_cluster.sbatch script both; docs/scale-out.md has the details.)

How it works. This process, the driver, reads the input, skips the ids an earlier run finished (RunFiles.resume,
as a single-process run does) and hands the rest to Ray Data: `from_items` -> `map_batches` over a fixed pool of
TeacherReplica actors. A replica builds its vLLM engine and the teacher once (distill/stage1.py, as create_data's
own engine does), then runs `distill.teacher.stream` -- the one rendering, sampling, parsing, redraw and vote path
of stage 1 -- over each batch of --rows_per_task queries, and hands back each finished answer's records (stage1's
answer_records: the row(s) or the reject, and the sidecar lines) in packets of PACKET_ROWS consecutive rows. The driver
is the only writer of the output, rejects and sidecar files: it appends each packet as it arrives through
stage1.answer_writer (one fsync per file, sidecar lines first) and skips an id it has already written, which is what
a batch retried by Ray hands back a second time.

The promises of stage 1, kept:
- the same answers: every replica runs stage 1's own teacher (stage1.build_teacher, teacher_sampling,
  answer_records) with the driver's flags, engine seed included; greedy labels equal a single-process run's
  (tests/test_ray_stage.py);
- exactly once: a replica that dies is restarted by Ray and its batch retried (Ray Data's actor pool restarts actors
  and retries their tasks); rows the driver already wrote are skipped, so nothing is lost or duplicated. At the end
  create_data checks that every selected id is in the output or the rejects exactly once (the merge's check);
- resume by id: if the driver dies, its replicas go with it; the same command again rebuilds the pipeline from the
  ids not yet on disk. Ctrl-C or SIGTERM stops it, keeps what arrived and records the run as interrupted;
- the run record: create_data writes the same counts; `stream.ray` adds the replicas, the rows each one answered and
  the retried rows skipped.

Fail fast: an unreachable RAY_ADDRESS fails after a TCP probe of ADDRESS_PROBE_SECONDS (ray.init alone would wait
much longer), and a cluster without room for --num_replicas replicas (each one's GPUs on one node) fails before any
actor starts, naming what was asked and what the cluster has.

Why map_batches with our actor and not ray.data.llm: its vLLM processor (Ray 2.60) sends one request per row with
the row's sampling parameters and keeps the first completion (its text and logprobs). Our contract redraws a sample
that breaks the answer format at once, within a per-query budget, votes over --num_samples valid samples and writes
the chosen sample's logprobs to the sidecar; with ray.data.llm each of those would be a further pass over the data
with its own bookkeeping, i.e. a second teacher path beside distill.teacher.stream, whose answers could differ.

Costs of this design, measured or by construction: a replica runs one batch at a time, so the engine drains at the
end of each batch (keep --rows_per_task well above the engine's --max-num-seqs); a retried batch is asked again in
full; the driver writes every row itself (one fsync per packet per file, far below one process's write rate).
The repository and the model must be at the same path on every node (a shared filesystem, as on most SLURM
clusters): the replicas import distill from the driver's directory.
"""

import json
import math
import os
import socket
import time
from collections import Counter
from copy import copy
from pathlib import Path
from urllib.parse import urlparse

from distill import engine, stage1

ADDRESS_PROBE_SECONDS = 3
DEFAULT_GCS_PORT = 6379  # `ray start --head` listens here unless told otherwise
DEFAULT_ROWS_PER_TASK = 512
PACKET_ROWS = 8  # a replica hands back a batch's rows in packets of this many consecutive rows (TeacherReplica)
# The StreamStats counts a replica reports with each packet (the driver sums them into the run record's figures).
WORK_FIELDS = ("samples", "generated_tokens", "prompt_tokens", "cached_tokens")
# What the driver's environment says about the engine, forwarded to every replica (a node's Ray workers otherwise
# inherit the environment of whoever ran `ray start` there).
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
CLUSTER: dict = {}  # the cluster connect() joined, for the run record


class ClusterError(RuntimeError):
    pass


def add_args(parser) -> None:
    group = parser.add_argument_group("--engine ray (Ray Data over vLLM replicas; distill/ray_stage.py)")
    group.add_argument("--num-replicas", type=int, default=1,
                       help="vLLM replicas, each with --tensor_parallel_size GPUs (CPU-only: --cpus_per_replica "
                            "CPUs); RAY_ADDRESS names the cluster, else Ray runs on this node")
    group.add_argument("--cpus-per-replica", type=int, default=1,
                       help="CPU-only clusters: CPUs reserved for (and torch threads of) each replica")
    group.add_argument("--rows-per-task", type=int, default=DEFAULT_ROWS_PER_TASK,
                       help="queries per Ray task: a replica streams them through its engine (the engine drains at "
                            "the end of a task, so keep it well above --max-num-seqs); a dead replica's task is "
                            "asked again in full")


def check_args(args, parser) -> None:
    if min(args.num_replicas, args.cpus_per_replica, args.rows_per_task) < 1:
        parser.error("--num_replicas, --cpus_per_replica and --rows_per_task must be >= 1")
    if args.num_shards > 1:
        parser.error("--engine ray spreads the queries over its replicas itself: drop --num_shards/--shard_index")


# ---- connecting: fail in seconds, not after a hang --------------------------------------------------------------


def probe_address(address: str, timeout: float = ADDRESS_PROBE_SECONDS) -> None:
    """Raise ClusterError unless something accepts a TCP connection at RAY_ADDRESS's host:port within `timeout`."""
    parsed = urlparse(address if "://" in address else f"ray-gcs://{address}")
    host, port = parsed.hostname, parsed.port or DEFAULT_GCS_PORT
    if not host:
        raise ClusterError(f"RAY_ADDRESS={address!r} is not host:port (e.g. 10.0.0.1:6379 or ray://10.0.0.1:10001)")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise ClusterError(f"RAY_ADDRESS={address}: nothing answers at {host}:{port} within {timeout:g} s ({error}). "
                           f"Start the cluster first (`ray start --head` on {host}), or unset RAY_ADDRESS to run "
                           f"Ray on this node") from None


def replica_resources(args) -> dict[str, float]:
    """What one replica reserves: its tensor-parallel GPUs, or on a CPU-only driver its CPUs."""
    if engine.on_gpu():
        return {"GPU": args.tensor_parallel_size}
    return {"CPU": args.cpus_per_replica}


def resource_error(nodes: list[dict], replicas: int, need: dict[str, float]) -> str | None:
    """Why `replicas` replicas, each needing `need` on one node, do not fit on the alive `nodes` (each a dict of
    Ray resources, e.g. {"CPU": 16, "GPU": 8}); None when they fit."""
    (kind, per_replica), = need.items()
    room = [int(node.get(kind, 0) // per_replica) for node in nodes]
    if sum(room) >= replicas:
        return None
    have = ", ".join(f"{amount:g}" for amount in sorted((node.get(kind, 0) for node in nodes), reverse=True))
    return (f"--num_replicas {replicas} x {per_replica:g} {kind} (a replica's {kind}s on one node) needs room for "
            f"{replicas} replicas; the cluster's {len(nodes)} node(s) have {have} {kind} each, room for {sum(room)}. "
            f"Add nodes, or lower --num_replicas" + (" or --tensor_parallel_size" if kind == "GPU" else
                                                      " or --cpus_per_replica"))


def connect(args) -> None:
    """Join the cluster at RAY_ADDRESS, or without it start a Ray instance of our own on this node (never one that
    an earlier `ray start` left in /tmp/ray, which may be long dead); check it has room for the replicas.
    What it found goes into the run record (CLUSTER)."""
    address = os.environ.get("RAY_ADDRESS", "").strip() or "local"
    if address not in ("auto", "local"):
        probe_address(address)
    import ray

    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False,
                 **({"include_dashboard": False} if address == "local" else {}))
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {error}. If its nodes were "
                           f"started with token authentication (Ray's default for `ray start --head`), set "
                           f"RAY_AUTH_MODE=token here too, with the same token (~/.ray/auth_token or "
                           f"RAY_AUTH_TOKEN)") from None
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = resource_error(nodes, args.num_replicas, replica_resources(args))
    if problem:
        ray.shutdown()
        raise ClusterError(problem)
    CLUSTER.update(address="a Ray instance of this run" if address == "local" else address, nodes=len(nodes),
                   resources=ray.cluster_resources())


def replica_env(args) -> dict[str, str]:
    """The engine environment a replica gets: the driver's vLLM/HF settings, and on CPU torch threads = its CPUs."""
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV_PREFIXES)}
    if not engine.on_gpu():
        env["OMP_NUM_THREADS"] = str(args.cpus_per_replica)
    return env


# ---- a replica --------------------------------------------------------------------------------------------------


class TeacherReplica:
    """One vLLM engine and the teacher, built once per actor; each call streams a batch of queries through
    distill.teacher.stream and yields packets of finished answers as they come."""

    def __init__(self, args, prompt, settings: dict):
        from distill.teacher import VllmEngine

        self.args = args
        self.teacher = stage1.build_teacher(args, prompt)
        llm = engine.build_llm(args)
        self.params = stage1.teacher_sampling(llm, args, self.teacher, settings)
        self.engine = VllmEngine(llm)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict):
        import numpy as np

        from distill.teacher import StreamStats, stream

        rows = [json.loads(text) for text in batch["query"]]
        stats = StreamStats()
        started = time.time()
        packet, reported = [], dict.fromkeys(WORK_FIELDS, 0)

        def flush():
            work = {field: (getattr(stats, field) or 0) - reported[field] for field in WORK_FIELDS}
            reported.update({field: getattr(stats, field) or 0 for field in WORK_FIELDS})
            text = json.dumps({"replica": self.name, "started": started, "answers": packet, "work": work,
                               "cached_tokens_known": stats.cached_tokens is not None}, ensure_ascii=False)
            return {"packet": np.array([text], dtype=object)}  # one row: Ray Data cannot split a packet

        # A packet holds rows of the batch in input order, a fixed PACKET_ROWS of them, handed back once all are
        # answered. Ray retries a task killed mid-batch by running it again and, by our reading of a loss seen once
        # (2026-11-30: 2 of 40 rows), drops as many of the new run's first packets as the dead run had delivered: it
        # takes a generator to yield the same items again. Packets cut by time held other rows in the new run than
        # in the dead one; cut by position they hold the same rows, which the driver has already written.
        position = {row["id"]: number for number, row in enumerate(rows)}
        answered, next_row = {}, 0
        for outcome in stream(self.engine, self.teacher, rows, self.params, num_samples=self.args.num_samples,
                              max_retries=self.args.max_retries,
                              max_in_flight=self.args.max_in_flight or self.engine.max_num_seqs, stats=stats):
            answered[position[outcome.row["id"]]] = {
                "id": outcome.row["id"], "records": stage1.answer_records(outcome, self.args, self.teacher)}
            while all(number in answered for number in range(next_row, min(next_row + PACKET_ROWS, len(rows)))) \
                    and next_row < len(rows):
                packet = [answered.pop(number) for number in range(next_row, min(next_row + PACKET_ROWS, len(rows)))]
                next_row += len(packet)
                yield flush()
        if answered:  # stream yields one outcome per row, so nothing is left here; if it ever is, it goes back too
            packet = [answered[number] for number in sorted(answered)]
            yield flush()



# ---- the driver -------------------------------------------------------------------------------------------------


def replica_args(args):
    """The driver's args with local paths made absolute: a replica's working directory is Ray's, not ours."""
    args = copy(args)
    for name in ("model", "tokenizer"):
        value = getattr(args, name, None)
        if value and Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
    return args


def pipeline(args, teacher, todo: list[dict], settings: dict):
    """The Ray dataset whose blocks are the replicas' packets, as they finish."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    # Ray Data buffers a task's output until a block reaches this size; 1 byte: every packet travels on its own, now.
    data_context.target_max_block_size = 1
    data_context.enable_progress_bars = False  # our bar counts queries; Ray's would count blocks
    rows_per_task = min(args.rows_per_task, math.ceil(len(todo) / args.num_replicas))
    queries = ray.data.from_items([{"query": json.dumps(row, ensure_ascii=False)} for row in todo],
                                  override_num_blocks=math.ceil(len(todo) / rows_per_task))
    need = replica_resources(args)
    # One task per replica at a time: a task runs for minutes, so queueing more saves nothing, and Ray Data would
    # otherwise queue several on the first replica that is up while the others are still loading the model.
    pool = ray.data.ActorPoolStrategy(size=args.num_replicas, max_tasks_in_flight_per_actor=1)
    return queries.map_batches(
        TeacherReplica, batch_size=rows_per_task, compute=pool,
        fn_constructor_kwargs={"args": replica_args(args), "prompt": teacher.prompt, "settings": settings},
        num_gpus=need.get("GPU"), num_cpus=need.get("CPU"), runtime_env={"env_vars": replica_env(args)})


class DriverTally:
    """What the driver has written this run, and the figures of create_data's run record."""

    def __init__(self, stats):
        self.stats, self.written, self.by_replica, self.duplicates = stats, set(), Counter(), 0
        self.first_call = None  # wall time the first replica started on a batch: generation time starts there
        self.spans = {}  # replica -> [its first batch's start, its last packet's arrival], wall time

    def fresh(self, packet: dict) -> list[dict]:
        """The packet's answers not written yet (a retried batch hands back some a second time)."""
        answers = [answer for answer in packet["answers"] if answer["id"] not in self.written]
        self.duplicates += len(packet["answers"]) - len(answers)
        self.written.update(answer["id"] for answer in answers)
        return answers

    def add(self, packet: dict, answers: list[dict]) -> None:
        stats = self.stats
        if self.first_call is None or packet["started"] < self.first_call:
            self.first_call = packet["started"]
            stats.started = time.monotonic() - (time.time() - self.first_call)
        for field in WORK_FIELDS[:3]:
            setattr(stats, field, getattr(stats, field) + packet["work"][field])
        if packet["cached_tokens_known"]:
            stats.cached_tokens = (stats.cached_tokens or 0) + packet["work"]["cached_tokens"]
        for answer in answers:
            stats.count(answer["records"][0].get("reject", {}).get("reason"))  # a reject is its query's one record
        self.by_replica[packet["replica"]] += len(answers)
        span = self.spans.setdefault(packet["replica"], [packet["started"], 0.0])
        span[0], span[1] = min(span[0], packet["started"]), time.time()

    def seconds_by_replica(self) -> dict[str, float]:
        """How long each replica worked, from its first batch to its last packet: replicas that start late (or are
        restarted) work shorter than the run."""
        return {replica: round(last - first, 2) for replica, (first, last) in self.spans.items()}


class Interrupted(Exception):
    pass


def answer_queries(args, teacher, todo, selected, settings, files) -> tuple[dict, int | None]:
    """stage1.answer_queries on Ray: the same files, written by this process as the replicas' packets arrive.
    Returns (figures, signal that stopped the run or None)."""
    import signal

    import ray

    from distill.teacher import StopRequest, StreamStats

    tally = DriverTally(StreamStats())
    stop = StopRequest("create_data")
    writing = False

    def interrupt(number, frame):  # the wait for the next packet can be long (replicas starting): leave it at once
        stop.handle(number, frame)
        if not writing:  # a packet being written is finished first, so no row is torn
            raise Interrupted

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, interrupt)
    try:
        with stage1.answer_writer(files, tally.stats, selected, selected - len(todo)) as write:
            for block in pipeline(args, teacher, todo, settings).iter_batches(
                    batch_size=None, batch_format="numpy", prefetch_batches=0):
                for text in block["packet"]:
                    packet = json.loads(text)
                    answers = tally.fresh(packet)
                    tally.add(packet, answers)
                    writing = True
                    write([record for answer in answers for record in answer["records"]])
                    writing = False
                if stop.requested():
                    break
    except Interrupted:
        pass
    except Exception as error:  # a replica that cannot start (Ray Data gives up at once), a lost cluster, ...
        raise SystemExit(f"error: the Ray pipeline failed; the rows written so far are kept, the same command "
                         f"resumes after them. {type(error).__name__}: {str(error)[-3000:]}") from None
    finally:
        ray.shutdown()  # this job's replicas end with it
    summary = tally.stats.summary()
    summary["ray"] = {"cluster": CLUSTER, "replicas": args.num_replicas, "replica_resources": replica_resources(args),
                      "rows_per_task": min(args.rows_per_task, math.ceil(len(todo) / args.num_replicas)),
                      "rows_by_replica": dict(tally.by_replica), "seconds_by_replica": tally.seconds_by_replica(),
                      "retried_rows_skipped": tally.duplicates}
    return summary, stop.signal
