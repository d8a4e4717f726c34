"""Generative (free-form) prompt distillation: the teacher's whole final answer is the target. The parser on
hand-made outputs, the stream through the fake engine of test_teacher_stream (a cut answer is redrawn, then
rejected with every raw output), pass-rate and chrF scoring on known answers, flag checks before any model loads,
and (slow) stage 1 -> stage 2 -> stage 3 on the tiny model."""

import json
from types import SimpleNamespace

import pytest
from vllm import SamplingParams

import create_data
from distill import stage1
from distill.answers import parse_generative
from distill.metrics import score_generative, sentence_chrf, strict_verdicts
from distill.prompts import load_prompt
from distill.records import output_paths, read_jsonl
from distill.teacher import Teacher, stream
from tests.conftest import REPO, run_main
from tests.test_serving import stop_at_the_engine
from tests.test_teacher_stream import IndexTokenizer, ScramblingEngine

GENERAL_QUESTIONS = REPO / "example-data" / "general_questions.jsonl"
# Any non-blank answer passes the check, so the tiny random model's answers can pass it and fail only by being empty;
# strict scoring still refuses its echoes and loops (random text shares no word with the question: no topic check).
ANY_TEXT_PROMPT = ('---\ncheck: {regex: "\\\\S"}\non_topic: none\n---\n'
                   'You answer every question in one short sentence.\n')


@pytest.fixture()
def generative_prompt(tmp_path):
    path = tmp_path / "any_text.md"
    path.write_text(ANY_TEXT_PROMPT, encoding="utf-8")
    return path


# ---- the parser -------------------------------------------------------------------------------------------------


def test_the_answer_is_the_whole_text_after_the_reasoning():
    parsed = parse_generative("<think>French, short.</think>\n\n  Le ciel est bleu.\nVoilà.  ", "stop")
    assert (parsed.answer, parsed.reason, parsed.reasoning_chars) == ("Le ciel est bleu.\nVoilà.", "ok", 14)
    assert parse_generative(" Bonjour ", "stop").answer == "Bonjour"  # no reasoning at all: the whole text


def test_a_thinking_template_output_holds_only_the_closing_tag():
    parsed = parse_generative("let me think\n</think>\nOui.", "stop", expects_reasoning=True)
    assert (parsed.answer, parsed.reasoning_chars) == ("Oui.", len("let me think\n"))


@pytest.mark.parametrize("output, finish_reason, expects_reasoning, reason", [
    ("<think>still weighing it", "stop", False, "unclosed_reasoning"),
    ("still weighing it", "stop", True, "unclosed_reasoning"),
    ("<think>ok</think>Le ciel est", "length", False, "cut_at_max_tokens"),
    ("<think>cut while still thinking", "length", False, "cut_at_max_tokens"),
    ("<think>done</think>\n \n", "stop", False, "empty_answer"),
    ("", "stop", False, "empty_answer"),
])
def test_outputs_that_break_the_contract_are_refused_with_the_reason(output, finish_reason, expects_reasoning,
                                                                       reason):
    parsed = parse_generative(output, finish_reason, expects_reasoning)
    assert (parsed.answer, parsed.reason) == (None, reason)


def test_the_label_path_ignores_the_finish_reason():
    teacher = Teacher(IndexTokenizer(), load_prompt(), 4096)
    assert teacher.parse("Final Answer: fr", "length").answer == "fr"


# ---- the stream, through the fake engine ------------------------------------------------------------------------


class CuttingEngine(ScramblingEngine):
    """The fake engine, with the finish reason `cut(query, attempt)` chooses: "length" means cut at max_tokens."""

    def __init__(self, script, cut, **options):
        super().__init__(script, **options)
        self.cut = cut

    def step(self):
        finished = super().step()
        for output in finished:
            output.outputs[0].finish_reason = "length" if self.cut(output.query, output.attempt) else "stop"
        return finished


def generative_teacher(prompt_path):
    return Teacher(IndexTokenizer(), load_prompt(prompt_path), 4096)


