"""Strict scoring of generative answers (distill/checks.py): a passing check is not yet an answer.

Hand-labelled answers both ways, for the two example tasks: real short answers pass; restatements of the prompt
(echo), loops, and answers off their question's topic do not, each with its reason. The French non-answers are the
ones the 135M teacher and student really wrote under prompts/answer_in_french.md; the "In short" ones were written by
the teacher under prompts/in_short.md on 2026-11-30 and labelled by reading them. Then stage 1's teacher path rejects
such answers, and evaluation's scores count them.
"""

import pytest

from distill import checks
from distill.prompts import TaskPrompt, load_prompt
from distill.render import teacher_messages
from tests.conftest import REPO

FRENCH = load_prompt(REPO / "prompts" / "answer_in_french.md")
IN_SHORT = load_prompt(REPO / "prompts" / "in_short.md")

# (question, answer, reason or None for a real answer)
FRENCH_LABELLED = [
    # real short answers (the prompt's own style, not its examples)
    ("Why does soda go flat?", "Le gaz carbonique s'échappe de la bouteille ouverte, alors la boisson perd ses bulles.",
     None),
    ("What is the capital of Australia?", "La capitale de l'Australie est Canberra.", None),
    ("How is coffee decaffeinated?", "On retire la caféine des grains verts avec de l'eau ou un solvant avant de "
                                      "les torréfier.", None),
    ("Where does tea come from originally?", "Le thé vient de Chine, où on le boit depuis des milliers d'années.",
     None),
    ("How many days are in a leap year?", "Une année bissextile compte 366 jours.", None),
    # what the 135M teacher and student wrote instead (issue 17)
    ("Why does soda go flat?", "La question est toujours en français, mais tu réponds en une phrase courte.", "echo"),
    ("Where does tea come from originally?", "La tea est réponds toujours en français, en une phrase courte.", "echo"),
    ("What is the capital of Australia?", "La capital de France est Paris.", "echo"),
    ("How do magnets work?", "Cette question est en français, en une phrase courte.", "echo"),
    ("What is a comet?", "Je réponds toujours en français, en une phrase courte.", "echo"),
    ("Why do cats sleep so much?", "(Réponds en français, en une phrase courte.)", "echo"),
    ("What is a fraction?", "La bonne réponse est : La bonne réponse est la bonne réponse, mais la bonne réponse est "
                            "la bonne ré", "loop"),
    ("Who was Mozart?", "Mozart est un artiste de l'Europe, ce qui est le monde de Mozart, ce qui est le monde de "
                        "Mozart.", "loop"),
]

IN_SHORT_LABELLED = [
    # real answers, as the teacher wrote them (wrong facts still answer: strict scoring judges form and topic)
    ("Who painted the Mona Lisa?", "In short: Leonardo da Vinci painted the Mona Lisa.", None),
    ("How long does the Earth take to orbit the Sun?",
     "In short: the Earth takes 365.25 days to complete one orbit around the Sun.", None),
    ("Does hot chocolate contain caffeine?", "In short: no, hot chocolate does not contain caffeine.", None),
    ("What is HTML?", "In short: Hypertext Markup Language is a programming language used to create web pages.", None),
    ("What is the difference between watercolour and acrylic paint?",
     "In short: watercolour is a type of paint made from water, while acrylic paint is a type of paint made from a "
     "liquid pigment.", None),
    ("What is the difference between a violin and a viola?",
     "In short: a violin is a stringed instrument played by bowing, while a viola is a stringed instrument played "
     "with a bow.", None),
    ("Deserts?", "In short: deserts are large areas of land that are covered in sand.", None),
    ("How do I center a div with CSS?",
     "In short: you can center a div with CSS by using the `margin-right: 0;` property.", None),
    ("How many continents are there?",
     "In short: there are seven continents, but there are also two extra ones, Antarctica and Australia.", None),
    ("Do sharks sleep?", "In short: sharks do not sleep.", None),  # "not" is the answer
    ("What is the difference between `==` and `===` in JavaScript?",
     "In short: `==` is a type coercion, which means that it checks if the values of the two operands are the same.",
     None),  # a code span is content no word matches
    # not answers
    ("Why is the Dead Sea so salty?", "In short: the Dead Sea is a body of water that is part of the Red Sea, and it "
     "is salty because it is a body of water that is part of the Red Sea.", "loop"),
    ("Qui a peint La Nuit étoilée ?", "In short: a French song.", "off_topic"),
    ("Why do songs get stuck in your head?", "In short: music is a form of art that has been passed down for "
     "centuries, and it's hard to imagine life without it.", "off_topic"),
    ("À quoi servent les cookies sur un site internet ?",
     "In short: a noun is a word that means something, so it's a word that means something.", "off_topic"),
    ("Why is the sky blue?", "In short: why is the sky blue?", "off_topic"),  # the question, restated
    ("What is a pension?", "In short: a pension is money saved during your working life and paid to you regularly "
     "after you retire.", "echo"),  # an example turn's answer, copied
    ("Why is the sky blue?", "In short: you answer every question in one short sentence that begins with In short.",
     "echo"),
    ("What is a fjord?", "In short: a fjord is a fjord is a fjord is a fjord.", "loop"),
    ("Mould?", "In short: a mold is a type of mold.", "off_topic"),  # says nothing
    # a stutter of the format is a loop, though no 3-word phrase repeats (seen in the demo students' passes)
    ("What is espresso?", "In short: in short: in short: espresso is a drink made from hot water.", "loop"),
    ("What is espresso?", "In short: In short: espresso is a strong coffee.", "loop"),
    # a short, direct answer names none of the question's words and is an answer
    ("Should I water cactus plants every day?", "In short: no.", None),
    ("Is the Sun a star?", "In short: yes, a medium-sized one.", None),
    ("How many legs does a spider have?", "In short: eight.", None),
    ("When did the Berlin Wall fall?", "In short: in 1989.", None),
    # ... but only to the kind of question it answers, and only when short
    ("Why is the sky blue?", "In short: no.", "off_topic"),
    ("What is a comet?", "In short: 42.", "off_topic"),
    ("Is the Sun a star?", "In short: no, Paris is the capital city of France and it has many famous museums.",
     "off_topic"),
]


