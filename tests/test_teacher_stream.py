"""distill.teacher.stream against a fake engine that finishes requests out of order: retries, rejects, majority
votes, pairing by request id, the in-flight window and a clean stop, without starting vLLM. Also the rows stage 1
writes from an answer, and sampling parameters: the model's defaults plus only the flags a user set."""

import json
import random
from types import SimpleNamespace

import pytest
from vllm import SamplingParams

import create_data
from distill import stage1
from distill.defaults import TEACHER_MAX_TOKENS
from distill.prompts import load_prompt
from distill.records import output_paths, read_jsonl
from distill.sampling import effective_sampling, model_sampling_defaults, sampling_params
from distill.teacher import StreamStats, Teacher, stream
from tests.conftest import EXAMPLE_DATA, REPO, run_main

PROMPT = load_prompt()
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
ROWS = [{"id": f"r{i}", "text": f"text {i}", "group": "g"} for i in range(8)]


class IndexTokenizer:
    """Token ids [row index, 1, 2]: the fake engine's script knows which query a request answers only from its
    prompt, as a real engine would."""

    def __call__(self, text, add_special_tokens=False):
        index = int(text.rsplit("text ", 1)[1].split()[0]) if "text " in text else 0
        return SimpleNamespace(input_ids=[index, 1, 2] + [0] * (5000 if "LONG" in text else 0))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        return "\n".join(message["content"] for message in messages)


class ScramblingEngine:
    """add_request / step / abort_request, like distill.teacher.VllmEngine. Each request takes
    `duration(query, attempt)` steps (random, 1 to `max_steps`, by default), so requests finish in an order unrelated
    to the order they were added; each step's finished outputs come back shuffled. `script(query, attempt)` gives
    the text, where `attempt` counts that query's requests."""

    def __init__(self, script, max_steps=5, seed=0, duration=None):
        self.script, self.random = script, random.Random(seed)
        self.duration = duration or (lambda query, attempt: self.random.randint(1, max_steps))
        self.live, self.log, self.attempts, self.aborted, self.in_flight_at_steps = {}, [], {}, [], []
        self.count = 0

    def add_request(self, token_ids, params):
        self.count += 1
        request_id = f"req-{self.count}"
        query = token_ids[0]
        attempt = self.attempts[query] = self.attempts.get(query, -1) + 1
        self.live[request_id] = [query, attempt, len(token_ids), self.duration(query, attempt)]
        self.log.append(("add", query, attempt))
        return request_id

    def step(self):
        self.in_flight_at_steps.append((len(self.live), self.count))
        finished = []
        for request_id, state in list(self.live.items()):
            query, attempt, prompt_len, steps_left = state
            state[3] -= 1
            if steps_left > 1:
                continue
            del self.live[request_id]
            text = self.script(query, attempt)
            finished.append(SimpleNamespace(
                query=query, attempt=attempt, request_id=request_id, finished=True, prompt_token_ids=[0] * prompt_len,
                num_cached_tokens=prompt_len - 1,
                outputs=[SimpleNamespace(text=text, finish_reason="stop", token_ids=[7] * len(text))]))
        self.random.shuffle(finished)
        self.log += [("finish", output.query, output.attempt) for output in finished]
        self.log.append(("step",))
        return finished

    def abort_request(self, request_ids):
        for request_id in request_ids:
            self.aborted.append(self.live.pop(request_id)[0])


def teacher(max_model_len=4096, constrain=False):
    return Teacher(IndexTokenizer(), PROMPT, max_model_len, constrain)


def run(script, rows=ROWS, max_steps=5, seed=0, **options):
    options = {"max_retries": 2, "max_in_flight": 4, **options}
    engine = ScramblingEngine(script, max_steps, seed)
    answers = list(stream(engine, teacher(), rows, SamplingParams(max_tokens=64), **options))
    return answers, engine


LABELS = ["ar", "de", "el", "en", "es", "fr", "hi", "ru"]


@pytest.mark.parametrize("seed", range(5))
def test_answers_are_paired_with_their_query_when_completions_arrive_out_of_order(seed):
    answers, engine = run(lambda query, attempt: f"Final Answer: {LABELS[query]}", seed=seed)
    finish_order = [event[1] for event in engine.log if event[0] == "finish"]
    assert finish_order != sorted(finish_order)  # the engine really did reorder
    assert sorted((answer.row["id"], answer.answer) for answer in answers) == [(f"r{i}", LABELS[i]) for i in range(8)]
    assert [answer.row["id"] for answer in answers] == [f"r{query}" for query in finish_order]  # handed back as done


