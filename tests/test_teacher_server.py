"""Stage 2b's teacher server (distill/teacher_server.py) and the client the server trainer sends it requests with.

On the embedded model in fp32, answers scored through the prompt's prefix cache equal, row by row, answers scored
without it (vLLM's default for prompt_logprobs), identical rollouts and rollouts sharing a block-aligned answer start
included: the cache hit stops before the first answer position, and a position a request does not score comes back
marked, never as a made-up value (stage 2b's CLI against the server, reading the prompt from its cache, is the
opd_4b_server.yaml case of tests/test_recipes.py). Flags of its own are refused before any model loads, and the client
refuses a response with a missing score.
"""

import random

import pytest

from tests.conftest import CLI_ENV, REPO

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
IN_SHORT = REPO / "prompts" / "in_short.md"
SERVER_FLAGS = [SMOLLM2, "--dtype", "float32", "--max-logprobs", "1", "--max-model-len", "4096", "--enforce-eager"]


@pytest.mark.parametrize("flags, message", [
    (["--scheduler-cls", "vllm.v1.core.sched.scheduler.Scheduler"], "sets its own"),
    (["--no-enable-prefix-caching"], "is the prefix cache"),
])
def test_the_server_refuses_flags_that_would_undo_it(capsys, flags, message):
    from distill.teacher_server import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(SMOLLM2), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_client_refuses_a_response_with_a_missing_score(monkeypatch):
    """A score the server marks as not computed (its contract: only before the first answer position) must never
    reach the loss as a value."""
    import trl.generation.vllm_client

    from distill.onpolicy import server_trainer_class
    from distill.teacher_server import NOT_SCORED

    class StandInClient:  # TRL's VLLMClient as the trainer uses it, one answer position marked
        def __init__(self, base_url, connection_timeout=0.0):
            self.base_url = base_url

        def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=1, temperature=1.0):
            scores = [[[-1.0]] * (len(s) - p) for s, p in zip(sequences, prompt_lengths)]
            scores[1][2] = [NOT_SCORED]
            return {"actual_logprobs": scores}

    monkeypatch.setattr(trl.generation.vllm_client, "VLLMClient", StandInClient)
    client = server_trainer_class().teacher_client_class(base_url="http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="no log-probability for answer token 2 of row 1"):
        client.get_sequence_logprobs([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]], [2, 2])


def rollouts(tokenizer):
    """Teacher inputs (in_short.md around three train queries) and sampled-looking answers: two identical rollouts,
    two whose answers share their first 160 tokens (past a 128-token CPU block boundary), and a short one."""
    from distill.prompts import load_prompt
    from distill.records import read_queries
    from distill.render import teacher_ids
    from distill.splits import select

    prompt = load_prompt(IN_SHORT)
    queries = [row["text"] for row in select(read_queries(str(REPO / "example-data" / "general_questions.jsonl")).rows,
                                             "train")][:3]
    draw = random.Random(0)

    def answer(length):
        return [draw.randrange(100, len(tokenizer) - 100) for _ in range(length)]

    a, b = answer(200), answer(200)
    rows = [(queries[0], a), (queries[0], a), (queries[1], b), (queries[1], b[:160] + answer(40)),
            (queries[2], answer(24))]
    teacher = [teacher_ids(tokenizer, prompt, query, scoring=True) for query, _ in rows]
    return [ids + answer for ids, (_, answer) in zip(teacher, rows)], [len(ids) for ids in teacher]


def test_a_server_that_does_not_come_up_says_so_and_leaves_nothing_running(tmp_path):
    """serving() raises its own error with the server's log, not the stop's (its process group is already gone)."""
    import os

    from distill.teacher_server import serving

    with pytest.raises(RuntimeError, match="the teacher server did not come up") as raised:
        with serving([tmp_path / "no-such-model"], tmp_path / "server.log", env=CLI_ENV):
            pass
    assert "no-such-model" in str(raised.value)  # the log's tail names what failed
    started = [line for line in os.popen("ps -eo args").read().splitlines() if "no-such-model" in line]
    assert not started, started


@pytest.mark.slow
def test_answers_scored_through_the_prompt_cache_equal_answers_scored_without_it(tmp_path):
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    import requests
    from transformers import AutoTokenizer
    from trl.generation.vllm_client import VLLMClient

    from distill.onpolicy import server_trainer_class
    from distill.teacher_server import NOT_SCORED, PROMPT_LOGPROBS_FROM, prompt_token_counts, serving

    sequences, starts = rollouts(AutoTokenizer.from_pretrained(SMOLLM2))
    with serving(SERVER_FLAGS, tmp_path / "server.log", env=CLI_ENV) as url:
        plain = VLLMClient(base_url=url).get_sequence_logprobs(sequences, starts, top_logprobs=1)
        client = server_trainer_class().teacher_client_class(base_url=url)
        before = prompt_token_counts(url)
        cached = client.get_sequence_logprobs(sequences, starts, top_logprobs=1)
        received, read_from_cache = (after - then for after, then in zip(prompt_token_counts(url), before))

        assert received == sum(map(len, sequences))
        # The prompt came from the cache (~1,940 shared tokens per row, 128-token blocks), and nothing past the
        # earliest answer start did, although the requests above left every answer here in the cache.
        assert 5 * 1800 <= read_from_cache <= 5 * (min(starts) - 1)
        largest = 0.0
        for row, (with_cache, without) in enumerate(zip(cached["actual_logprobs"], plain["actual_logprobs"])):
            assert len(with_cache) == len(without) == len(sequences[row]) - starts[row]
            assert cached["logprob_token_ids"][row] == plain["logprob_token_ids"][row]
            largest = max(largest, *(abs(x[0] - y[0]) for x, y in zip(with_cache, without)))
        print(f"largest difference with and without the cache: {largest:.2e}")
        assert largest <= 1e-4

        # Without the cap, the identical rollout's cache hit runs 150 tokens into its answer: the server marks those
        # positions as not scored, and scores the rest as without the cache.
        before = prompt_token_counts(url)
        response = requests.post(f"{url}/v1/completions", json={
            "model": client.model, "prompt": sequences[0], "max_tokens": 1, "prompt_logprobs": 1,
            "vllm_xargs": {PROMPT_LOGPROBS_FROM: starts[0] + 150}}).json()["choices"][0]["prompt_logprobs"]
        assert prompt_token_counts(url)[1] - before[1] > starts[0]  # the hit reached the answer
        scores = [response[p][str(sequences[0][p])]["logprob"] for p in range(starts[0], len(sequences[0]))]
        assert scores[:150] == [NOT_SCORED] * 150
        assert max(abs(x - y[0]) for x, y in zip(scores[150:], plain["actual_logprobs"][0][150:])) <= 1e-4
