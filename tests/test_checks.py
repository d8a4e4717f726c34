"""Generative tasks: the check functions on hand-made answers, prompt files that declare a check, the French prompt
and its question set."""

import json
import re
from collections import Counter

import pytest

from distill.checks import describe, detected_languages, passes, passes_each, validate
from distill.prompts import load_prompt
from distill.render import teacher_messages
from distill.splits import select
from tests.conftest import REPO

FRENCH = {"answer_language": "fr"}
FRENCH_PROMPT = REPO / "prompts" / "answer_in_french.md"
QUESTIONS = REPO / "example-data" / "general_questions.jsonl"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
KINDS = ("general", "french", "code", "one_word", "numbers")


# ---- answer_language -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    "Le ciel est bleu parce que l'air disperse surtout la lumière bleue du soleil.",
    "La capitale du Japon est Tokyo.",
    "Un marathon fait 42,195 kilomètres.",
    "Je ne suis pas sûr, mais je pense que les girafes ont un long cou pour atteindre les feuilles.",
])
def test_french_answers_pass(answer):
    assert passes(FRENCH, answer)


@pytest.mark.parametrize("answer", [
    "The sky is blue because air scatters blue light more than red light.",
    "El cielo es azul porque el aire dispersa la luz azul del sol.",
    "Der Himmel ist blau, weil die Luft das blaue Licht stärker streut.",
])
def test_answers_in_other_languages_fail(answer):
    assert not passes(FRENCH, answer)


@pytest.mark.parametrize("answer", ["", "   \n", "42", "```python\nprint(len(items))\n```", "`len()`"])
def test_empty_or_undetectable_answers_fail(answer):
    assert not passes(FRENCH, answer)


def test_code_in_a_french_answer_does_not_count_as_english():
    inline = "En Python, `len(my_list)` renvoie le nombre d'éléments de la liste `my_list`."
    fenced = ("On trie un dictionnaire par valeur avec la fonction sorted :\n"
              "```python\nsorted(scores.items(), key=lambda item: item[1], reverse=True)\n```\n"
              "La clé donne la valeur de chaque paire.")
    assert passes(FRENCH, inline) and passes(FRENCH, fenced)
    assert not passes(FRENCH, "In Python, `len(my_list)` returns the number of items in `my_list`.")


def test_batch_form_agrees_with_one_at_a_time():
    answers = ["Le chat dort sur le canapé.", "The cat sleeps on the sofa.", "", "Il fait beau aujourd'hui."]
    assert passes_each(FRENCH, answers) == [passes(FRENCH, answer) for answer in answers] == [True, False, False, True]
    assert detected_languages(answers) == ["fr", "en", None, "fr"]


def test_the_language_rule_is_the_check_s_verifier():
    from distill.rules import check_verify
    from distill.rules import passes_each as rule_passes_each

    answers = ["The sky is blue because air scatters blue light.",
               "Le ciel est bleu parce que l'air disperse la lumière."]
    assert rule_passes_each(check_verify({"language": "en"}), answers) == [True, False]
    assert rule_passes_each(check_verify({"language": "fr"}), answers) == passes_each(FRENCH, answers) == [False, True]


def test_other_language_codes_work():
    assert passes({"answer_language": "de"}, "Der Himmel ist blau, weil die Luft das blaue Licht stärker streut.")
    assert passes({"answer_language": "EN"}, "The sky is blue because air scatters blue light.")


# ---- regex ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, answer, expected", [
    (r"^\d+$", "42", True),
    (r"^\d+$", "42 ans", False),
    (r"Réponse ?:", "Voici. Réponse : oui", True),  # re.search: a match anywhere counts
    (r"oui", "OUI", False),                          # case matters unless the pattern says (?i)
    (r"(?i)oui", "OUI", True),
    (r"\S", "", False),
])
def test_regex_check(pattern, answer, expected):
    assert passes({"regex": pattern}, answer) is expected


def test_regex_batch():
    assert passes_each({"regex": r"\bParis\b"}, ["C'est Paris.", "Parisien", "paris"]) == [True, False, False]


def test_describe_names_the_kind_and_value():
    assert "fr" in describe(FRENCH) and "lingua" in describe(FRENCH)
    assert r"^\d+$" in describe({"regex": r"^\d+$"})