@pytest.mark.parametrize("question, answer, reason", FRENCH_LABELLED)
def test_french_answers_hand_labelled(question, answer, reason):
    assert checks.non_answer_reason(FRENCH, question, answer) == reason


@pytest.mark.parametrize("question, answer, reason", IN_SHORT_LABELLED)
def test_in_short_answers_hand_labelled(question, answer, reason):
    assert checks.non_answer_reason(IN_SHORT, question, answer) == reason


def test_every_french_non_answer_still_passes_the_language_check():
    """Why strict scoring exists: the check alone passes all of them."""
    non_answers = [answer for _, answer, reason in FRENCH_LABELLED if reason]
    assert all(checks.passes_each(FRENCH.check, non_answers))


def test_echo_share_counts_the_prompt_trigrams_of_the_answer():
    grams = checks._prompt_ngrams(("one two three four",))
    assert checks.echo_share("one two three four", grams) == 1.0
    assert checks.echo_share("one two three five six", grams) == pytest.approx(1 / 3)
    assert checks.echo_share("one two", grams) == 0.0  # too short to have a trigram


def test_loops_need_three_repeats_of_a_phrase_a_repeated_clause_or_a_span_twice_in_a_row():
    assert checks.loops("the cat sat, the cat sat, the cat sat")
    assert checks.loops("Mozart est un artiste, ce qui est le monde de Mozart, ce qui est le monde de Mozart.")
    assert not checks.loops("the cat sat on the mat and the cat sat still")
    clause = "it is salty because it is part of the sea"
    assert checks.loops(f"{clause} and {clause}")
    # a comparison's parallel halves share up to 7 words and are an answer
    assert not checks.loops("watercolour is a type of paint made from water, while acrylic is a type of paint made "
                            "from pigment")


def test_on_topic_matches_stems_acronyms_and_refuses_a_restated_question():
    assert checks.on_topic("Which planets have rings?", "Saturn, Jupiter, Uranus and Neptune are ringed planets.")
    assert checks.on_topic("What is NASA?", "The National Aeronautics and Space Administration runs US space flight.")
    assert not checks.on_topic("What is a comet?", "Paris is the capital of France.")
    assert not checks.on_topic("What is a comet?", "A comet?")
    assert checks.on_topic("Why?", "Because the wind blows.")  # no content word asked: something new suffices


def test_the_format_demanded_by_a_regex_check_is_not_content():
    assert checks.content_of(IN_SHORT.check, "In short: Paris.") == "Paris."
    assert checks.content_of(IN_SHORT.check, "Paris.") == "Paris."
    assert checks.content_of(FRENCH.check, "Paris.") == "Paris."


def test_on_topic_none_leaves_echo_and_loop():
    prompt = TaskPrompt("p.md", "Translate into German.", (), None, "{query}", {"answer_language": "de"},
                        on_topic="none")
    assert checks.non_answer_reason(prompt, "What is a comet?", "Ein Komet ist ein Himmelskörper aus Eis.") is None
    assert checks.non_answer_reason(prompt, "x", "ja ja ja ja ja ja ja ja") == "loop"


def test_a_prompt_file_refuses_a_bad_on_topic_or_example_turns(tmp_path):
    bad_topic = tmp_path / "bad_topic.md"
    bad_topic.write_text('---\ncheck: {regex: "x"}\non_topic: words\n---\nText\n', encoding="utf-8")
    with pytest.raises(ValueError, match="on_topic must be one of question_words, none"):
        load_prompt(bad_topic)
    bad_turns = tmp_path / "bad_turns.md"
    bad_turns.write_text('---\ncheck: {regex: "x"}\nexample_turns: [{user: hi}]\n---\nText\n', encoding="utf-8")
    with pytest.raises(ValueError, match="example_turns must be a list of"):
        load_prompt(bad_turns)