ROWS = [{"id": f"r{i}", "text": f"text {i}", "group": "g"} for i in range(4)]


def test_a_cut_answer_is_redrawn_then_rejected_with_every_raw_output(generative_prompt):
    # r0 is cut on every try; r1 is cut once, then finishes; the others finish at once
    engine = CuttingEngine(lambda query, attempt: f"answer {query}.{attempt}",
                           cut=lambda query, attempt: query == 0 or (query == 1 and attempt == 0))
    answers = list(stream(engine, generative_teacher(generative_prompt), ROWS, SamplingParams(max_tokens=8),
                          max_retries=2, max_in_flight=4))
    by_id = {answer.row["id"]: answer for answer in answers}
    assert sorted(by_id) == ["r0", "r1", "r2", "r3"]
    assert [event[2] for event in engine.log if event[0] == "add" and event[1] == 0] == [0, 1, 2]  # 1 + 2 redraws
    rejected = stage1.rejected_row(by_id["r0"])
    assert rejected["reason"] == "cut_at_max_tokens" and rejected["group"] == "g"
    assert [failure["raw"] for failure in rejected["failures"]] == ["answer 0.0", "answer 0.1", "answer 0.2"]
    assert {failure["finish_reason"] for failure in rejected["failures"]} == {"length"}
    assert by_id["r1"].answer == "answer 1.1" and [s.text for s in by_id["r1"].failures] == ["answer 1.0"]


def test_a_generative_row_carries_the_whole_answer(generative_prompt):
    engine = CuttingEngine(lambda query, attempt: f"<think>hm</think>\nLine one.\nLine two {attempt}.\n",
                           cut=lambda query, attempt: False)
    (answer,) = stream(engine, generative_teacher(generative_prompt), ROWS[:1], SamplingParams(max_tokens=8),
                       num_samples=3)
    # three valid samples, all different: the first valid one is the answer, not a vote
    assert len(answer.samples) == 3 and answer.answer == answer.samples[0].parsed.answer
    row = stage1.answer_row(answer, save_raw=True)
    first = answer.samples[0].parsed.answer
    assert row["messages"] == [{"role": "user", "content": "text 0"}, {"role": "assistant", "content": first}]
    assert first.startswith("Line one.\nLine two ")
    assert row["teacher"]["answer_chars"] == len(first) and "label" not in row["teacher"]
    assert row["teacher"]["finish_reasons"] == ["stop"] * 3 and row["teacher"]["reasoning_chars"] == [2] * 3
    assert len(row["teacher"]["raw"]) == 3


def test_keep_all_writes_every_valid_answer_as_a_row_in_its_querys_group(generative_prompt):
    from distill.records import query_id
    from distill.shards import coverage_errors, rows_per_query
    from distill.splits import split_of

    conversation = [{"role": "user", "content": "text 9"}, {"role": "assistant", "content": "Earlier."},
                    {"role": "user", "content": "text 2"}]
    rows = [{"id": "r1", "text": "text 1"},  # no group: its rows take its id as theirs, so they split as it does
            {"id": "c2", "text": "text 2", "messages": conversation, "group": "chat"},
            {"id": "r3", "text": "text 3", "group": "g"}]
    # r1: 3 valid samples; c2: its first cut (no redraws), 2 valid; r3: every one cut, rejected. A query's samples
    # finish in the order they were drawn.
    engine = CuttingEngine(lambda query, attempt: f"answer {query}.{attempt}",
                           cut=lambda query, attempt: query == 3 or (query == 2 and attempt == 0),
                           duration=lambda query, attempt: attempt + 1)
    teacher = generative_teacher(generative_prompt)
    outcomes = list(stream(engine, teacher, rows, SamplingParams(max_tokens=8), num_samples=3, max_in_flight=9))
    args = SimpleNamespace(keep="all", save_raw=True, save_logprobs=None)
    records = [record for outcome in outcomes for record in stage1.answer_records(outcome, args, teacher)]
    written = [record["row"] for record in records if "row" in record]
    by_id = {row["id"]: row for row in written}
    assert sorted(by_id) == ["c2#0", "c2#1", "r1#0", "r1#1", "r1#2"]
    assert [by_id[f"r1#{k}"]["messages"][-1]["content"] for k in range(3)] == ["answer 1.0", "answer 1.1", "answer 1.2"]
    assert {row["group"] for row in written if query_id(row) == "r1"} == {"r1"}
    assert {split_of(row) for row in written if query_id(row) == "r1"} == {split_of(rows[0])}
    # a conversation's row is its turns, then the answer; the query's group and columns carried
    assert by_id["c2#1"]["messages"] == conversation + [{"role": "assistant", "content": "answer 2.2"}]
    assert by_id["c2#1"]["group"] == "chat" and by_id["c2#1"]["teacher"]["samples_kept"] == 2
    assert by_id["c2#0"]["teacher"]["raw"] == ["answer 2.1", "answer 2.0"]  # the failed sample goes with row #0
    rejected = [record["reject"] for record in records if "reject" in record]
    assert [(row["id"], row["reason"]) for row in rejected] == [("r3", "cut_at_max_tokens")]
    assert coverage_errors(rows, written + rejected) == []
    assert rows_per_query(written) == {2: 1, 3: 1}
    assert coverage_errors(rows, written + rejected + [{"id": "r1", "reason": "x"}]) == [
        "1 ids appear more than once (e.g. r1)"]


