"""Bench (b): what distillation saves at inference: the student without the prompt vs the teacher with it.

    .venv/bin/python bench/prompt_cost.py --model models/SmolLM2-135M-Instruct --requests 40

One vLLM engine, one model, the same queries; each request sent alone (batch 1) so latency is per request.
The prefix cache is off so the with-prompt request pays for its prompt as a cold request does (with a warm cache
the gap is smaller: both numbers are printed). Prints input tokens per request, median latency and the ratios.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill import engine  # noqa: E402
from distill.prompts import load_prompt  # noqa: E402
from distill.render import student_text, teacher_text  # noqa: E402


def median_latency(llm, prompts, params) -> float:
    times = []
    for prompt in prompts:
        started = time.time()
        llm.generate([prompt], params, use_tqdm=False)
        times.append(time.time() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    engine.configure_env()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = load_prompt()
    rows = [json.loads(line) for line in Path("example-data/language_id.jsonl").read_text().splitlines()]
    rows = rows[: args.requests]
    results = {}
    for caching in (False, True):
        llm = LLM(model=args.model, dtype="float32", enforce_eager=True, enable_prefix_caching=caching,
                  max_model_len=4096, seed=0)
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        for name, texts in (
            ("teacher + prompt", [teacher_text(tokenizer, prompt, r["text"]) for r in rows]),
            ("student, no prompt", [student_text(tokenizer, r["text"]) for r in rows]),
        ):
            ids = [TokensPrompt(prompt_token_ids=tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
            tokens = statistics.mean(len(p["prompt_token_ids"]) for p in ids)
            results[(name, caching)] = (tokens, median_latency(llm, ids, params))
        del llm
    print(f"\nbench prompt_cost: {args.model}, {len(rows)} requests one at a time, 4 new tokens each")
    for caching in (False, True):
        teacher, student = results[("teacher + prompt", caching)], results[("student, no prompt", caching)]
        print(f"  prefix cache {'on ' if caching else 'off'}: teacher {teacher[0]:.0f} tokens, "
              f"{1000 * teacher[1]:.0f} ms | "
              f"student {student[0]:.0f} tokens, {1000 * student[1]:.0f} ms | "
              f"ratio: {teacher[0] / student[0]:.1f}x tokens, {teacher[1] / student[1]:.1f}x latency")


if __name__ == "__main__":
    main()
