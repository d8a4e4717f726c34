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
