import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXAMPLE_DATA = REPO / "example-data" / "language_id.jsonl"

# The environment every CLI runs under in tests: offline, one thread, no wandb.
CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
CLI_ENV.pop("WANDB_MODE", None)
CLI_ENV.pop("WANDB_API_KEY", None)
# This process runs stages too (run_main): the same settings, and vLLM's engine in this process, not a child of it.
os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1",
                  VLLM_ENABLE_V1_MULTIPROCESSING="0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _key in ("WANDB_MODE", "WANDB_API_KEY"):
    os.environ.pop(_key, None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random Qwen3 (hidden 64, 2 layers) with a ~1k-token tokenizer, built once per test session."""
    from tests.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def example_rows() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE_DATA.read_text(encoding="utf-8").splitlines()]


def write_teacher_file(path: Path, rows: list[dict], answer=lambda row: row["label"]) -> Path:
    """Stage-1-shaped JSONL from example rows, with a chosen assistant answer (the gold label by default)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            out = {"id": row["id"], "group": row["group"], "label": row["label"],
                   "messages": [{"role": "user", "content": row["text"]},
                                {"role": "assistant", "content": answer(row)}]}
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_model, example_rows, tmp_path_factory) -> dict:
    """One real 2-step train_sft_trl.py CLI run (recipes/cpu.yaml) on the gold teacher file, shared by the tests that
    read what it wrote or score the adapter: {"dir", "data", "stdout", "model_hash_before"}."""
    import hashlib

    data = write_teacher_file(tmp_path_factory.mktemp("data") / "teacher.jsonl", example_rows)
    model_hash = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run_cli("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_model,
                     "--dataset_name", data, "--output_dir", out, "--report_to", "none", "--max_steps", 2)
    return {"dir": out, "data": data, "stdout": result.stdout, "model_hash_before": model_hash}


@pytest.fixture()
def gold_teacher_file(tmp_path, example_rows) -> Path:
    """Stage-1-shaped JSONL whose 'teacher' answers are the gold labels (no vLLM needed)."""
    return write_teacher_file(tmp_path / "teacher.jsonl", example_rows)


def run_cli(*args, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    """Run a stage script (or any command) from the repo root the way a user would."""
    command = [sys.executable, *map(str, args)] if str(args[0]).endswith(".py") else list(map(str, args))
    result = subprocess.run(command, cwd=REPO, env={**CLI_ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                             f"--- stderr\n{result.stderr[-4000:]}")
    return result


def run_main(script: str, *args, check=True) -> subprocess.CompletedProcess:
    """A stage script's main() in this process, as `run_cli` would run the script: the same argv (so the run record
    names the command) and working directory, its output captured, the exit status as a process would have it (a
    sys.exit message or an uncaught exception's traceback is its stderr, with status 1). For tests of a stage's
    behaviour, where a process of its own is not the point: no interpreter start-up or imports per call, and an engine
    shared through `shared_engines`."""
    import contextlib
    import importlib
    import io
    import signal
    import traceback
    from unittest import mock

    main = importlib.import_module(script.removesuffix(".py")).main
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    saved_argv, sys.argv, cwd = sys.argv, [script, *argv], os.getcwd()
    os.chdir(REPO)  # where run_cli runs the scripts: relative paths (recipes/, example-data/) mean the same
    # Training ends the process group it ran in (Trainer.end); here that is the one vLLM's engines in this process
    # set up and still use. A process of its own would have had none to end.
    import torch.distributed

    keep_group = (mock.patch.object(torch.distributed, "destroy_process_group", lambda group=None: None)
                  if torch.distributed.is_initialized() else contextlib.nullcontext())
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), keep_group:
            try:
                main(argv)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(cwd)
        for number, handler in handlers.items():  # a stage's StopRequest takes over Ctrl-C: give it back
            signal.signal(number, handler)
    result = subprocess.CompletedProcess([script, *argv], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(argv)} exited {code}\n--- stdout\n{result.stdout[-4000:]}\n"
                             f"--- stderr\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def shared_engines():
    """vLLM engines built in this process once per set of engine arguments and kept for the session (the last
    three): every stage run in-process through run_main with the same model and engine flags (--max-model-len,
    dtype, seed, ...) reuses one instead of starting its own. Sampling state aside (a reused engine's seeded
    generator has moved on), a reused engine answers as a new one would."""
    import gc

    from distill import engine

    built, cache = engine.build_llm, {}

    def build_llm(args, **overrides):
        kwargs = {**engine.engine_kwargs(args), **overrides}
        key = repr(sorted(kwargs.items()))
        if key not in cache:
            while len(cache) >= 3:
                del cache[next(iter(cache))]
                gc.collect()
            cache[key] = built(args, **overrides)
        cache[key] = cache.pop(key)  # the most recently used last
        return cache[key]

    engine.build_llm = build_llm
    yield build_llm
    engine.build_llm = built
    cache.clear()
    gc.collect()


# The longest test files first (2026-12-07 timings from a fresh clone's run, seconds): `make test` runs `pytest -n 2
# --dist loadfile --no-loadscope-reorder`, which hands whole files to its two workers in this order; a long file handed
# out last leaves the other worker idle while it runs (the Ray file, last, made the suite 16.6 min instead of about 13).
LONGEST_FILES_FIRST = ("test_ray_stage.py",       # ~265: a Ray cluster, 3 runs of 2 vLLM replicas
                       "test_create_data.py",     # ~150: kills and resumes, launcher, embedded-model runs
                       "test_teacher_server.py",  # ~70: a teacher server, cached against uncached
                       "test_recipes.py",         # ~45: every recipe's stage on a tiny model, one teacher server
                       "test_distributed.py",     # ~35: 2-process launches
                       "test_gpu_check.py", "test_multinode.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: number for number, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
