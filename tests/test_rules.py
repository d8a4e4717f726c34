"""A prompt file's rules (distill/rules.py): every verifier on hand-made answers, IFEval's through if-verifiable, the
loader's file:line errors, stage 1 rejecting (or keeping) an answer that breaks a rule, stage 3's per-rule report
with transfer, lost and gained, and `evaluate.py --compare`'s table and heatmap."""

import json

import pytest

from distill import rules
from distill.prompts import load_prompt
from distill.rules import RuleError, check_verify, count_sentences, passes_each, verdicts
from tests.conftest import REPO, run_main


def passes(verify: dict, answer: str) -> bool:
    return passes_each(check_verify(verify), [answer])[0]


# ---- every verifier ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify, answer, expected", [
    ({"regex": r"^In short: \S"}, "In short: yes.", True),
    ({"regex": r"^In short: \S"}, "in short: yes.", False),
    ({"starts_with": "In short:"}, "  In short: yes.", True),
    ({"starts_with": "In short:"}, "Well. In short: yes.", False),
    ({"ends_with": "."}, "It boils at 100 degrees.\n", True),
    ({"ends_with": "."}, "It boils at 100 degrees", False),
    ({"max_words": 3}, "water boils hot", True),
    ({"max_words": 3}, "water boils very hot", False),
    ({"min_words": 2}, "it's hot", True),  # "it's" is one word
    ({"min_words": 2}, "hot", False),
    ({"max_sentences": 1}, "In short: it is 13.8 billion years old, e.g. very old.", True),
    ({"max_sentences": 1}, "It is old. Very old!", False),
    ({"forbidden_words": ["sorry", "hope this helps"]}, "Sorrowful, but fine.", True),  # whole words only
    ({"forbidden_words": ["sorry", "hope this helps"]}, "I hope this helps!", False),
    ({"forbidden_words": ["sorry"]}, "SORRY, no.", False),  # case-insensitive
    ({"required_words": ["order", "number"]}, "Your order number is 12.", True),
    ({"required_words": ["order", "number"]}, "Your orders are late.", False),
    ({"forbidden_chars": "!?"}, "Fine.", True),
    ({"forbidden_chars": "!?"}, "Fine!", False),
    ({"lowercase": True}, "all lower, 42.", True),
    ({"lowercase": True}, "all lower, Except this.", False),
    # language: tests/test_checks.py, where lingua is loaded anyway
    ({"json": True}, '{"status": "ok", "items": [1, 2]}', True),
    ({"json": True}, "status: ok", False),
    ({"bullets": {"min": 2, "max": 3}}, "Steps:\n- one\n* two\n- three", True),
    ({"bullets": {"min": 2}}, "Steps:\n- one", False),
    ({"bullets": {"max": 0}}, "One line - with a dash.", True),
    ({"bullets": {"max": 0}}, "- a list", False),
])
def test_each_verifier_passes_and_fails(verify, answer, expected):
    assert passes(verify, answer) is expected


def test_sentences_are_counted_at_their_ends_not_at_decimals_or_abbreviations():
    assert count_sentences("") == 0
    assert count_sentences("In short: about 343.2 metres per second") == 1
    assert count_sentences("One. Two? Three!! And four") == 4
    assert count_sentences("Dr. Smith, i.e. the vet, said so.") == 1


def test_verdicts_give_every_verifiable_rule_of_every_answer():
    declared = (rules.Rule("short", "short", {"max_words": 2}), rules.Rule("tone", "warm", judge="Warm?"),
                rules.Rule("stop", "ends with a stop", {"ends_with": "."}))
    assert verdicts(declared, ["Yes.", "Yes it is", ""]) == [{"short": True, "stop": True},
                                                              {"short": False, "stop": False},
                                                              {"short": True, "stop": False}]
    assert rules.broken(declared, "Yes it is") == ["short", "stop"]


# ---- IFEval's verifiers, offline -------------------------------------------------------------------------------