# ---- scoring ----------------------------------------------------------------------------------------------------


def test_strict_pass_rate_check_rate_and_chrf_on_known_answers():
    from sacrebleu.metrics import CHRF

    from distill.prompts import TaskPrompt

    prompt = TaskPrompt("p.md", "Tu réponds en français, en une phrase courte.", (), None, "{query}",
                        {"regex": "^Le "})
    questions = ["Où dort le chat ?", "Où dort le chat ?", "Où dort le chien ?", "Où dort le chat ?",
                 "Où dort le chat ?"]
    answers = ["Le chat dort sur le canapé.", "The cat sleeps.", "", "Le chat dort sur le canapé du salon",
               "Le réponds en français, en une phrase courte."]
    reasons = ["ok", "ok", "empty_answer", "cut_at_max_tokens", "ok"]
    teachers = ["Le chat dort sur le lit.", "Le chat dort.", None, None, None]
    judged = strict_verdicts(prompt, questions, answers, reasons, teachers)
    expected = [CHRF().sentence_score(answers[0], [teachers[0]]).score,
                CHRF().sentence_score(answers[1], [teachers[1]]).score]
    assert 0 < expected[1] < expected[0] < 100  # a closer answer scores higher
    assert [j["check_passed"] for j in judged] == [True, False, False, True, True]
    assert [j["reason"] for j in judged] == ["ok", "off_topic", "empty_answer", "cut_at_max_tokens", "echo"]
    assert [j["passed"] for j in judged] == [True, False, False, False, False]
    assert [j["chrf"] for j in judged] == [pytest.approx(expected[0], abs=1e-3), pytest.approx(expected[1], abs=1e-3),
                                           None, None, None]
    assert sentence_chrf("same words", "same words") == pytest.approx(100)

    examples = [{"id": str(i), "text": question, "answer": answer, "answer_tokens": tokens, **judgement}
                for i, (question, answer, tokens, judgement) in enumerate(zip(questions, answers, [7, 4, 0, 9, 8],
                                                                               judged))]
    summary = score_generative(examples)
    assert summary["n"] == 5 and summary["n_strict_passed"] == 1 and summary["strict_pass_rate"] == pytest.approx(0.2)
    assert summary["n_check_passed"] == 3 and summary["check_pass_rate"] == pytest.approx(0.6)
    assert summary["non_answers"] == {"off_topic": 1, "empty_answer": 1, "cut_at_max_tokens": 1, "echo": 1}
    assert summary["agreement_with_teacher_chrf"] == pytest.approx(sum(expected) / 2, abs=1e-3)
    assert summary["n_with_teacher"] == 2 and summary["empty_answers"] == 1
    assert summary["mean_answer_tokens"] == 28 / 5
    assert summary["mean_answer_chars"] == pytest.approx(sum(map(len, answers)) / 5)
    assert [f["id"] for f in summary["failures"]] == ["1", "2", "3", "4"]
    assert summary["failures"][0] == {"id": "1", "text": questions[1], "answer": "The cat sleeps.",
                                      "reason": "off_topic",
                                      "check_passed": False}


