"""Query synthesis (create_queries.py): deduplication on hand-made texts, reading a model's answer as one query, the
plan and the streaming loop against a fake engine that finishes requests out of order, and the CLI on the tiny
model: queries written with provenance, then a resumed run with a larger N, and bad input refused before vLLM."""

import json
import random
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from distill.dedup import NearDuplicateIndex, normalise
from distill.prompts import load_prompt
from distill.records import RunRecord, read_jsonl
from distill.run_files import RunFiles
from distill.synthesis import Plan, QueryWriter, parse_query, query_id, spread, synthesise
from tests.conftest import REPO, run_main

FRENCH = REPO / "prompts" / "answer_in_french.md"


# ---- deduplication ------------------------------------------------------------------------------------------------


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  What's the  CAPITAL of Japan?!  ") == normalise("whats the capital of japan") == \
        "whats the capital of japan"
    assert normalise("« Pourquoi la mer est-elle salée ? »") == "pourquoi la mer estelle salée"
    assert normalise("ＡＢＣ") == "abc"  # full-width letters


def test_dedup_drops_exact_and_near_duplicates_and_keeps_different_queries():
    index = NearDuplicateIndex(threshold=0.7)
    assert index.add("What is the capital of Japan?") is None
    assert index.add("what is the capital of JAPAN") == "duplicate"
    assert index.add("What is the capital city of Japan?") == "near_duplicate"
    assert index.add("What is the capital of France?") is None  # same template, another question
    assert index.add("Why do cats purr?") is None
    assert index.add("!!!") == "empty_after_normalising"
    assert len(index) == 3


def test_dedup_names_copies_of_seed_examples():
    index = NearDuplicateIndex()
    index.add("How do I add an item to a list in Python?", origin="seed")
    assert index.add("how do I add an item to a list in python") == "copies_seed_example"
    assert index.add("How do I add one item to a list in Python?") == "near_seed_example"
    assert index.add("How do I sort a list in Python?") is None
    assert len(index) == 1


def test_no_human_written_question_is_a_near_duplicate_of_another_at_the_default_threshold():
    rows = read_jsonl(REPO / "example-data" / "general_questions.jsonl")
    index = NearDuplicateIndex()
    assert [row["text"] for row in rows if index.add(row["text"])] == []


# ---- the parser ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output, query", [
    ("What is a comet?", "What is a comet?"),
    ('"What is a comet?"', "What is a comet?"),
    ("1. What is a comet?\n2. What is a star?", "What is a comet?"),
    ("Here is a message:\n\n**Question:** “How do I boil an egg?”", "How do I boil an egg?"),
    ("- Chocolate   cake recipe please", "Chocolate cake recipe please"),
    ("<think>they want a question</think>\nWhy is the sky blue?", "Why is the sky blue?"),
])
def test_the_first_message_line_is_the_query(output, query):
    parsed = parse_query(output, "stop")
    assert (parsed.answer, parsed.reason) == (query, "ok")


@pytest.mark.parametrize("output, finish_reason, reason", [
    ("", "stop", "empty"),
    ("Here you go:\n\n", "stop", "empty"),
    ("Hi?", "stop", "too_short"),
    ("why " * 100, "stop", "too_long"),
    ("What is the tallest mountain in", "length", "cut_at_max_tokens"),
    ("<think>let me think about a good", "length", "cut_at_max_tokens"),
])
def test_outputs_that_are_not_one_query_are_rejected_with_a_reason(output, finish_reason, reason):
    parsed = parse_query(output, finish_reason, min_chars=8, max_chars=300)
    assert (parsed.answer, parsed.reason) == (None, reason)


def test_a_complete_first_line_survives_a_cut_later_in_the_output():
    assert parse_query("What is a comet?\nAnd another one about", "length").answer == "What is a comet?"


# ---- the plan and the loop, against a fake engine -----------------------------------------------------------------


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[len(word) for word in text.split()])

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        return "\n".join(message["content"] for message in messages)


class ScriptedEngine:
    """add_request / step / abort_request like VllmEngine; request n gets outputs[n] (by the order requests are
    added) and finishes after 1-4 steps, so outputs come back out of order."""

    def __init__(self, outputs, seed=0):
        self.outputs, self.random, self.live, self.prompts = list(outputs), random.Random(seed), {}, []

    def add_request(self, token_ids, params):
        request_id = f"engine-{len(self.prompts)}"
        self.live[request_id] = [self.outputs[len(self.prompts)], self.random.randint(1, 4)]
        self.prompts.append(token_ids)
        return request_id

    def step(self):
        finished = []
        for request_id, state in list(self.live.items()):
            state[1] -= 1
            if state[1] == 0:
                del self.live[request_id]
                finished.append(SimpleNamespace(
                    request_id=request_id, finished=True, prompt_token_ids=[0], num_cached_tokens=0,
                    outputs=[SimpleNamespace(text=state[0], finish_reason="stop", token_ids=[0])]))
        self.random.shuffle(finished)
        return finished

    def abort_request(self, request_ids):
        for request_id in request_ids:
            del self.live[request_id]