def test_a_bad_answer_is_redrawn_at_once_and_the_fresh_sample_kept():
    # r0 fails on its first try, after one step; the other queries take six steps, so a redraw that waited for
    # them (as a batch does) would be added after they finish.
    def script(query, attempt):
        return "no idea" if query == 0 and attempt == 0 else f"Final Answer: {LABELS[query]}"

    engine = ScramblingEngine(script, duration=lambda query, attempt: 1 if query == 0 else 6)
    answers = list(stream(engine, teacher(), ROWS[:4], SamplingParams(max_tokens=64), max_retries=2, max_in_flight=4))
    log = engine.log
    assert log.index(("add", 0, 1)) < min(log.index(("finish", q, 0)) for q in (1, 2, 3)), log
    assert answers[0].row["id"] == "r0"  # and its answer is handed back first
    first = answers[0]
    assert first.answer == "ar" and [s.text for s in first.failures] == ["no idea"]
    row = stage1.answer_row(first, save_raw=True)
    assert row["messages"][1] == {"role": "assistant", "content": "ar"} and row["group"] == "g"
    assert row["teacher"]["invalid_samples"] == 1 and row["teacher"]["raw"] == ["Final Answer: ar", "no idea"]


def test_an_answer_that_never_parses_is_rejected_with_every_raw_output():
    answers, engine = run(lambda query, attempt: "<think>hmm fr or es", rows=ROWS[:1], max_retries=2)
    assert [event[2] for event in engine.log if event[0] == "add"] == [0, 1, 2]  # 1 try + 2 redraws
    (answer,) = answers
    assert answer.answer is None and answer.reason == "unclosed_reasoning"
    row = stage1.rejected_row(answer)
    assert row["reason"] == "unclosed_reasoning" and len(row["failures"]) == 3
    assert row["text"] == "text 0" and row["group"] == "g" and row["failures"][0]["raw"] == "<think>hmm fr or es"


def test_num_samples_majority_keeps_the_votes():
    labels = ["fr", "fr", "es"]
    answers, _ = run(lambda query, attempt: f"Final Answer: {labels[attempt]}", rows=ROWS[:1], num_samples=3)
    assert answers[0].answer == "fr" and answers[0].votes == {"fr": 2, "es": 1}
    row = stage1.answer_row(answers[0], save_raw=False)
    assert row["teacher"]["votes"] == {"fr": 2, "es": 1} and "raw" not in row["teacher"]


def test_a_failed_vote_is_replaced_until_the_redraw_budget_is_spent():
    # query 0: attempts 0 and 2 fail; 3 votes wanted; budget 1 redraw -> 2 valid votes, 2 failures, 4 requests
    script = lambda query, attempt: "nope" if attempt in (0, 2) else "Final Answer: de"  # noqa: E731
    answers, engine = run(script, rows=ROWS[:1], num_samples=3, max_retries=1, max_steps=1)
    assert sum(event[0] == "add" for event in engine.log) == 4
    assert answers[0].answer == "de" and len(answers[0].samples) == 2 and len(answers[0].failures) == 2


def test_a_query_longer_than_the_context_is_rejected_without_a_request():
    rows = [{"id": "long", "text": "text 0 LONG"}, {"id": "short", "text": "text 1"}]
    answers, engine = run(lambda query, attempt: "Final Answer: fr", rows=rows)
    assert {answer.row["id"]: answer.reason for answer in answers} == {"long": "too_long", "short": "ok"}
    assert [event[1] for event in engine.log if event[0] == "add"] == [1]


def test_the_window_bounds_requests_in_flight_and_keeps_it_full():
    rows = [{"id": f"r{i}", "text": f"text {i}"} for i in range(40)]
    answers, engine = run(lambda query, attempt: "Final Answer: en", rows=rows, max_in_flight=6, max_steps=8)
    assert len(answers) == 40
    assert max(live for live, _ in engine.in_flight_at_steps) == 6
    # while queries were still waiting to go in, every step ran a full window: finished slots are refilled at once
    while_waiting = [live for live, added in engine.in_flight_at_steps if added < 40]
    assert while_waiting and set(while_waiting) == {6}


def test_stop_aborts_in_flight_and_hands_back_only_finished_queries():
    rows = [{"id": f"r{i}", "text": f"text {i}"} for i in range(30)]
    engine = ScramblingEngine(lambda query, attempt: "bad" if query % 3 == 0 else "Final Answer: en", max_steps=4)
    answers, stopped_at = [], []

    def stop():
        if len(answers) >= 6 and not stopped_at:
            stopped_at.append(len(engine.log))
        return bool(stopped_at)

    for answer in stream(engine, teacher(), rows, SamplingParams(max_tokens=8), max_retries=5, max_in_flight=5,
                         stop=stop):
        answers.append(answer)
    assert 6 <= len(answers) < 30 and stopped_at
    assert all(event[0] != "add" for event in engine.log[stopped_at[0]:])  # nothing added after the stop
    assert engine.aborted and not engine.live  # what was in flight was aborted
    handed_back = {int(answer.row["id"][1:]) for answer in answers}
    assert not set(engine.aborted) & handed_back  # a query with a sample still running is not reported
    # a reported query is really finished: a valid label, or every redraw spent (never cut short by the stop)
    assert all(answer.answer == "en" or len(answer.failures) == 6 for answer in answers)