def test_agreement_is_null_without_a_teacher():
    examples = [{"id": "a", "text": "q", "answer": "x", "answer_tokens": 1, "passed": True, "check_passed": True,
                 "reason": "ok", "chrf": None}]
    summary = score_generative(examples)
    assert summary["agreement_with_teacher_chrf"] is None and summary["n_with_teacher"] == 0


def test_teacher_answers_from_a_generative_results_json(tmp_path):
    import evaluate

    results = {"task": "generative", "cost": {"input_tokens_per_request": 900.0},
               "examples": [{"id": "a", "answer": "Oui."}, {"id": "b", "answer": ""}]}
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(results))
    # b's teacher output broke the contract: no reference to compare with
    assert evaluate.load_teacher_answers(str(path)) == ({"a": "Oui."}, {"input_tokens_per_request": 900.0})


# ---- flags checked before any model loads -----------------------------------------------------------------------


def test_constrain_labels_on_a_generative_prompt_is_refused_before_the_model(generative_prompt, tmp_path,
                                                                              monkeypatch):
    from distill import engine

    monkeypatch.setattr(engine, "configure_env", lambda: None)
    with pytest.raises(SystemExit, match="--constrain_labels needs a label set"):
        create_data.main(["--prompt_file", str(generative_prompt), "--input_file", str(GENERAL_QUESTIONS),
                          "--output_file", str(tmp_path / "out.jsonl"), "--model_name", "no/such-model",
                          "--constrain_labels"])
    assert not (tmp_path / "out.jsonl").exists()


def test_the_generative_student_answers_in_64_tokens_by_default(tiny_model, generative_prompt, monkeypatch):
    from transformers import AutoTokenizer

    import evaluate
    from distill.render import student_ids
    from distill.splits import select

    started = stop_at_the_engine(monkeypatch)
    with pytest.raises(SystemExit, match="stopped before the engine"):
        evaluate.main(["--model_path", str(tiny_model), "--test_file", str(GENERAL_QUESTIONS), "--max_samples", "5",
                       "--prompt_file", str(generative_prompt)])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = select([json.loads(line) for line in GENERAL_QUESTIONS.read_text().splitlines()], "heldout")[:5]
    longest = max(len(student_ids(tokenizer, row["text"]))
                  for row in rows)
    assert started["max_model_len"] == longest + 64


# ---- slow: stage 1 -> stage 2 -> stage 3 on the tiny model ------------------------------------------------------


