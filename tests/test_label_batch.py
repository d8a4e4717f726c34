"""create_data.label_batch against a scripted engine: retries, rejects, majority votes and request pairing,
without starting vLLM."""

from argparse import Namespace
from types import SimpleNamespace

import create_data
from distill.prompts import load_prompt

PROMPT = load_prompt()


class ScriptedLLM:
    """Answers each request from `script(query_id, attempt, sample)`; records every call."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(len(prompts))
        outputs = []
        for prompt, param in zip(prompts, params, strict=True):
            query_id = prompt["prompt_token_ids"][0]
            attempt = len(self.calls) - 1
            outputs.append(SimpleNamespace(outputs=[
                SimpleNamespace(text=self.script(query_id, attempt, k), finish_reason="stop") for k in range(param.n)
            ]))
        return outputs


def args(**overrides):
    base = dict(constrain_labels=False, max_retries=2, num_samples=1, temperature=0.15, max_tokens=64, save_raw=True)
    return Namespace(**{**base, **overrides})


def run(script, rows, **overrides):
    llm = ScriptedLLM(script)
    # The first prompt token carries the row's index, so the script knows which query it answers.
    prompt_ids = {row["id"]: [index, 1, 2] for index, row in enumerate(rows)}
    written, rejected = create_data.label_batch(llm, rows, prompt_ids, PROMPT, args(**overrides), 4096, False)
    return written, rejected, llm


ROWS = [{"id": f"r{i}", "text": f"text {i}", "group": "g"} for i in range(4)]


def test_a_bad_answer_is_retried_and_the_fresh_sample_kept():
    written, rejected, llm = run(lambda q, attempt, k: "no idea" if attempt == 0 else "Final Answer: fr", ROWS[:1])
    assert not rejected and llm.calls == [1, 1]
    assert written[0]["messages"][1] == {"role": "assistant", "content": "fr"}
    assert written[0]["teacher"]["invalid_samples"] == 1 and written[0]["teacher"]["raw"] == ["Final Answer: fr", "no idea"]
    assert written[0]["group"] == "g"  # input columns are carried through


def test_an_answer_that_never_parses_is_rejected_with_every_raw_output():
    written, rejected, llm = run(lambda q, attempt, k: "<think>hmm fr or es", ROWS[:1], max_retries=2)
    assert not written and llm.calls == [1, 1, 1]  # 1 try + 2 retries
    assert rejected[0]["reason"] == "unclosed_reasoning" and len(rejected[0]["failures"]) == 3
    assert rejected[0]["text"] == "text 0" and rejected[0]["group"] == "g"


def test_num_samples_majority_keeps_the_votes():
    labels = {0: "fr", 1: "fr", 2: "es"}
    written, _, _ = run(lambda q, attempt, k: f"Final Answer: {labels[k]}", ROWS[:1], num_samples=3)
    assert written[0]["messages"][1]["content"] == "fr"
    assert written[0]["teacher"]["votes"] == {"fr": 2, "es": 1}


def test_answers_are_paired_with_their_own_query():
    answers = ["ar", "de", "el", "en"]
    written, _, _ = run(lambda q, attempt, k: f"Final Answer: {answers[q]}", ROWS)
    assert [(row["id"], row["messages"][1]["content"]) for row in written] == [("r0", "ar"), ("r1", "de"), ("r2", "el"), ("r3", "en")]
    assert [row["messages"][0]["content"] for row in written] == [row["text"] for row in ROWS]


def test_a_query_longer_than_the_context_is_rejected_without_a_request():
    llm = ScriptedLLM(lambda q, attempt, k: "Final Answer: fr")
    prompt_ids = {"r0": list(range(5000)), "r1": [1, 2, 3]}
    written, rejected = create_data.label_batch(llm, ROWS[:2], prompt_ids, PROMPT, args(), 4096, False)
    assert [r["id"] for r in rejected] == ["r0"] and rejected[0]["reason"] == "too_long"
    assert [r["id"] for r in written] == ["r1"] and llm.calls == [1]