@pytest.mark.parametrize("check, message", [
    ({"language": "fr"}, "unknown check kind 'language'; the kinds are answer_language, regex"),
    ({"answer_language": "fr", "regex": "x"}, "exactly one of answer_language, regex"),
    ("fr", "exactly one of answer_language, regex"),
    ({"answer_language": "french"}, "not an ISO 639-1 code"),
    ({"regex": "(unclosed"}, "does not compile: missing ), unterminated subpattern"),
    ({"regex": ["a", "b"]}, "regex must be a quoted string"),
])
def test_validate_rejects_bad_checks(check, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(check)


# ---- prompt files that declare a check -----------------------------------------------------------------------


def write_prompt(tmp_path, name, front_matter):
    path = tmp_path / name
    path.write_text(f"---\n{front_matter}\n---\nAnswer the question.\n", encoding="utf-8")
    return path


def test_generative_prompt_loads_with_defaults(tmp_path):
    prompt = load_prompt(write_prompt(tmp_path, "free.md", "check: {regex: '^Oui|^Non'}"))
    assert prompt.is_generative and prompt.check == {"regex": "^Oui|^Non"}
    assert prompt.labels == () and prompt.answer_format is None
    assert teacher_messages(prompt, "Il pleut ?") == [
        {"role": "system", "content": "Answer the question."}, {"role": "user", "content": "Il pleut ?"}]


def test_label_prompt_is_not_generative():
    prompt = load_prompt()
    assert not prompt.is_generative and prompt.check is None and prompt.labels


@pytest.mark.parametrize("front_matter, fix", [
    ("labels: [a, b]\nanswer_format: 'A: {label}'\nquery_template: '{query}'\ncheck: {answer_language: fr}",
     "has 'labels' and 'check' or 'rules'; keep 'labels' (with answer_format) for a label task, or 'check'"),
    ("query_template: '{query}'", "needs 'labels' (a label task, with answer_format and query_template) or 'check'"),
    ("check: {language: fr}", "unknown check kind 'language'; the kinds are answer_language, regex"),
    ("check: {regex: '[a-z'}", "regex '[a-z' does not compile: unterminated character set"),
    ("check: {answer_language: xx}", "answer_language 'xx' is not an ISO 639-1 code"),
    ("check: {answer_language: fr}\nanswer_format: 'A: {label}'", "answer_format belongs to label tasks; remove it"),
    ("check: {answer_language: fr}\nquery_template: 'Q'", "query_template needs '{query}'"),
])
def test_bad_generative_prompt_files_name_the_file_and_the_fix(tmp_path, front_matter, fix):
    path = write_prompt(tmp_path, "bad.md", front_matter)
    with pytest.raises(ValueError) as raised:
        load_prompt(path)
    # a check's own error names its line (the file's line 1 is the opening '---')
    where = f"{path}:2: " if fix.startswith(("unknown check", "regex", "answer_language")) else f"{path}: "
    assert str(raised.value).startswith(where) and fix in str(raised.value)


# ---- the French prompt and its questions ---------------------------------------------------------------------


def test_french_prompt_is_a_long_generative_task():
    prompt = load_prompt(FRENCH_PROMPT)
    assert prompt.is_generative and prompt.check == FRENCH
    user = teacher_messages(prompt, "Why is the sky blue?")[-1]["content"]
    assert user.startswith("Why is the sky blue?") and passes(FRENCH, prompt.text)
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(SMOLLM2)(prompt.text, add_special_tokens=False).input_ids)
    assert tokens >= 1_000, tokens


@pytest.fixture(scope="module")
def questions():
    return [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]


def test_questions_have_unique_ids_and_texts(questions):
    assert 380 <= len(questions) <= 420
    assert all(set(row) == {"id", "text", "group", "kind"} for row in questions)
    assert all(re.fullmatch(r"gq-\d{4}", row["id"]) for row in questions)
    assert len({row["id"] for row in questions}) == len(questions)
    normalized = Counter(" ".join(row["text"].lower().split()) for row in questions)
    assert [text for text, count in normalized.items() if count > 1] == []


def test_questions_cover_every_kind(questions):
    kinds = Counter(row["kind"] for row in questions)
    assert set(kinds) == set(KINDS)
    assert kinds["french"] >= 20 and kinds["code"] >= 15 and kinds["one_word"] >= 15 and kinds["numbers"] >= 5
    assert all(len(row["text"].split()) == 1 for row in questions if row["kind"] == "one_word")


def test_french_questions_are_french_and_english_ones_are_not(questions):
    french = [row["text"] for row in questions if row["kind"] == "french"]
    english = [row["text"] for row in questions if row["kind"] == "general"]
    assert all(passes_each(FRENCH, french))
    assert sum(passes_each(FRENCH, english)) <= len(english) // 50  # lingua misreads a few very short questions


def test_question_split_holds_out_whole_groups(questions):
    heldout = select(questions, "heldout")
    assert 0.15 <= len(heldout) / len(questions) <= 0.30
    heldout_groups = {row["group"] for row in heldout}
    assert all(row in heldout for row in questions if row["group"] in heldout_groups)


def test_no_question_is_answered_in_the_prompt_examples(questions):
    # A question the prompt answers verbatim would measure the teacher's copying, not its following the rules.
    prompt_text = load_prompt(FRENCH_PROMPT).text
    examples = {text.strip().lower() for text in re.findall(r"^Question : (.*)$", prompt_text, re.MULTILINE)}
    assert len(examples) >= 10
    assert [row["text"] for row in questions if row["text"].strip().lower() in examples] == []


def test_a_generative_task_declares_where_its_answer_stops(tmp_path):
    from distill.prompts import load_prompt

    french = load_prompt(REPO / "prompts" / "answer_in_french.md")
    assert french.stop_sampling() == {"stop": [". ", ".\n", "\n"], "include_stop_str_in_output": True}
    plain = tmp_path / "plain.md"
    plain.write_text("---\ncheck: {regex: \".\"}\n---\nAnswer.\n", encoding="utf-8")
    assert load_prompt(plain).stop_sampling() == {}
    bad = tmp_path / "bad.md"
    bad.write_text("---\ncheck: {regex: \".\"}\nstop: \".\"\n---\nAnswer.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.md: stop must be a list"):
        load_prompt(bad)
