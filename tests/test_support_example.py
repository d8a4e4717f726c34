"""The GPU recipe's realistic example: prompts/support_assistant.md (a support assistant's system prompt with rules)
and its 100 customer messages in example-data/support_messages.jsonl and support_conversations.jsonl."""

import re
from collections import Counter

import pytest
import yaml

from distill import checks
from distill.prompts import load_prompt
from distill.records import read_queries
from distill.splits import select, split_of
from tests.conftest import REPO

PROMPT = REPO / "prompts" / "support_assistant.md"
MESSAGES = REPO / "example-data" / "support_messages.jsonl"
CONVERSATIONS = REPO / "example-data" / "support_conversations.jsonl"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
VERIFY_KINDS = {"regex", "starts_with", "ends_with", "max_words", "min_words", "max_sentences", "forbidden_words",
                "required_words", "forbidden_chars", "lowercase", "language", "json", "bullets", "ifeval"}
SIGN_OFF = "Kind regards,\nTidewell Support"


@pytest.fixture(scope="module")
def prompt():
    return load_prompt(PROMPT)


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    front_matter = re.match(r"^---\n(.*?)\n---\n", PROMPT.read_text(encoding="utf-8"), re.DOTALL).group(1)
    return yaml.safe_load(front_matter)["rules"]


@pytest.fixture(scope="module")
def queries():
    return read_queries(str(MESSAGES)), read_queries(str(CONVERSATIONS))


def test_the_support_prompt_is_a_generative_task_with_example_turns(prompt):
    assert prompt.is_generative and prompt.check == {"regex": "^Hi there,"}
    assert prompt.judge_rubric and prompt.student.system_prompt is None  # bare student: stage 1 outputs concatenate
    assert len(prompt.example_turns) >= 5
    for _, reply in prompt.example_turns:
        assert checks.passes(prompt.check, reply) and reply.endswith(SIGN_OFF)


def test_the_support_prompt_is_at_least_1500_tokens(prompt):
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(SMOLLM2)(prompt.text).input_ids)
    assert tokens >= 1500, f"{PROMPT.name}: {tokens} tokens of prompt text"


def test_the_support_prompt_declares_verifiable_and_judged_rules(rules):
    ids = [rule["id"] for rule in rules]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[a-z0-9_]+", rule_id) for rule_id in ids)
    assert all(isinstance(rule["text"], str) and "\n" not in rule["text"] for rule in rules)
    assert all(("verify" in rule) != ("judge" in rule) for rule in rules)
    verified = [rule["verify"] for rule in rules if "verify" in rule]
    assert len(verified) >= 8 and sum("judge" in rule for rule in rules) >= 2
    kinds = Counter(kind for verify in verified for kind in verify)
    assert all(len(verify) == 1 for verify in verified) and set(kinds) <= VERIFY_KINDS
    assert len(kinds) >= 8, f"a variety of verifier kinds, not {dict(kinds)}"


def test_the_prose_states_each_verified_rule(prompt, rules):
    """A rule the teacher is never told is a rule it cannot follow: each limit, literal and forbidden item is in the
    system prompt's own text."""
    prose = prompt.text
    for rule in rules:
        (kind, value), = rule.get("verify", {"judge": None}).items()
        if kind in ("max_words", "min_words", "max_sentences"):
            assert re.search(rf"\b{value}\b", prose), rule["id"]
        elif kind == "ends_with":
            assert all(line in prose for line in value.splitlines()), rule["id"]
        elif kind == "forbidden_words":
            assert re.search(rf"\b{value[0]}\b", prose), rule["id"]
        elif kind == "bullets":
            assert re.search(rf"more than {value['max']} such lines", prose), rule["id"]
        elif kind == "language":
            assert "English only" in prose, rule["id"]


def test_the_example_replies_keep_the_regex_rules(prompt, rules, queries):
    """The replies the teacher imitates (example turns, and the earlier assistant turns of the conversations) keep
    the reply's frame: they pass the check and every regex rule."""
    regexes = [rule["verify"]["regex"] for rule in rules if "regex" in rule.get("verify", {})]
    replies = [reply for _, reply in prompt.example_turns] + [
        turn["content"] for row in queries[1].rows for turn in row["messages"] if turn["role"] == "assistant"]
    assert regexes and len(replies) > 20
    for reply in replies:
        assert all(checks.passes({"regex": pattern}, reply) for pattern in [prompt.check["regex"], *regexes]), reply


def test_the_support_messages_are_100_queries_split_by_topic(queries):
    messages, conversations = queries
    assert messages.kind == "text" and conversations.kind == "conversations"
    assert len(messages.rows) == 75 and len(conversations.rows) == 25
    assert messages.duplicates == messages.empty == conversations.duplicates == conversations.empty == 0
    rows = messages.rows + conversations.rows
    assert len({row["id"] for row in rows}) == 100
    assert 10 <= len({row["group"] for row in rows}) <= 15
    assert sum(any(turn["role"] == "assistant" for turn in row["messages"]) for row in conversations.rows) >= 20
    assert all(row["messages"][-1]["role"] == "user" for row in conversations.rows)
    # Whole topics are held out (the default split, 0.2 of the groups), from both files.
    train, heldout = select(rows, "train"), select(rows, "heldout")
    heldout_groups = {row["group"] for row in heldout}
    assert heldout_groups == {"plans", "orders_shipping", "alerts", "complaints"}
    assert not heldout_groups & {row["group"] for row in train}
    assert Counter(split_of(row) for row in rows) == {"train": 69, "heldout": 31}
    assert {split_of(row) for row in messages.rows} == {split_of(row) for row in conversations.rows} == {
        "train", "heldout"}