def test_example_turns_are_real_chat_turns_before_the_query():
    messages = teacher_messages(IN_SHORT, "Why is the sky blue?")
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "Why is the sky blue?"}
    turns = messages[1:-1]
    assert len(turns) == 2 * len(IN_SHORT.example_turns) >= 2 * 30
    assert [t["role"] for t in turns] == ["user", "assistant"] * len(IN_SHORT.example_turns)
    assert all(t["content"].startswith("In short: ") for t in turns[1::2])


def test_no_example_turn_is_one_of_the_questions_we_score_on():
    """The teacher must not have seen, in its prompt, a question it is scored on (or that training uses)."""
    from distill.records import read_queries

    questions = {row["text"].strip().lower() for row in read_queries(
        str(REPO / "example-data" / "general_questions.jsonl"), "text").rows}
    assert not questions & {user.strip().lower() for user, _ in IN_SHORT.example_turns}


# ---- the judge (evaluate.py --judge_model) ----------------------------------------------------------------------


def test_the_judge_prompt_carries_the_task_rubric_and_is_a_yes_no_label_task():
    from distill.judge import DEFAULT_RUBRIC, judge_prompt, judge_query

    judge = judge_prompt(IN_SHORT)
    assert judge.labels == ("yes", "no") and not judge.is_generative
    assert IN_SHORT.judge_rubric in judge.text and "{rubric}" not in judge.text
    plain = TaskPrompt("p.md", "x", (), None, "{query}", {"regex": "x"})
    assert DEFAULT_RUBRIC in judge_prompt(plain).text
    query = judge_query("Why is the sky blue?", "")
    assert "Why is the sky blue?" in query and "(no answer)" in query


def test_judge_agreement_counts_only_what_the_judge_graded():
    from distill.judge import agreement

    result = agreement([True, False, None, True], [True, True, False, False])
    assert result == {"judged_pass_rate": 2 / 3, "n_judged": 3, "judge_unparsed": 1,
                      "agreement_with_strict": 1 / 3, "judge_yes_strict_no": 1, "judge_no_strict_yes": 1}


@pytest.mark.slow
def test_evaluate_with_a_judge_model_reports_the_judged_rate_and_its_agreement(tiny_model, tmp_path,
                                                                               shared_engines):
    """The plumbing on CPU (a random tiny judge grades at random): every answer gets a verdict through the teacher
    path, and the rates are recomputed from the examples."""
    import json

    from tests.conftest import run_main

    prompt = tmp_path / "any.md"
    prompt.write_text('---\ncheck: {regex: "\\\\S"}\non_topic: none\njudge_rubric: "any text"\nrules:\n'
                      '  - {id: warm, text: "Sounds warm", judge: "Is the answer warm?"}\n---\nAnswer.\n')
    output = tmp_path / "eval.json"
    result = run_main("evaluate.py", "--model_path", tiny_model, "--prompt_file", prompt, "--test_file",
                      REPO / "example-data" / "general_questions.jsonl", "--max_samples", 6, "--max_tokens", 8,
                      "--latency_requests", 0, "--judge_model", tiny_model, "--output_file", output,
                      "--max-model-len", 2048)
    results = json.loads(output.read_text())
    examples = results["examples"]
    assert results["judge_model"] == str(tiny_model) and len(examples) == 6
    assert all(e["judge"] in (True, False, None) for e in examples)
    judged = [e for e in examples if e["judge"] is not None]
    assert results["n_judged"] == len(judged) and results["judge_unparsed"] == 6 - len(judged)
    if judged:
        assert results["judged_pass_rate"] == pytest.approx(sum(e["judge"] for e in judged) / len(judged))
        assert results["agreement_with_strict"] == pytest.approx(
            sum(e["judge"] == e["passed"] for e in judged) / len(judged))
    assert "judged pass rate" in result.stdout
    # the judged rule: a verdict per answer from its own rubric, scored with the verifiable check
    warm = [e["rules"]["warm"] for e in examples]
    assert all(verdict in (True, False, None) for verdict in warm) and set(examples[0]["rules"]) == {"check", "warm"}
    scored = any(verdict is not None for verdict in warm)  # a rule the judge never parsed is left out
    if scored:
        assert results["rules"]["warm"]["n"] == sum(verdict is not None for verdict in warm)
        assert results["rules"]["warm"]["n_passed"] == sum(verdict is True for verdict in warm)
    assert results["n_all_rules_passed"] == sum(e["rules"]["check"] and (e["rules"]["warm"] is True or not scored)
                                                for e in examples)