@pytest.mark.parametrize("verify, answer, expected", [
    ({"id": "punctuation:no_comma"}, "No commas here.", True),
    ({"id": "punctuation:no_comma"}, "Well, a comma.", False),
    ({"id": "startend:end_checker", "args": {"end_phrase": "Any other questions?"}}, "Done. Any other questions?",
     True),
    ({"id": "startend:end_checker", "args": {"end_phrase": "Any other questions?"}}, "Done.", False),
    ({"id": "length_constraints:number_words", "args": {"num_words": 5, "relation": "less than"}},
     "Four words are here", True),
    ({"id": "keywords:existence", "args": {"keywords": ["refund"]}}, "No money back.", False),
    ({"id": "detectable_format:json_format"}, '{"a": 1}', True),
    ({"id": "punctuation:no_comma"}, "", False),  # IFEval's strict reading: an empty answer fails
])
def test_ifeval_instructions_through_if_verifiable(verify, answer, expected):
    assert passes({"ifeval": verify}, answer) is expected


@pytest.mark.parametrize("verify, message", [
    ({"id": "no:such_id"}, "is not an IFEval instruction"),
    ({"id": "length_constraints:number_words", "args": {"num_words": 5}}, "takes args {num_words, relation}"),
    ({"id": "length_constraints:number_words", "args": {"num_words": 5, "relation": "about"}}, "bad args"),
    ({"id": "combination:repeat_prompt", "args": {"prompt_to_repeat": "x"}}, "cannot be a rule"),
    ({"name": "punctuation:no_comma"}, "ifeval takes {id"),
])
def test_an_ifeval_rule_that_cannot_run_here_is_refused(verify, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{")):
        check_verify({"ifeval": verify})


def test_an_ifeval_verifier_that_needs_nltk_data_is_refused_at_load_where_the_data_is_missing():
    """IFEval counts sentences with nltk's punkt tokenizer, which nltk does not ship and nothing here downloads: the
    rule is refused when the prompt file loads, not at the first answer; where the data is installed, it runs."""
    import nltk

    verify = {"ifeval": {"id": "length_constraints:number_sentences",
                         "args": {"num_sentences": 2, "relation": "less than"}}}
    try:
        nltk.data.find("tokenizers/punkt/english.pickle")
    except LookupError:
        with pytest.raises(ValueError, match="needs nltk data that is not installed"):
            check_verify(verify)
    else:
        assert passes(verify, "One sentence.") and not passes(verify, "One. Two.")


# ---- the loader: a bad rule names its file:line ------------------------------------------------------------------


def write_prompt(tmp_path, rules_yaml: str, head: str = 'check: {regex: "^A: "}') -> str:
    path = tmp_path / "rules.md"
    path.write_text(f"---\n{head}\nrules:\n{rules_yaml}---\nAnswer.\n", encoding="utf-8")
    return str(path)


GOOD = '  - id: short\n    text: "At most 5 words"\n    verify: {max_words: 5}\n'


@pytest.mark.parametrize("bad, message", [
    ('  - id: x\n    text: "t"\n    verify: {max_letters: 5}\n', "rule x: unknown verify kind 'max_letters'"),
    ('  - id: x\n    text: "t"\n    verify: {max_words: many}\n', "rule x: max_words takes a whole number"),
    ('  - id: x\n    text: "t"\n    verify: {regex: "(unclosed"}\n', "rule x: regex '(unclosed' does not compile"),
    ('  - id: short\n    text: "t"\n    verify: {max_words: 9}\n', "rule id 'short' is declared twice"),
    ('  - id: x\n    text: "t"\n', "rule x: give exactly one of verify"),
    ('  - id: x\n    text: "t"\n    verify: {json: true}\n    judge: "JSON?"\n', "rule x: give exactly one of verify"),
    ('  - id: X-1\n    text: "t"\n    verify: {json: true}\n', "rule id must be lowercase letters"),
    ('  - id: x\n    verify: {json: true}\n', "rule x: text must be one non-empty line"),
    ('  - id: x\n    text: "t"\n    verify: {language: xx}\n', "language 'xx' is not an ISO 639-1 code"),
    ('  - id: x\n    text: "t"\n    verify: {bullets: {min: 3, max: 1}}\n', "bullets: min 3 is above max 1"),
    ('  - id: x\n    text: "t"\n    verify: {lowercase: yes please}\n', "lowercase takes true"),
    ('  - id: x\n    text: "t"\n    verify: {json: true}\n    weight: 2\n', "unknown rule key(s) weight"),
    ('  - id: check\n    text: "t"\n    verify: {json: true}\n', "rule id 'check' is the front matter's check"),
])
def test_a_bad_rule_fails_at_load_with_its_file_and_line(tmp_path, bad, message):
    path = write_prompt(tmp_path, GOOD + bad)
    with pytest.raises(RuleError) as raised:
        load_prompt(path)
    # line 1 is '---', 2 the check, 3 'rules:', 4-6 the good rule: the bad one opens on line 7
    assert str(raised.value).startswith(f"{path}:7: ") and message in str(raised.value)


def test_rules_alone_make_a_generative_task_and_the_check_is_the_first_rule(tmp_path):
    judged = '  - id: warm\n    text: "Sounds warm"\n    judge: "Is the reply warm?"\n    baseline_follows: true\n'
    prompt = load_prompt(write_prompt(tmp_path, GOOD + judged))
    assert [(rule.id, rule.line) for rule in prompt.rules] == [("check", 2), ("short", 4), ("warm", 7)]
    assert prompt.rules[0].verify == {"regex": "^A: "} and [r.id for r in prompt.verifiable_rules] == ["check", "short"]
    assert prompt.rules[2].baseline_follows and prompt.rules[2].judge == "Is the reply warm?"
    no_check = load_prompt(write_prompt(tmp_path, GOOD, head="stop: ['\\n']"))
    assert no_check.is_generative and no_check.check is None and [r.id for r in no_check.rules] == ["short"]
    with pytest.raises(ValueError, match="has 'labels' and 'check' or 'rules'"):
        load_prompt(write_prompt(tmp_path, GOOD, head="labels: [a, b]\nanswer_format: 'A: {label}'"))


def test_the_demo_prompt_declares_verifiable_rules_beyond_its_format():
    prompt = load_prompt(REPO / "prompts" / "in_short.md")
    assert prompt.rules[0].id == "check" and len(prompt.verifiable_rules) >= 5
    teacher_example = prompt.example_turns[3][1]  # "In short: water boils at 100 degrees Celsius at sea level."
    assert all(verdicts(prompt.rules, [teacher_example])[0].values())


# ---- stage 1: an answer that breaks a rule is rejected, or kept and named ---------------------------------------

RULES_PROMPT = ('---\ncheck: {regex: "^In short: "}\nrules:\n'
                '  - id: short\n    text: "At most 8 words"\n    verify: {max_words: 8}\n'
                '  - id: no_exclamation\n    text: "No exclamation mark"\n    verify: {forbidden_chars: "!"}\n'
                '---\nAnswer in one short sentence that begins with "In short:".\n')
# text i -> the teacher's answer: r0 keeps every rule, r1 breaks the format, r2 two rules, r3 one
ANSWERS = ["In short: water boils at 100 degrees.", "Water boils at 100 degrees.",
           "In short: water boils at exactly one hundred degrees Celsius at sea level!",
           "In short: water boils at 100 degrees!"]


@pytest.mark.parametrize("keep", [False, True])
def test_stage_1_rejects_an_answer_that_breaks_a_rule_and_counts_each_rule(tiny_model, tmp_path, monkeypatch, keep):
    from vllm import SamplingParams

    from distill import stage1
    from distill.teacher import StreamStats, stream
    from tests.test_teacher_stream import ScramblingEngine

    prompt_file, questions = tmp_path / "rules.md", tmp_path / "questions.jsonl"
    prompt_file.write_text(RULES_PROMPT, encoding="utf-8")
    questions.write_text("".join(json.dumps({"id": f"r{i}", "text": f"How hot does water boil, case {i}?"}) + "\n"
                                 for i in range(4)), encoding="utf-8")

    def stand_in_engine(args, teacher, todo, selected, settings, files):
        """stage1.answer_queries with a scripted engine for vLLM: the real teacher parses, and the real writer
        writes. The engine reads which case a request is from its prompt's last user turn, as a real one would."""
        case = lambda ids: int(teacher.tokenizer.decode(ids).rsplit("case ", 1)[1][0])  # noqa: E731
        engine = ScramblingEngine(lambda query, attempt: ANSWERS[query])
        add_request = engine.add_request
        engine.add_request = lambda ids, params: add_request([case(ids)], params)
        stats = StreamStats()
        with stage1.answer_writer(files, stats, selected, 0) as write:
            for outcome in stream(engine, teacher, todo, SamplingParams(max_tokens=16), stats=stats):
                write(stage1.answer_records(outcome, args, teacher))
        return stats.summary(), None

    monkeypatch.setattr(stage1, "answer_queries", stand_in_engine)
    output = tmp_path / "teacher.jsonl"
    printed = run_main("create_data.py", "--prompt_file", prompt_file, "--input_file", questions, "--split", "all",
                       "--output_file", output, "--model_name", tiny_model, "--max_model_len", 512,
                       *(["--keep_rule_failures"] if keep else [])).stdout
    written = {row["id"]: row for row in map(json.loads, output.read_text().splitlines())}
    rejects = {row["id"]: row for row in map(json.loads, output.with_suffix(".rejects.jsonl").read_text().splitlines())}
    record = json.loads(output.with_suffix(".run.json").read_text())
    if keep:
        assert sorted(written) == ["r0", "r1", "r2", "r3"] and not rejects
        assert "broken_rules" not in written["r0"]["teacher"]
        assert [written[i]["teacher"]["broken_rules"] for i in ("r1", "r2", "r3")] == [
            ["check"], ["short", "no_exclamation"], ["no_exclamation"]]
        assert record["counts"]["rules_broken"] == {"rejected": {}, "kept": {"check": 1, "short": 1,
                                                                             "no_exclamation": 2}}
        assert "no_exclamation: 0 rejected, 2 kept" in printed
    else:
        assert sorted(written) == ["r0"] and sorted(rejects) == ["r1", "r2", "r3"]
        assert [rejects[i]["reason"] for i in ("r1", "r2", "r3")] == ["rule:check", "rule:short", "rule:no_exclamation"]
        assert rejects["r2"]["failures"][0]["broken_rules"] == ["short", "no_exclamation"]
        assert record["counts"]["reject_reasons_this_run"] == {"rule:check": 1, "rule:short": 1,
                                                                "rule:no_exclamation": 1}
        assert record["counts"]["rules_broken"] == {"rejected": {"check": 1, "short": 1, "no_exclamation": 2},
                                                    "kept": {}}
        assert "no_exclamation: 2 rejected, check: 1 rejected, short: 1 rejected" in printed
    assert record["settings"]["keep_rule_failures"] is keep


# ---- stage 3: per-rule pass rates, transfer, lost and gained ---------------------------------------------------


def test_stage_3_reports_each_rule_with_transfer_lost_and_gained(tmp_path, capsys):
    from types import SimpleNamespace

    import evaluate
    from distill import report

    prompt_file = tmp_path / "rules.md"
    prompt_file.write_text(RULES_PROMPT.replace("rules:\n", "rules:\n  - id: warm\n    text: \"Warm\"\n"
                                                            "    judge: \"Is it warm?\"\n"), encoding="utf-8")
    prompt = load_prompt(prompt_file)
    rows = [{"id": f"r{i}", "text": "How hot does water boil?"} for i in range(4)]
    # the student's answers, and the teacher's to the same questions
    student = ["In short: water boils at 100 degrees.", "In short: water boils at 100 degrees!",
               "Water boils at 100 degrees.", "In short: water boils at 100 degrees."]
    teacher = ["In short: water boils at 100 degrees.", "In short: water boils at 100 degrees.",
               "In short: water boils at 100 degrees.", "In short: it boils at a hundred degrees Celsius at sea level!"]
    generation = SimpleNamespace(answers=student, raw=student, reasons=["ok"] * 4, output_tokens=[9] * 4)
    tokenizer = lambda text, add_special_tokens=False: SimpleNamespace(input_ids=text.split())  # noqa: E731
    results = evaluate.generative_results(prompt, rows, [[0]] * 4, generation, teacher, tokenizer, quiet=True)

    per_rule = results["rules"]
    assert list(per_rule) == ["check", "short", "no_exclamation"], "a judged rule waits for --judge_model"
    assert [per_rule[r]["pass_rate"] for r in per_rule] == [0.75, 1.0, 0.75]
    assert [per_rule[r]["teacher_pass_rate"] for r in per_rule] == [1.0, 0.75, 0.75]
    # check: the teacher passes all 4, the student loses r2; short: the student gains r3; no_exclamation: loses r1,
    # gains r3, so its transfer is 1.0 with one answer lost and one gained
    assert [(per_rule[r]["lost"], per_rule[r]["gained"]) for r in per_rule] == [(1, 0), (0, 1), (1, 1)]
    assert per_rule["check"]["transfer"] == 0.75 and per_rule["short"]["transfer"] == pytest.approx(4 / 3)
    assert per_rule["no_exclamation"]["broken"] == [{"id": "r1", "text": rows[1]["text"], "answer": student[1]}]
    assert results["all_rules_pass_rate"] == 0.5 and results["n_all_rules_passed"] == 2
    assert results["non_answer_rate"] == 0.0
    assert results["examples"][1]["rules"] == {"check": True, "short": True, "no_exclamation": False}
    assert results["examples"][3]["teacher_rules"] == {"check": True, "short": False, "no_exclamation": False}

    report.print_rules(results)
    printed = capsys.readouterr().out
    assert "rules: all pass 50.0% (2 of 4)" in printed
    assert "no_exclamation" in printed and "100.0%" in printed

    # the judged rule, once the judge has graded it (distill/judge.py adds the verdicts, then scores again)
    from distill.metrics import score_rules

    for example, verdict in zip(results["examples"], [True, None, True, False]):
        example["rules"]["warm"] = verdict
    rescored = score_rules(prompt.rules, results["examples"])
    assert rescored["rules"]["warm"]["n"] == 3 and rescored["rules"]["warm"]["pass_rate"] == pytest.approx(2 / 3)
    assert "teacher_pass_rate" not in rescored["rules"]["warm"]  # no verdicts on the teacher's answers
    assert rescored["n_all_rules_passed"] == 1  # r3 breaks warm, r1 has no verdict: only r0 passes every rule


# ---- evaluate.py --compare: models x rules --------------------------------------------------------------------


def results_file(path, rates: dict, strict: float, follows=()):
    path.write_text(json.dumps({
        "task": "generative", "n": 10, "split": "heldout", "test_file": "q.jsonl", "strict_pass_rate": strict,
        "all_rules_pass_rate": min(rates.values()),
        "rules": {rule_id: {"text": f"what {rule_id} asks", "pass_rate": rate, "baseline_follows": rule_id in follows}
                  for rule_id, rate in rates.items()}}))
    return path


def test_compare_prints_models_by_rules_and_writes_the_heatmap(tmp_path):
    base = results_file(tmp_path / "eval_base.json", {"check": 0.0, "english": 1.0}, 0.0, follows={"english"})
    teacher = results_file(tmp_path / "eval_teacher.json", {"check": 0.9, "english": 1.0, "warm": 0.8}, 0.85)
    png = tmp_path / "cmp.png"
    printed = run_main("evaluate.py", "--compare", base, teacher, "--output_file", png, "--report_to", "none").stdout
    lines = printed.splitlines()
    assert lines[0].split() == ["check", "english*", "warm", "all", "rules", "strict", "pass"]
    assert lines[1].split() == ["base", "0.0%", "100.0%", "n/a", "0.0%", "0.0%"]
    assert lines[2].split() == ["teacher", "90.0%", "100.0%", "80.0%", "80.0%", "85.0%"]
    assert f"heatmap -> {png}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000

    default = run_main("evaluate.py", "--compare", base, teacher, "--report_to", "none").stdout
    assert (tmp_path / "rules_compare.png").exists() and "rules_compare.png" in default
    label = tmp_path / "label.json"
    label.write_text(json.dumps({"task": "label"}))
    refused = run_main("evaluate.py", "--compare", label, check=False)
    assert refused.returncode == 1 and "not a generative task's results" in refused.stderr


def test_the_rules_example_in_the_docs_loads(tmp_path):
    docs = (REPO / "docs" / "prompt-files.md").read_text(encoding="utf-8")
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "from_docs.md"
    path.write_text(f"---\n{example}---\nAnswer in one short sentence.\n", encoding="utf-8")
    prompt = load_prompt(path)
    assert [rule.id for rule in prompt.rules] == ["check", "one_sentence", "no_comma", "warm_tone"]
    assert verdicts(prompt.rules, ["In short: yes."]) == [{"check": True, "one_sentence": True, "no_comma": True}]
