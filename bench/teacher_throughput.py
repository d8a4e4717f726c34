"""Bench (a): stage 1 through vLLM vs a plain transformers `generate` loop, same model, prompts and token budget.

    .venv/bin/python bench/teacher_throughput.py --model models/SmolLM2-135M-Instruct --queries 32

Both answer the same N teacher requests (long prompt + query), greedy, `--max_tokens` new tokens each. vLLM runs
them as one batch with prefix caching (the prompt is computed once); the loop is what the public scripts do: one
request at a time through `model.generate`. Prints queries/s for both and the ratio.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill import engine  # noqa: E402
from distill.prompts import load_prompt  # noqa: E402
from distill.render import teacher_text  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=8)
    args = parser.parse_args()
    engine.configure_env()
    prompt = load_prompt()
    rows = [json.loads(line) for line in Path("example-data/language_id.jsonl").read_text().splitlines()]
    rows = rows[: args.queries]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [teacher_text(tokenizer, prompt, row["text"]) for row in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    started = time.time()
    with torch.inference_mode():
        for text in texts:
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    hf_seconds = time.time() - started
    del model

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, enable_prefix_caching=True,
              max_model_len=4096, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    started = time.time()
    llm.generate(texts, params, use_tqdm=False)
    vllm_seconds = time.time() - started

    n = len(texts)
    print(f"\nbench teacher_throughput: {n} teacher requests ({args.model}, ~{len(tokenizer(texts[0]).input_ids)} "
          f"input tokens each, {args.max_tokens} new tokens, greedy)")
    print(f"  transformers generate loop: {n / hf_seconds:.2f} queries/s ({hf_seconds:.1f} s)")
    print(f"  vLLM batched + prefix cache: {n / vllm_seconds:.2f} queries/s ({vllm_seconds:.1f} s)")
    print(f"  ratio vLLM / transformers: {hf_seconds / vllm_seconds:.1f}x")


if __name__ == "__main__":
    main()
