"""Bench (c): SFT throughput with padded batches vs padding-free batches (TRL `padding_free`), same rows and model.

    .venv/bin/python bench/train_padding.py --model models/SmolLM2-135M-Instruct --steps 8

Padding-free concatenates a batch's sequences into one row with position_ids restarting per sequence;
transformers builds a block-diagonal causal mask from them, so no token attends across examples and none is padding.
Prints real (non-pad) tokens/s for both and the ratio. Runs stage 2's CLI, as users run it.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tokens_per_second(model: str, data: str, steps: int, padding_free: bool, out: str) -> tuple[float, float]:
    """Stage 2 as users run it (its CLI, in a process of its own), the throughput read from its run record:
    TRL's num_tokens counts real (non-pad) tokens, train_runtime times the training loop alone; the seeded sampler
    gives both runs the same rows."""
    import json
    import subprocess

    argv = ["--config", "recipes/cpu.yaml", "--model_name_or_path", model, "--dataset_name", data,
            "--max_steps", str(steps), "--output_dir", out, "--report_to", "none", "--logging_steps", "1",
            "--padding_free", str(padding_free), "--per_device_train_batch_size", "8", "--seed", "0",
            "--fingerprint_probes", "0"]
    subprocess.run([sys.executable, "train_sft_trl.py", *argv], cwd=REPO, check=True, capture_output=True)
    record = json.loads((Path(out) / "distill_run.json").read_text())
    logs = [entry for entry in record["log_history"] if "num_tokens" in entry]
    return float(logs[-1]["num_tokens"]) / record["train_metrics"]["train_runtime"], float(logs[-1]["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--data", default="example-data/language_id.jsonl")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import json
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    # example-data rows as stage-1 rows with their gold answers
    data = tmp / "rows.jsonl"
    with open(data, "w") as handle:
        for line in Path(args.data).read_text().splitlines():
            row = json.loads(line)
            handle.write(json.dumps({"id": row["id"], "group": row["group"], "messages": [
                {"role": "user", "content": row["text"]}, {"role": "assistant", "content": row["label"]}]}) + "\n")
    padded = tokens_per_second(args.model, str(data), args.steps, False, str(tmp / "padded"))
    free = tokens_per_second(args.model, str(data), args.steps, True, str(tmp / "free"))
    print(f"\nbench train_padding: {args.model}, LoRA r32, batch 8, {args.steps} steps each, fp32 CPU")
    print(f"  padded batches:       {padded[0]:.0f} real tokens/s (last loss {padded[1]:.3f})")
    print(f"  padding-free batches: {free[0]:.0f} real tokens/s (last loss {free[1]:.3f})")
    print(f"  ratio padding-free / padded: {free[0] / padded[0]:.2f}x")


if __name__ == "__main__":
    main()