def eager_to_stop(model_dir, output_dir, eos_advantage=0.7):
    """A copy of the tiny model that ends its answer early: a random model almost never writes its end-of-turn
    token (1 in ~1,000 per step), so every answer would be cut at max_tokens. A large constant in one embedding
    dimension makes the final hidden state point along it at every position; the end-of-turn row gets a little
    more of it, so its logit leads the others by about 8 x eos_advantage (P(stop) ~ 0.25 a step at 0.7)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, output_dir)
    weights = load_file(output_dir / "model.safetensors")
    embeddings = weights["model.embed_tokens.weight"]
    eos = json.loads((output_dir / "config.json").read_text())["eos_token_id"]
    embeddings[:, 0] = 50.0
    embeddings[eos, 0] = 50.0 + eos_advantage
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, output_dir / "model.safetensors",
              metadata={"format": "pt"})
    assert torch.equal(load_file(output_dir / "model.safetensors")["model.embed_tokens.weight"], embeddings)
    return output_dir


def pick_rows(groups: dict[str, int]) -> list[dict]:
    rows = [json.loads(line) for line in GENERAL_QUESTIONS.read_text(encoding="utf-8").splitlines()]
    return [row for group, count in groups.items() for row in [r for r in rows if r["group"] == group][:count]]


@pytest.mark.slow
def test_generative_stages_one_two_three(tiny_model, generative_prompt, tmp_path, shared_engines):
    from transformers import AutoTokenizer

    from distill.render import student_example
    from distill.splits import select

    model = eager_to_stop(tiny_model, tmp_path / "eager-tiny")
    rows = pick_rows({"space": 8, "physics": 8, "drinks": 6})  # drinks is a held-out group
    assert [r["group"] for r in select(rows, "heldout")] == ["drinks"] * 6
    queries = tmp_path / "questions.jsonl"
    queries.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    # stage 1: answers cut at 6 tokens or empty go to rejects (no redraws, so some do)
    stage1_file = tmp_path / "teacher.jsonl"
    run_main("create_data.py", "--input_file", queries, "--output_file", stage1_file, "--model_name", model,
             "--prompt_file", generative_prompt, "--max_tokens", 6, "--max_retries", 0, "--temperature", 1.0,
             "--save_raw", "--max-model-len", 1024)
    out, rejects_path, record_path = output_paths(str(stage1_file))
    written, rejected = read_jsonl(out), read_jsonl(rejects_path)
    ids = [row["id"] for row in written + rejected]
    assert sorted(ids) == sorted(row["id"] for row in rows)  # every input id exactly once
    assert written and rejected, (len(written), len(rejected))
    assert {row["reason"] for row in rejected} <= {"cut_at_max_tokens", "empty_answer"}
    for row in rejected:
        finish = row["failures"][0]["finish_reason"]
        assert (row["reason"] == "cut_at_max_tokens") == (finish == "length")
    for row in written:
        answer = row["messages"][1]["content"]
        assert answer == answer.strip() and answer and row["teacher"]["answer_chars"] == len(answer)
        assert row["teacher"]["finish_reasons"] == ["stop"] and row["teacher"]["raw"][0].strip() == answer
    record = json.loads(record_path.read_text())
    assert record["status"] == "finished" and record["task"] == "generative"
    assert record["counts"]["written_total"] + record["counts"]["rejected_total"] == len(rows)

    # stage 2 on the teacher's answers; the loss mask covers exactly the answer and the end-of-turn token
    tokenizer = AutoTokenizer.from_pretrained(model)
    train_row = next(row for row in written if row["group"] != "drinks")
    encoded = student_example(tokenizer, train_row["messages"][0]["content"], train_row["messages"][1]["content"])
    answer_ids = [i for i, keep in zip(encoded["input_ids"], encoded["completion_mask"]) if keep]
    assert tokenizer.decode(answer_ids) == train_row["messages"][1]["content"] + "<|im_end|>"
    adapter = tmp_path / "student"
    run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", model, "--dataset_name",
             stage1_file, "--output_dir", adapter, "--report_to", "none", "--max_steps", 2)
    run = json.loads((adapter / "distill_run.json").read_text())
    assert run["status"] == "finished"

    # stage 3: the student without the prompt, scored by the check and against the teacher's answers
    results_path = tmp_path / "eval_student.json"
    result = run_main("evaluate.py", "--model_path", adapter, "--test_file", queries, "--prompt_file",
                      generative_prompt, "--teacher_file", stage1_file, "--output_file", results_path,
                      "--latency_requests", 2, "--allow_inconclusive")
    results = json.loads(results_path.read_text())
    # 2 steps (the first cpu.yaml's warm-up) barely move the eager-to-stop model's answers: the fingerprint says so
    assert results["fingerprint"]["allow_inconclusive"] is True
    keys = {"task", "check", "check_description", "mode", "model_path", "split", "test_file", "n", "strict_pass_rate",
            "n_strict_passed", "check_pass_rate", "n_check_passed", "non_answers", "agreement_with_teacher_chrf",
            "n_with_teacher", "mean_answer_chars", "mean_answer_tokens",
            "empty_answers", "failures", "cost", "examples"}
    assert keys <= set(results) and "confusion_matrix" not in results
    assert results["task"] == "generative" and results["check"] == {"regex": "\\S"}
    assert not results_path.with_suffix(".png").exists()
    examples = results["examples"]
    assert [e["id"] for e in examples] == [row["id"] for row in rows if row["group"] == "drinks"]
    assert results["n"] == 6 and results["sampling"]["max_tokens"] == 64
    assert [e["check_passed"] for e in examples] == [bool(e["answer"].strip()) for e in examples]
    # strict: the check and an answer (as the model wrote it: not cut, and no echo or loop)
    from distill.checks import non_answer_reason

    prompt = load_prompt(generative_prompt)
    for e in examples:
        if e["reason"] == "cut_at_max_tokens":
            assert e["output_tokens"] == 64
        elif e["answer"]:
            assert e["reason"] == (non_answer_reason(prompt, e["text"], e["answer"]) or "ok")
        else:
            assert e["reason"] == "empty_answer"
        assert e["passed"] == (e["check_passed"] and e["reason"] == "ok")
    assert results["strict_pass_rate"] == pytest.approx(sum(e["passed"] for e in examples) / 6)
    assert results["n_strict_passed"] == sum(e["passed"] for e in examples)
    assert results["check_pass_rate"] == pytest.approx(sum(e["check_passed"] for e in examples) / 6)
    teacher_of = {row["id"]: row["messages"][1]["content"] for row in written}
    with_teacher = [e for e in examples if e["id"] in teacher_of]
    assert [e["teacher"] for e in with_teacher] == [teacher_of[e["id"]] for e in with_teacher]
    assert all(e["chrf"] == pytest.approx(sentence_chrf(e["answer"], e["teacher"]), abs=1e-3) for e in with_teacher)
    assert results["n_with_teacher"] == len(with_teacher)
    if with_teacher:
        assert results["agreement_with_teacher_chrf"] == pytest.approx(
            sum(e["chrf"] for e in with_teacher) / len(with_teacher))
    assert results["mean_answer_chars"] == pytest.approx(sum(len(e["answer"]) for e in examples) / 6)
    assert results["empty_answers"] == sum(not e["answer"] for e in examples)
    assert all(set(e) >= {"id", "text", "answer", "passed", "input_tokens", "output_tokens"} for e in examples)
    assert results["failures"] == [{"id": e["id"], "text": e["text"], "answer": e["answer"], "reason": e["reason"],
                                    "check_passed": e["check_passed"]} for e in examples if not e["passed"]][:5]
    assert "strict pass rate:" in result.stdout and "chrF vs teacher:" in result.stdout and "cost:" in result.stdout


def test_evaluation_scores_a_cut_teacher_answer_as_written(generative_prompt):
    """Stage 1 refuses a cut answer as a target; evaluation judges it as written, as it judges the student's."""
    from distill import serving

    engine = CuttingEngine(lambda query, attempt: f"<think>hm</think> Réponse {query}",
                           cut=lambda query, attempt: query == 0)
    engine.max_num_seqs = 4
    answer = serving.teacher_answers(engine, generative_teacher(generative_prompt), SamplingParams(max_tokens=8))
    raw, answers, _, reasons = answer(ROWS[:2])
    assert raw == ["<think>hm</think> Réponse 0", "<think>hm</think> Réponse 1"]
    assert answers == ["Réponse 0", "Réponse 1"], "the cut answer (r0) is scored on its text, not as empty"
    assert reasons == ["cut_at_max_tokens", "ok"], "and fails strict scoring for being cut"