def run_loop(outputs, plan, tmp_path, max_attempts=100, seed=0):
    from vllm import SamplingParams

    writer = QueryWriter(WordTokenizer(), load_prompt(FRENCH), max_model_len=100_000)
    index = NearDuplicateIndex()
    files = RunFiles(str(tmp_path / "queries.jsonl"), RunRecord("create_queries", {}), ())
    with files.appender() as append:
        counts = synthesise(ScriptedEngine(outputs, seed), writer, plan, index, SamplingParams(max_tokens=16),
                            append, origin={"model": "m"}, max_attempts=max_attempts, max_in_flight=3)
    return counts, files.written(), files.rejected()


def test_spread_is_even_and_sums_to_the_total():
    assert spread(["a", "b", "c"], 7) == {"a": 3, "b": 2, "c": 2}


@pytest.mark.parametrize("seed", range(3))
def test_the_loop_keeps_each_topic_quota_and_counts_every_drop(tmp_path, seed):
    outputs = ["What is a comet?", '"what is a comet"', "Hi", "", "What is the capital city of Japan?",
               "What is the capital of Japan?", "Why do cats purr?", "How do I boil an egg?",
               "What is a black hole?", "How do plants drink water?", "Where do rivers start?"]
    plan = Plan("topic", spread(["space", "food"], 6), seeds=["Why is the sky blue?"], diversity=1, seed=seed)
    counts, kept, rejected = run_loop(outputs, plan, tmp_path, seed=seed)
    assert counts["kept"] == len(kept) == 6 and sum(counts.values()) == len(kept) + len(rejected)
    assert Counter(row["topic"] for row in kept) == {"space": 3, "food": 3}
    assert all(row["group"] == row["topic"] and row["id"] == query_id(row["text"]) for row in kept)
    assert len({row["id"] for row in kept}) == 6 and all(row["origin"] == {"model": "m"} for row in kept)
    # whichever of a pair finishes first is kept, the other dropped: the counts do not depend on the order
    assert counts == {"kept": 6, "duplicate": 1, "near_duplicate": 1, "too_short": 1, "empty": 1}
    assert Counter(row["reason"] for row in rejected) == Counter({k: v for k, v in counts.items() if k != "kept"})
    # every request id once, across kept and rejected
    requests = [row["request"] for row in kept] + [row["id"] for row in rejected]
    assert len(requests) == len(set(requests)) == sum(counts.values())


def test_the_loop_stops_when_the_attempt_budget_is_spent(tmp_path):
    plan = Plan(None, {None: 5})
    counts, kept, rejected = run_loop(["What is a comet?"] * 20, plan, tmp_path, max_attempts=8)
    assert counts == {"kept": 1, "duplicate": 7} and len(rejected) == 7 and plan.missing() == {None: 4}


def test_requests_show_the_task_prompt_the_target_and_k_examples_drawn_with_the_seed():
    seeds = [f"Seed question number {n}?" for n in range(10)]
    plan = Plan("label_target", {"fr": 2, "de": 1}, seeds=seeds, diversity=3, seed=7)
    requests = plan.requests(limit=10)
    assert [row["label_target"] for row in requests] == ["fr", "de", "fr"]
    assert [row["id"] for row in requests] == ["request-1", "request-2", "request-3"]
    shown = [[seed for seed in seeds if seed in row["text"]] for row in requests]
    assert all(len(examples) == 3 for examples in shown) and shown[0] != shown[2]
    again = Plan("label_target", {"fr": 2, "de": 1}, seeds=seeds, diversity=3, seed=7).requests(limit=10)
    assert again == requests  # the same seed draws the same examples
    writer = QueryWriter(WordTokenizer(), load_prompt(FRENCH), 100_000)
    assert load_prompt(FRENCH).text in writer.render(requests[0]["text"])
    assert writer.render(requests[0]["text"]).index(load_prompt(FRENCH).text) < \
        writer.render(requests[0]["text"]).index('"fr"')  # the prompt is the shared prefix


# ---- the CLI ------------------------------------------------------------------------------------------------------


def paths(output):
    stem = output.with_suffix("")
    return output, stem.with_name(stem.name + ".rejects.jsonl"), stem.with_name(stem.name + ".run.json")


