"""Bench (c): SFT throughput with padded batches vs padding-free batches (TRL `padding_free`), same rows and model.

    .venv/bin/python bench/train_padding.py --model models/SmolLM2-135M-Instruct --steps 8

Padding-free concatenates a batch's sequences into one row with position_ids restarting per sequence;
transformers builds a block-diagonal causal mask from them, so no token attends across examples and none is padding.
Prints real (non-pad) tokens/s for both and the ratio. Runs train_sft_trl.py's own trainer builder.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tokens_per_second(model: str, data: str, steps: int, padding_free: bool, out: str) -> tuple[float, float]:
    import train_sft_trl

    argv = ["--config", "recipes/cpu.yaml", "--model_name_or_path", model, "--dataset_name", data,
            "--max_steps", str(steps), "--output_dir", out, "--report_to", "none", "--logging_steps", "1",
            "--padding_free", str(padding_free), "--per_device_train_batch_size", "8", "--seed", "0"]
    script_args, training_args, model_args = train_sft_trl.parse_args(argv)
    if padding_free:
        training_args.max_length = None  # TRL cannot truncate padding-free rows; ours are < 200 tokens anyway
    data = train_sft_trl.prepare(script_args, training_args, model_args)
    trainer = train_sft_trl.build_trainer(script_args, training_args, model_args, data)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    # TRL's num_tokens counts real (non-pad) tokens; the seeded sampler gives both runs the same rows.
    logs = [entry for entry in trainer.state.log_history if "num_tokens" in entry]
    return float(logs[-1]["num_tokens"]) / seconds, float(logs[-1]["loss"])


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