def test_the_task_stop_strings_reach_the_teachers_sampling():
    from argparse import Namespace

    from distill.sampling import SAMPLING_FLAGS, expected_sampling

    french = load_prompt(REPO / "prompts" / "answer_in_french.md")
    args = Namespace(**dict.fromkeys(SAMPLING_FLAGS), max_tokens=40, save_logprobs=None)
    llm = SimpleNamespace(get_default_sampling_params=SamplingParams)  # an engine's defaults, without the engine
    settings = expected_sampling(args, {}, 40)
    params = stage1.teacher_sampling(llm, args, Teacher(IndexTokenizer(), french, 4096), settings)
    assert params.stop == [". ", ".\n", "\n"] and params.include_stop_str_in_output and params.max_tokens == 40
    assert stage1.teacher_sampling(llm, args, Teacher(IndexTokenizer(), load_prompt(), 4096), settings).stop == []


@pytest.mark.slow
def test_conversations_with_a_student_side_through_stages_one_two_three(tiny_model, tmp_path, shared_engines):
    """The one end-to-end run of conversations: stage 1 answers them (--keep all: each valid answer a row), stage 2
    trains on the new answers with the prompt file's student side, stage 3 serves the student on conversations and
    its fingerprint check passes only because evaluation renders each conversation probe as training did; a prompt
    file with another student side is refused."""
    model = eager_to_stop(tiny_model, tmp_path / "eager-tiny")
    prompt = tmp_path / "with_student_side.md"
    prompt.write_text(ANY_TEXT_PROMPT.replace("on_topic: none\n", 'on_topic: none\nstudent_system_prompt: "Be brief."\n'
                                              'student_template: "Q: {query}\\nA:"\n'), encoding="utf-8")
    lines = (REPO / "example-data" / "in_short_conversations.jsonl").read_text(encoding="utf-8").splitlines()
    conversations = tmp_path / "chats.jsonl"
    conversations.write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    inputs = {row["id"]: row for row in map(json.loads, lines[:12])}

    stage1_file = tmp_path / "teacher.jsonl"
    run_main("create_data.py", "--input_file", conversations, "--output_file", stage1_file, "--model_name", model,
             "--prompt_file", prompt, "--num_samples", 2, "--keep", "all", "--max_tokens", 6, "--max_retries", 2,
             "--temperature", 1.0, "--max-model-len", 1024)
    out, _, record_path = output_paths(str(stage1_file))
    written = read_jsonl(out)
    assert written
    for row in written:
        query = inputs[row["query_id"]]
        assert row["id"].startswith(f"{query['id']}#") and row["group"] == query["group"]
        assert row["messages"][:-1] == query["messages"] and row["messages"][-1]["role"] == "assistant"
    record = json.loads(record_path.read_text())
    assert record["student"] == {"system_prompt": "Be brief.", "template": "Q: {query}\nA:"}
    assert sum(int(n) * queries for n, queries in record["counts"]["rows_per_query"].items()) == len(written)

    adapter = tmp_path / "student"
    run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", model, "--dataset_name",
             stage1_file, "--output_dir", adapter, "--report_to", "none", "--max_steps", 2, "--fingerprint_probes", 3)
    run = json.loads((adapter / "distill_run.json").read_text())
    assert run["status"] == "finished" and run["student"] == record["student"]
    assert any(isinstance(p["query"], list) for p in json.loads((adapter / "fingerprint.json").read_text())["probes"])

    results_path = tmp_path / "eval.json"
    # one step with warm-up trains nothing: the fingerprint cannot tell the adapter from its base, and says so
    run_main("evaluate.py", "--model_path", adapter, "--test_file", conversations, "--prompt_file", prompt, "--split",
             "all", "--max_samples", 3, "--latency_requests", 0, "--output_file", results_path, "--quiet",
             "--allow_inconclusive")
    results = json.loads(results_path.read_text())
    assert results["fingerprint"]["status"] == "passed" and results["student"] == record["student"]
    assert results["fingerprint"]["conclusive"] is False and results["fingerprint"]["allow_inconclusive"] is True
    assert [e["text"] for e in results["examples"]] == [row["messages"][-1]["content"] for row in inputs.values()][:3]
    assert [e["messages"] for e in results["examples"]] == [row["messages"] for row in inputs.values()][:3]
    refused = run_main("evaluate.py", "--model_path", adapter, "--test_file", conversations, "--prompt_file",
                       REPO / "prompts" / "in_short.md", "--split", "all", check=False)
    assert refused.returncode == 1 and "the model trained with the student side" in refused.stderr