@pytest.mark.parametrize("flags, message", [
    (["--prompt_file", "prompts/nope.md", "--num_queries", "3"], "nope.md"),
    (["--prompt_file", str(FRENCH), "--per_label", "3"], "--per_label needs a label task"),
    (["--prompt_file", str(FRENCH), "--num_queries", "0"], "--num_queries / --per_label must be >= 1"),
    (["--prompt_file", str(FRENCH), "--num_queries", "3", "--topics", "a", "b", "a"], "repeated topics a"),
    (["--prompt_file", str(FRENCH), "--num_queries", "3", "--near_duplicate_threshold", "1.5"], "(0, 1]"),
])
def test_bad_input_fails_before_the_engine_starts(tmp_path, tiny_model, flags, message):
    started = time.monotonic()
    result = run_main("create_queries.py", *flags, "--output_file", tmp_path / "q.jsonl", "--model_name", tiny_model,
                      check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "q.jsonl").exists()  # nothing written: it stopped before the run began
    assert time.monotonic() - started < 60


def test_a_seed_file_with_a_bad_line_names_it(tmp_path, tiny_model):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"text": "Why is the sky blue?"}\n{"text": broken\n', encoding="utf-8")
    result = run_main("create_queries.py", "--prompt_file", FRENCH, "--num_queries", "3", "--seed_examples", seeds,
                      "--output_file", tmp_path / "q.jsonl", "--model_name", tiny_model, check=False)
    assert result.returncode != 0 and f"{seeds}:2: malformed JSON" in result.stderr


@pytest.mark.slow
def test_cli_writes_queries_with_provenance_then_resumes_to_a_larger_n(tmp_path, tiny_model, shared_engines):
    output = tmp_path / "out" / "queries.jsonl"
    out, rejects, record = paths(output)
    # random weights write gibberish that rarely ends: one constrained line of at most 20 characters ends it
    command = ["create_queries.py", "--prompt_file", FRENCH, "--output_file", output, "--model_name", tiny_model,
               "--topics", "space", "cooking", "--max_tokens", "40", "--min_chars", "1", "--max_chars", "20",
               "--constrain_one_line",
               "--max-model-len", "4096", "--temperature", "1.0"]
    run_main(*command, "--num_queries", "4")
    first = read_jsonl(out)
    run_record = json.loads(record.read_text())
    assert run_record["status"] == "finished" and len(first) == 4
    assert Counter(row["topic"] for row in first) == {"space": 2, "cooking": 2}
    prompt_sha256 = load_prompt(FRENCH).sha256
    assert all(row["origin"] == {"model": str(tiny_model), "prompt_sha256": prompt_sha256, "seed": 0}
               for row in first)
    assert run_record["settings"]["prompt_sha256"] == prompt_sha256 and run_record["settings"]["temperature"] == 1.0
    counts = run_record["counts"]
    assert counts["by_reason_this_run"]["kept"] == 4
    assert sum(counts["by_reason_this_run"].values()) == counts["requests_this_run"] == 4 + counts["rejected_total"]

    result = run_main(*command, "--num_queries", "8")
    assert "4 kept by an earlier run, 4 to go" in result.stdout
    kept, rejected = read_jsonl(out), (read_jsonl(rejects) if rejects.exists() else [])
    assert kept[:4] == first and len(kept) == 8 and len({row["id"] for row in kept}) == 8
    index = NearDuplicateIndex()
    assert all(index.add(row["text"]) is None for row in kept)  # no duplicate across the two runs
    second = json.loads(record.read_text())["counts"]
    assert second["resumed"] == 4 and second["by_reason_this_run"]["kept"] == 4
    assert second["kept_total"] + second["rejected_total"] == counts["requests_this_run"] + \
        second["requests_this_run"]
    requests = [row["request"] for row in kept] + [row["id"] for row in rejected]
    assert len(requests) == len(set(requests))

    # the same command again has nothing to do and starts no engine
    result = run_main(*command, "--num_queries", "8")
    assert "0 to go" in result.stdout and read_jsonl(out) == kept


def test_stage1_counts_how_many_synthetic_queries_got_the_label_they_were_written_for():
    from distill.synthesis import label_target_agreement

    rows = [{"label_target": "fr", "teacher": {"label": "fr"}}, {"label_target": "fr", "teacher": {"label": "es"}},
            {"label_target": "de", "teacher": {"label": "de"}}, {"teacher": {"label": "en"}}]
    assert label_target_agreement(rows) == {
        "queries": 3, "labelled_as_target": 2, "share": 0.6667,
        "by_label": {"de": {"queries": 1, "labelled_as_target": 1}, "fr": {"queries": 2, "labelled_as_target": 1}}}
    assert label_target_agreement([{"teacher": {"label": "en"}}]) is None
