"""distill.answers: a teacher's or student's raw output -> a label or a counted failure. No model needed.

The outputs below are shaped like real ones: Qwen3 Thinking-2507 opens <think> in its template, so its completions
carry only the closing tag; hybrid Qwen3 models emit both tags; instruct models emit no reasoning at all.
"""

import pytest

from distill.answers import Parsed, parse_student, parse_teacher, split_reasoning
from distill.prompts import TaskPrompt, load_prompt

PROMPT = load_prompt()

THINKING_SPANISH = (
    "Okay, let me look at the text. It says \"La panadería de la esquina abre a las seis\".\n"
    "At first glance the accents could be French (é, à), so maybe:\n"
    "Final Answer: fr\n"
    "Wait, no: ñ in \"panadería\"... actually í, and the words 'de la', 'pero', 'muy' are Spanish. "
    "Not pt (no ã/õ), not it. Labels considered: fr, es, ot.\n"
    "</think>\n\n"
    "Final Answer: es"
)


def parse(output, expects_reasoning=False, constrained=False):
    return parse_teacher(output, PROMPT, expects_reasoning=expects_reasoning, constrained=constrained)


# ---- free-form teacher answers -------------------------------------------------------------------------------


def test_answer_after_closing_tag_without_opening_tag():
    parsed = parse(THINKING_SPANISH, expects_reasoning=True)
    assert parsed.answer == "es" and parsed.reason == "ok"
    assert parsed.reasoning_chars == len(THINKING_SPANISH.split("</think>")[0])


def test_label_in_reasoning_is_never_the_answer():
    # The reasoning says fr twice; only the line after </think> counts.
    parsed = parse(THINKING_SPANISH, expects_reasoning=True)
    assert parsed.answer != "fr"


def test_reasoning_mentions_labels_but_final_text_has_no_answer_line():
    output = "The text is French. Final Answer: fr\n</think>\n\nThe text is written in French."
    parsed = parse(output, expects_reasoning=True)
    assert parsed == Parsed(None, "no_answer_line", len("The text is French. Final Answer: fr\n"))


def test_bare_label_after_reasoning_is_not_an_answer_line_in_free_mode():
    assert parse("Spanish, clearly.</think>\n\nes", expects_reasoning=True).reason == "no_answer_line"


def test_both_think_tags_hybrid_qwen3():
    output = "<think>\nGreek letters throughout: el.\n</think>\n\nFinal Answer: el"
    parsed = parse(output)
    assert parsed.answer == "el"
    # the opening tag is not counted as reasoning
    assert parsed.reasoning_chars == len("\nGreek letters throughout: el.\n")


def test_last_closing_tag_wins():
    output = "first thought</think>Final Answer: de\nsecond thought</think>\nFinal Answer: en"
    parsed = parse(output, expects_reasoning=True)
    assert parsed.answer == "en"
    assert parsed.reasoning_chars == len(output.rsplit("</think>", 1)[0])
    # an answer line between two closing tags is still reasoning
    assert parse("a</think>\nFinal Answer: de\n</think>", expects_reasoning=True).reason == "empty_answer"


def test_missing_closing_tag_with_expected_reasoning_is_unclosed():
    output = "Hmm, Cyrillic letters, no і/ї... so ru.\nFinal Answer: ru"  # cut off by max_tokens before </think>
    parsed = parse(output, expects_reasoning=True)
    assert parsed == Parsed(None, "unclosed_reasoning", len(output))


def test_opening_tag_without_closing_tag_is_unclosed_even_if_not_expected():
    parsed = parse("<think>\nThe script is Devanagari, so hi.\nFinal Answer: hi")
    assert parsed.answer is None and parsed.reason == "unclosed_reasoning"


def test_no_reasoning_model_plain_answer():
    assert parse("Final Answer: zh") == Parsed("zh", "ok", 0)


@pytest.mark.parametrize("label", ["pt", "ja", "english", "fr/es", "xx"])
def test_label_outside_the_set(label):
    parsed = parse(f"Looks foreign.</think>\nFinal Answer: {label}", expects_reasoning=True)
    assert parsed == Parsed(None, "label_not_in_set", len("Looks foreign."))


