"""Bench: the on-policy teacher server scoring the same rollouts with the prompt read from its prefix cache and
without (vLLM's default for prompt_logprobs), one server, one run.

    .venv/bin/python bench/server_prompt_cache.py                  # prompts/in_short.md (~2,000 tokens), 32 rows
    .venv/bin/python bench/server_prompt_cache.py --prompt_file prompts/language_identification.md --rows 64

`python -m distill.teacher_server` serves the embedded SmolLM2-135M (fp32). Each row is a train-split question
rendered with the prompt, as stage 2b's teacher reads it, and a 24-token answer; rows go to the server in requests
of --batch_size, as the trainer sends one per micro-batch: first through stage 2b's client (each request names its
answers' start, so the server reads the prompt before it from the cache; the prompt is computed once, on the first
request), then through TRL's VLLMClient (the whole input computed for every row). Prints the answer tokens scored
per second both ways, their ratio, what share of the tokens the teacher computed was the shared prompt (from the
server's own counts of prompt tokens and of tokens read from the cache), and the largest difference between the two
results' log-probabilities (they must agree).
"""

import datetime
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.prompt_cache import cache_bench_parser  # noqa: E402


def main(argv=None):
    args = cache_bench_parser(__doc__).parse_args(argv)

    import os
    import random

    from transformers import AutoTokenizer
    from trl.generation.vllm_client import VLLMClient

    from distill.engine import configure_env
    from distill.onpolicy import server_trainer_class, shared_prefix
    from distill.prompts import load_prompt
    from distill.records import read_queries
    from distill.render import teacher_ids
    from distill.splits import select
    from distill.teacher_server import prompt_token_counts, serving

    configure_env()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = load_prompt(args.prompt_file)
    queries = [row["text"] for row in select(read_queries("example-data/general_questions.jsonl").rows, "train")]
    queries = queries[: args.rows]
    prefix = shared_prefix(tokenizer, prompt)
    draw = random.Random(0)
    teacher = [teacher_ids(tokenizer, prompt, query, scoring=True) for query in queries]
    sequences = [ids + [draw.randrange(100, len(tokenizer) - 100) for _ in range(args.answer_tokens)]
                 for ids in teacher]
    starts = [len(ids) for ids in teacher]
    batches = [slice(start, start + args.batch_size) for start in range(0, len(queries), args.batch_size)]

    def score(client, url):
        before, started = prompt_token_counts(url), time.perf_counter()
        scores = [value[0] for batch in batches for row in client.get_sequence_logprobs(
            sequences[batch], starts[batch], top_logprobs=1)["actual_logprobs"] for value in row]
        seconds = time.perf_counter() - started
        received, from_cache = (after - then for after, then in zip(prompt_token_counts(url), before))
        computed = received - from_cache
        # The cache holds nothing past the shared prompt here (rows differ from their query on), so every token
        # read from it is a prompt token.
        prompt_computed = len(prefix) * len(sequences) - from_cache
        return scores, seconds, computed, prompt_computed

    log = Path(tempfile.mkdtemp()) / "teacher_server.log"
    flags = [args.model, "--dtype", "float32", "--max-logprobs", "1", "--max-model-len", "4096", "--enforce-eager"]
    with serving(flags, log, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}) as url:
        cached_client = server_trainer_class().teacher_client_class(base_url=url)
        plain_client = VLLMClient(base_url=url)
        plain_client.get_sequence_logprobs([list(range(1000, 1100))], [50], top_logprobs=1)  # warm-up, unshared
        cached, cached_seconds, cached_computed, cached_prompt = score(cached_client, url)
        plain, plain_seconds, plain_computed, plain_prompt = score(plain_client, url)
    scored = len(cached)
    difference = max(abs(x - y) for x, y in zip(cached, plain))
    print(f"bench: the teacher server scoring rollouts with and without the prompt's prefix cache, "
          f"{datetime.date.today()}, {args.model}, {args.prompt_file} ({len(prefix)} shared prompt tokens), "
          f"{len(queries)} rows x {args.answer_tokens} answer tokens, requests of {args.batch_size} rows")
    print(f"  without the cache: {scored / plain_seconds:8.1f} answer tokens/s ({plain_seconds:.1f} s; "
          f"{plain_computed:,} tokens computed, {plain_prompt / plain_computed:.0%} of them the prompt)")
    print(f"  with the cache:    {scored / cached_seconds:8.1f} answer tokens/s ({cached_seconds:.1f} s; "
          f"{cached_computed:,} tokens computed, {cached_prompt / cached_computed:.0%} of them the prompt)")
    print(f"  speed-up {plain_seconds / cached_seconds:.1f}x; largest log-probability difference {difference:.2e}")


if __name__ == "__main__":
    main()
