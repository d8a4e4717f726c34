"""What the pipeline benches (kd_vs_ce.py, synthetic_queries.py) share: the stage scripts run as subprocesses,
each with its log, and the settings `make demo` uses for the embedded model on the French task."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "models/SmolLM2-135M-Instruct"
FRENCH_PROMPT = "prompts/answer_in_french.md"
GENERAL_QUESTIONS = "example-data/general_questions.jsonl"
# scripts/demo.sh's French teacher: greedy, as the prompt was measured (SmolLM2 has no generation_config, so vLLM's
# default would be temperature 1), no redraws (a greedy redraw repeats the answer), answers capped at 40 tokens.
FRENCH_TEACHER = ["--temperature", "0", "--max_retries", "0", "--max_tokens", "40", "--max_in_flight", "16"]
FRENCH_EPOCHS = 2
# scripts/demo.sh's behaviour part (prompts/in_short.md): greedy, no redraws, 48 tokens, BEHAVIOUR_EPOCHS 2.
IN_SHORT_PROMPT = "prompts/in_short.md"
IN_SHORT_TEACHER = ["--temperature", "0", "--max_retries", "0", "--max_tokens", "48", "--max_in_flight", "16"]


def run(work_dir: str | Path, name: str, *command) -> None:
    """One stage as a subprocess from the repo root, its output in <work_dir>/logs/<name>.log; on failure the log's
    last 30 lines and exit."""
    log = Path(work_dir) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        status = subprocess.call([str(part) for part in command], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if status:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"bench: {name} failed (exit {status}); the end of {log}:\n" + "\n".join(tail))
    print(f"bench: {name} done in {time.monotonic() - started:.0f} s (log {log})", flush=True)


def train(work_dir, name: str, data: Path, output_dir: Path, epochs: int, *flags) -> dict:
    """train_trl.sh with recipes/cpu.yaml (the demo's student recipe); returns the run record."""
    import json
    import os

    os.environ.update(RECIPE="recipes/cpu.yaml", DATA=str(data), WANDB_MODE="disabled")
    run(work_dir, name, "bash", "train_trl.sh", "--num_train_epochs", epochs, "--output_dir", output_dir,
        "--overwrite", *flags)
    return json.loads((output_dir / "distill_run.json").read_text(encoding="utf-8"))