def test_stream_stats_count_tokens_and_prefix_cache_hits():
    stats = StreamStats()
    answers = list(stream(ScramblingEngine(lambda query, attempt: "Final Answer: en"), teacher(), ROWS[:2],
                          SamplingParams(max_tokens=8), stats=stats))
    assert [answer.answer for answer in answers] == ["en", "en"]
    summary = stats.summary()
    assert summary["finished"] == summary["labelled"] == 2 and summary["samples"] == 2
    assert summary["prefix_cache_hit_rate"] == pytest.approx(2 / 3, abs=1e-4)  # the fake caches all but one of 3 tokens
    assert summary["generated_tokens_per_second"] > 0


# ---- sampling: model defaults + the flags a user set ------------------------------------------------------------


QWEN3_THINKING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_sampling_keeps_the_model_defaults_the_user_did_not_set():
    defaults = SamplingParams.from_optional(**QWEN3_THINKING)
    params = sampling_params(defaults, {"temperature": 0.3, "top_p": None, "min_p": None}, max_tokens=99)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.3, 0.95, 20, 99)
    assert effective_sampling(sampling_params(defaults, {}, max_tokens=8))["top_k"] == 20


def test_greedy_override_is_recorded_as_greedy():
    params = sampling_params(SamplingParams.from_optional(**QWEN3_THINKING), {"temperature": 0.0}, max_tokens=8)
    assert effective_sampling(params) | {"max_tokens": 8} == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": 8}


def _model_dir(tmp_path, generation_config):
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path


def _engine_flags(model, **changes):
    return SimpleNamespace(**{"model": str(model), "generation_config": "auto", "override_generation_config": {},
                              "trust_remote_code": False, **changes})


def test_model_sampling_defaults_read_the_generation_config_as_vllm_does(tmp_path):
    model = _model_dir(tmp_path, {**QWEN3_THINKING, "max_new_tokens": 512, "eos_token_id": 2, "do_sample": True})
    assert model_sampling_defaults(_engine_flags(model)) == {**QWEN3_THINKING, "max_tokens": 512}
    assert model_sampling_defaults(_engine_flags(model, generation_config="vllm")) == {}
    overridden = _engine_flags(model, override_generation_config={"temperature": 0.9})
    assert model_sampling_defaults(overridden)["temperature"] == 0.9


def test_resume_settings_hold_the_effective_values(tmp_path):
    model = _model_dir(tmp_path, QWEN3_THINKING)
    args = create_data.parse_args(["--model_name", str(model), "--top_k", "40"])
    settings = stage1.run_settings(args, "sha", model_sampling_defaults(args))
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (0.6, 0.95, 40)
    assert settings["max_tokens"] == TEACHER_MAX_TOKENS
    assert set(stage1.RESUME_KEYS) <= set(settings)


# ---- slow: one teacher path for stage 1 and evaluate.py --with_prompt ------------------------------------------


@pytest.mark.slow
def test_evaluate_with_prompt_gives_the_answers_stage_1_gives(tmp_path, shared_engines):
    """Same queries, greedy: evaluate.py --with_prompt and create_data.py give each query the same raw answer and
    the same label. On the embedded model, free-form: the tiny random model writes the same answer to every query,
    which could not show a mix-up of queries; SmolLM2's raw answers differ from query to query."""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    rows = ["--split", "heldout", "--max_samples", 16, "--max_tokens", 12, "--max-model-len", 4096]
    stage1_file = tmp_path / "teacher.jsonl"
    run_main("create_data.py", "--input_file", EXAMPLE_DATA, "--output_file", stage1_file, "--model_name", SMOLLM2,
             "--temperature", 0, "--max_retries", 0, "--save_raw", *rows)
    results = tmp_path / "eval_teacher.json"
    run_main("evaluate.py", "--model_path", SMOLLM2, "--with_prompt", "--test_file", EXAMPLE_DATA, "--no-lingua",
             "--quiet", "--latency_requests", 2, "--output_file", results, *rows)
    out, rejects, record = output_paths(str(stage1_file))
    labelled = {row["id"]: (row["teacher"]["label"], row["teacher"]["raw"][0]) for row in read_jsonl(out)}
    labelled |= {row["id"]: (None, row["failures"][0]["raw"]) for row in read_jsonl(rejects)}
    evaluated = json.loads(results.read_text())
    assert len(labelled) == 16 and len({raw for _, raw in labelled.values()}) > 8
    assert {e["id"]: (e["prediction"], e["raw"]) for e in evaluated["examples"]} == labelled
    assert evaluated["sampling"]["temperature"] == 0.0
    saved = json.loads(record.read_text())
    assert saved["settings"]["temperature"] == 0.0 and saved["status"] == "finished"
