"""Bench: an in-process on-policy teacher scoring answers with and without the prompt's KV cache, same rows, one run.

    .venv/bin/python bench/prompt_cache.py                        # prompts/in_short.md (~2,000 tokens), 32 rows
    .venv/bin/python bench/prompt_cache.py --prompt_file prompts/answer_in_french.md --rows 64

The embedded SmolLM2-135M is the teacher (the self-teacher of stage 2b's demo). Each row is a train-split question
and a 24-token answer; the teacher forward of train_opd_trl.py (distill.onpolicy.teacher_hidden_states) runs over
the rows in batches of --batch_size, first without the cache (every row forwards the whole prompt), then with it
(the prompt's KV cache computed once, each row forwards its query turn and answer). Prints the answer tokens scored
per second both ways, their ratio, and the largest difference between the two results (they must agree).
"""

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cache_bench_parser(description: str) -> argparse.ArgumentParser:
    """The flags both prompt-cache benches take (this one, in process; bench/server_prompt_cache.py, on the server),
    so the two measure the same rows, batches and answer lengths."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--prompt_file", default="prompts/in_short.md")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--answer_tokens", type=int, default=24)
    return parser


def main(argv=None):
    args = cache_bench_parser(__doc__).parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.onpolicy import PrefixCache, TeacherInputs, shared_prefix, teacher_hidden_states
    from distill.prompts import load_prompt
    from distill.records import read_queries
    from distill.splits import select

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompt = load_prompt(args.prompt_file)
    queries = [row["text"] for row in select(read_queries("example-data/general_questions.jsonl").rows, "train")]
    queries = queries[: args.rows]
    prefix = shared_prefix(tokenizer, prompt)
    teacher = TeacherInputs.build(tokenizer, prompt, queries, prefix)
    answers = torch.randint(100, len(tokenizer) - 100, (len(queries), args.answer_tokens))
    mask = torch.ones_like(answers)

    def score(cache):
        outputs, started = [], time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(queries), args.batch_size):
                batch = slice(start, start + args.batch_size)
                outputs.append(teacher_hidden_states(model.model, teacher.suffixes[batch], answers[batch],
                                                     mask[batch], prefix, cache))
        return torch.cat(outputs), time.perf_counter() - started

    plain, plain_seconds = score(None)
    cache = PrefixCache(prefix)
    cached, cached_seconds = score(cache)
    scored = answers.numel()
    difference = (plain - cached).abs().max().item()
    print(f"bench: on-policy teacher scoring with and without the prompt's KV cache, {datetime.date.today()}, "
          f"{args.model}, {args.prompt_file} ({len(prefix)} shared prompt tokens), {len(queries)} rows x "
          f"{args.answer_tokens} answer tokens, batch {args.batch_size}")
    print(f"  without the cache: {scored / plain_seconds:8.1f} answer tokens/s ({plain_seconds:.1f} s)")
    print(f"  with the cache:    {scored / cached_seconds:8.1f} answer tokens/s ({cached_seconds:.1f} s, the prompt "
          f"forwarded once: {cache.tokens_computed} tokens)")
    print(f"  speed-up {plain_seconds / cached_seconds:.1f}x; largest hidden-state difference {difference:.2e}")


if __name__ == "__main__":
    main()
