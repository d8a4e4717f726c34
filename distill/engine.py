"""Building the vLLM engine from CLI flags, with the CPU defaults kept in one place.

Stage scripts call `configure_env()` before anything imports vllm (vLLM reads its env vars at import time),
then `add_engine_args(parser)` so every vLLM engine flag (--max-model-len, --gpu-memory-utilization,
--reasoning-parser, ...) is a flag of the stage, and `build_llm(args)` to start the engine.
"""

import dataclasses
import os
import shutil

# Measured on a 2-core CPU box: without a KV-cache size vLLM claims most of RAM, the multiprocess engine costs
# start-up time and memory for nothing, and bf16 runs 3-6x slower than fp32.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
    "VLLM_NO_USAGE_STATS": "1",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",  # progress bars and our summaries stay readable; set INFO to see engine stats
}


def on_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def configure_env() -> None:
    if not on_gpu():
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)


def add_engine_args(parser):
    from vllm.engine.arg_utils import EngineArgs

    group = parser.add_argument_group("vLLM engine (all of vLLM's EngineArgs)")
    EngineArgs.add_cli_args(group)
    parser.set_defaults(
        enable_prefix_caching=True,  # the long prompt is a shared prefix: computed once, reused by every query
        dtype="auto" if on_gpu() else "float32",
        seed=0,  # per-request seeds crash with chunked prefill on CPU; seed the engine instead
    )
    if not on_gpu():
        # torch.compile warm-up costs ~90 s per engine start on 2 cores (measured) and buys little for small models
        parser.set_defaults(enforce_eager=True)
    return parser


def engine_kwargs(args) -> dict:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(args, f.name)}


def build_llm(args, **overrides):
    from vllm import LLM

    return LLM(**{**engine_kwargs(args), **overrides})