@pytest.mark.parametrize("line", [
    "  final answer:   FR  ",
    "FINAL ANSWER: fr",
    "Final Answer:fr",
    "Final  Answer:fr",
    "\tFinal Answer: Fr\t",
])
def test_whitespace_and_case_are_tolerated(line):
    assert parse(f"ok</think>\n{line}\n\n", expects_reasoning=True).answer == "fr"


@pytest.mark.parametrize("final", [
    "Final Answer: fr\nI hope this helps!",
    "Final Answer: fr\n(French, because of the elisions)",
    "Final Answer: fr (French)",
    "Final Answer: fr es",
    "**Final Answer: fr**",
    "Final Answer: `fr`",
    "Answer: fr",
])
def test_anything_but_a_clean_last_answer_line_fails(final):
    parsed = parse(f"reasoning</think>\n\n{final}", expects_reasoning=True)
    assert parsed.answer is None
    assert parsed.reason in ("no_answer_line", "label_not_in_set")


def test_text_after_answer_line_is_no_answer_line():
    assert parse("r</think>\nFinal Answer: fr\nDone.", expects_reasoning=True).reason == "no_answer_line"


def test_trailing_punctuation_makes_the_label_unknown():
    assert parse("Final Answer: fr.").reason == "label_not_in_set"


@pytest.mark.parametrize("output, expects, reason", [
    ("", False, "empty_answer"),
    ("   \n\n  ", False, "empty_answer"),
    ("", True, "unclosed_reasoning"),
    ("all reasoning, no answer</think>", True, "empty_answer"),
    ("all reasoning</think>\n\n   \n", True, "empty_answer"),
])
def test_empty_outputs(output, expects, reason):
    parsed = parse(output, expects_reasoning=expects)
    assert parsed.answer is None and parsed.reason == reason


# ---- constrained (structured outputs over the label set) -----------------------------------------------------


@pytest.mark.parametrize("output, label", [("fr", "fr"), ("ot", "ot"), (" ZH\n", "zh"),
                                           ("thinking about it</think>\n\nur", "ur")])
def test_constrained_bare_label(output, label):
    assert parse(output, expects_reasoning="</think>" in output, constrained=True).answer == label


@pytest.mark.parametrize("output, reason", [
    ("Final Answer: fr", "label_not_in_set"),
    ("fr\nes", "label_not_in_set"),
    ("pt", "label_not_in_set"),
    ("", "empty_answer"),
])
def test_constrained_rejects_anything_but_a_label(output, reason):
    parsed = parse(output, constrained=True)
    assert parsed.answer is None and parsed.reason == reason


def test_constrained_reasoning_still_must_close():
    assert parse("still thinking fr", expects_reasoning=True, constrained=True).reason == "unclosed_reasoning"


# ---- split_reasoning and other answer formats ----------------------------------------------------------------


def test_split_reasoning():
    assert split_reasoning("a</think>b", expects_reasoning=True) == ("b", 1)
    assert split_reasoning("plain", expects_reasoning=False) == ("plain", 0)
    assert split_reasoning("never closed", expects_reasoning=True) == (None, len("never closed"))


def test_answer_format_with_a_tail_from_another_prompt():
    prompt = TaskPrompt("x.md", "prompt", ("pos", "neg"), "<answer>{label}</answer>", "{query}")
    assert parse_teacher("Because.\n<answer> POS </answer>", prompt).answer == "pos"
    assert parse_teacher("<answer>pos</answer> thanks", prompt).reason == "no_answer_line"
    assert parse_teacher("<answer>neutral</answer>", prompt).reason == "label_not_in_set"


# ---- student --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output, expected", [
    ("fr", "fr"), (" FR \n", "fr"), ("ot", "ot"), ("\nzh", "zh"),
    ("Final Answer: fr", None), ("fr.", None), ("fr es", None), ("", None), ("   ", None), ("french", None),
    ("pt", None), ("<think></think>fr", None), ("fr\nfr", None),
])
def test_parse_student_is_strict(output, expected):
    assert parse_student(output, PROMPT.labels) == expected
