"""The task prompt file, the teacher's and student's messages, the example data and the train/held-out split."""

import json
import random
from collections import Counter, defaultdict

import pytest

from distill.prompts import DEFAULT_PROMPT, StudentSide, load_prompt
from distill.render import chat_text, student_messages, takes_system_role, teacher_messages, teacher_text
from distill.splits import HELDOUT_FRACTION, select, split_of
from tests.conftest import EXAMPLE_DATA, REPO

LABELS = ("ar", "de", "el", "en", "es", "fr", "hi", "ru", "tr", "ur", "vi", "zh", "ot")
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def prompt():
    return load_prompt()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2)


# ---- the prompt file -----------------------------------------------------------------------------------------


def test_prompt_file_loads(prompt):
    assert DEFAULT_PROMPT.is_file()
    assert prompt.labels == LABELS
    assert prompt.answer_format == "Final Answer: {label}"
    assert "{query}" in prompt.query_template
    assert not prompt.text.startswith("---") and "labels:" not in prompt.text.splitlines()[0]
    assert prompt.text.startswith("# Language Identification")
    assert len(prompt.sha256) == 64


def test_prompt_mentions_every_label(prompt):
    for label in LABELS:
        assert f"{label} " in prompt.text or f"→ {label}" in prompt.text, label


@pytest.mark.parametrize("line, label", [
    ("Final Answer: fr", "fr"), ("final answer:   ZH  ", "ZH"), ("  Final Answer:ot", "ot"),
    ("Final Answer: fr extra", None), ("The Final Answer: fr", None), ("Final Answer:", None),
])
def test_answer_regex(prompt, line, label):
    match = prompt.answer_regex.match(line)
    assert (match.group("label") if match else None) == label


def test_prompt_body_token_count(prompt, smollm2_tokenizer):
    tokens = len(smollm2_tokenizer(prompt.text, add_special_tokens=False).input_ids)
    assert 1_200 <= tokens <= 2_500, tokens


def test_load_prompt_rejects_bad_files(tmp_path):
    cases = {
        "no_front_matter.md": "# Just a prompt\n",
        "missing_key.md": "---\nlabels: [a, b]\nanswer_format: 'A: {label}'\n---\nbody\n",
        "no_placeholder.md": "---\nlabels: [a, b]\nanswer_format: 'A: x'\nquery_template: '{query}'\n---\nbody\n",
        "dup_labels.md": "---\nlabels: [a, A]\nanswer_format: 'A: {label}'\nquery_template: '{query}'\n---\nbody\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=str(path)):
            load_prompt(path)


def test_prompt_file_with_crlf_loads(tmp_path, prompt):
    path = tmp_path / "crlf.md"
    path.write_bytes(DEFAULT_PROMPT.read_bytes().replace(b"\n", b"\r\n"))
    loaded = load_prompt(path)
    assert loaded.labels == prompt.labels and loaded.text == prompt.text


def test_prompt_file_with_bom_loads(tmp_path, prompt):
    path = tmp_path / "bom.md"
    path.write_bytes(b"\xef\xbb\xbf" + DEFAULT_PROMPT.read_bytes())
    assert load_prompt(path).labels == prompt.labels


def test_other_task_prompt_needs_no_code(tmp_path):
    path = tmp_path / "sentiment.md"
    path.write_text("---\nlabels: [Pos, Neg]\nanswer_format: 'Label = {label}'\nquery_template: 'Review: {query}'\n"
                    "---\nClassify the review.\n", encoding="utf-8")
    prompt = load_prompt(path)
    assert prompt.labels == ("pos", "neg")
    assert prompt.answer_regex.match("label =  NEG").group("label") == "NEG"
    assert teacher_messages(prompt, "great")[1]["content"] == "Review: great"


# ---- messages ------------------------------------------------------------------------------------------------


def test_teacher_messages_prompt_first_query_last(prompt):
    query = "Die Bäckerei an der Ecke öffnet um sechs."
    messages = teacher_messages(prompt, query)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == prompt.text
    assert query not in messages[0]["content"]
    assert messages[-1]["content"] == prompt.query_template.format(query=query)
    assert messages[-1]["content"].rstrip().endswith(query + "\n>>>")


def test_query_with_braces_is_not_a_format_string(prompt):
    query = "if (x) { return {label}; } // {query} {0}"
    assert query in teacher_messages(prompt, query)[-1]["content"]


def test_student_messages_are_the_bare_query():
    assert student_messages("hola") == [{"role": "user", "content": "hola"}]


def test_teacher_render_shares_the_prompt_as_a_token_prefix(prompt, smollm2_tokenizer):
    # The prompt must be a common prefix of every teacher input, so vLLM's prefix cache computes it once.
    tok = smollm2_tokenizer
    texts = [teacher_text(tok, prompt, q) for q in ("Bonjour à tous", "Привет, как дела?")]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    common = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
    prompt_tokens = len(tok(prompt.text, add_special_tokens=False).input_ids)
    assert common >= prompt_tokens - 2
    assert texts[0].index(prompt.text) < texts[0].index("Bonjour à tous")


def test_student_render_has_no_prompt(prompt, smollm2_tokenizer):
    text = chat_text(smollm2_tokenizer, student_messages("Bonjour à tous"), answer_next=True)
    assert "Bonjour à tous" in text and "Language Identification" not in text
    assert text.rstrip().endswith("assistant")


# ---- conversations and the student's own side ------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "The user is a beginner cook."},
                {"role": "user", "content": "Can I freeze rice?"},
                {"role": "assistant", "content": "In short: yes."},
                {"role": "user", "content": "How long does it keep?"}]
STUDENT_SIDE = '---\ncheck: {regex: "^In short: "}\nquery_template: "Question: {query}"\n' \
               'student_system_prompt: "Answer briefly."\nstudent_template: "Q: {query}\\nA:"\n' \
               'example_turns: [{user: "Why is snow white?", assistant: "In short: it scatters light."}]\n' \
               '---\nThe long rules.\n'


def test_the_teacher_reads_prompt_and_row_system_then_examples_then_the_conversation(tmp_path):
    (tmp_path / "p.md").write_text(STUDENT_SIDE)
    prompt = load_prompt(tmp_path / "p.md")
    assert teacher_messages(prompt, CONVERSATION) == [
        {"role": "system", "content": "The long rules.\n\nThe user is a beginner cook."},
        {"role": "user", "content": "Question: Why is snow white?"},
        {"role": "assistant", "content": "In short: it scatters light."},
        {"role": "user", "content": "Can I freeze rice?"},  # earlier user turns stay as written: context
        {"role": "assistant", "content": "In short: yes."},
        {"role": "user", "content": "Question: How long does it keep?"}]
    # a text query is the conversation [user: text]
    assert teacher_messages(prompt, "Why?") == teacher_messages(prompt, [{"role": "user", "content": "Why?"}])


def test_the_student_keeps_its_own_side_and_the_conversation_never_the_prompt(tmp_path):
    (tmp_path / "p.md").write_text(STUDENT_SIDE)
    prompt = load_prompt(tmp_path / "p.md")
    assert prompt.student == StudentSide("Answer briefly.", "Q: {query}\nA:")
    assert student_messages(CONVERSATION, prompt.student) == [
        {"role": "system", "content": "Answer briefly.\n\nThe user is a beginner cook."},
        {"role": "user", "content": "Can I freeze rice?"},
        {"role": "assistant", "content": "In short: yes."},
        {"role": "user", "content": "Q: How long does it keep?\nA:"}]
    assert student_messages("Why?", prompt.student) == [{"role": "system", "content": "Answer briefly."},
                                                        {"role": "user", "content": "Q: Why?\nA:"}]
    assert student_messages(CONVERSATION)[0] == CONVERSATION[0]  # no side of its own: the row's system turn alone
    assert load_prompt().student == StudentSide()  # a prompt file without one: the bare query, as before


@pytest.mark.parametrize("line, message", [("student_template: \"Q: A:\"", "student_template must"),
                                           ("student_template: \"{query} {other}\"", "student_template must"),
                                           ("student_template: \"Answer as JSON {{}}:\"", "student_template must"),
                                           ("student_template: \"{query} {}\"", "student_template must"),
                                           ("student_system_prompt: \"  \"", "student_system_prompt must")])
def test_a_bad_student_side_names_the_file(tmp_path, line, message):
    path = tmp_path / "p.md"
    path.write_text(f"---\ncheck: {{regex: \"x\"}}\n{line}\n---\nRules.\n")
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        load_prompt(path)


@pytest.mark.parametrize("system_branch", ["{{- raise_exception('System role not supported') }}", ""])
def test_a_template_without_a_system_role_gets_the_system_turn_in_the_first_user_turn(smollm2_tokenizer,
                                                                                      system_branch):
    """Gemma-style templates raise on a system turn; others drop it silently. Either way the system text must reach
    the model, at the head of the first user turn."""
    import copy

    plain = smollm2_tokenizer
    tokenizer = copy.deepcopy(plain)
    tokenizer.chat_template = ("{%- for m in messages %}{%- if m.role == 'system' %}" + system_branch + "{%- else %}"
                               "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
                               "{%- endfor %}"
                               "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    assert takes_system_role(plain) and not takes_system_role(tokenizer)
    text = chat_text(tokenizer, student_messages(CONVERSATION, StudentSide("Answer briefly.")), answer_next=True)
    assert text.startswith("<|im_start|>user\nAnswer briefly.\n\nThe user is a beginner cook.\n\nCan I freeze rice?")
    assert text.count("<|im_start|>user") == 2 and "system" not in text


# ---- example data --------------------------------------------------------------------------------------------


def test_example_data_size_and_ids(example_rows, prompt):
    assert len(example_rows) >= 600
    ids = [row["id"] for row in example_rows]
    assert len(ids) == len(set(ids))
    assert all(row["text"].strip() for row in example_rows)
    assert {row["label"] for row in example_rows} <= set(prompt.labels)


def test_every_label_is_frequent(example_rows, prompt):
    counts = Counter(row["label"] for row in example_rows)
    assert set(counts) == set(prompt.labels)
    assert min(counts.values()) >= 40, counts


def test_translation_groups(example_rows):
    groups = defaultdict(list)
    for row in example_rows:
        if row.get("kind") == "translation":
            groups[row["group"]].append(row)
    complete = 0
    for rows in groups.values():
        labelled = {row["label"] for row in rows if row["label"] != "ot"}
        other_languages = {row["language"] for row in rows if row["label"] == "ot"}
        if labelled == set(LABELS) - {"ot"} and len(other_languages) >= 3:
            complete += 1
    assert complete >= 40, complete


def test_example_data_file_is_clean_jsonl():
    raw = EXAMPLE_DATA.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf") and b"\r" not in raw and raw.endswith(b"\n")
    for line in raw.decode("utf-8").split("\n")[:-1]:
        assert isinstance(json.loads(line), dict)


# ---- the split -----------------------------------------------------------------------------------------------


def test_split_is_reproducible_and_keeps_groups_together(example_rows):
    first = [row["id"] for row in select(example_rows, "heldout")]
    assert first == [row["id"] for row in select(example_rows, "heldout")]
    train, heldout = select(example_rows, "train"), select(example_rows, "heldout")
    assert len(train) + len(heldout) == len(example_rows)
    assert not {row["group"] for row in train} & {row["group"] for row in heldout}
    assert 0.1 <= len(heldout) / len(example_rows) <= 0.35
    assert select(example_rows, "all") == example_rows


def test_split_is_stable_under_shuffling_and_removal(example_rows):
    sides = {row["id"]: split_of(row) for row in example_rows}
    shuffled = list(example_rows)
    random.Random(1).shuffle(shuffled)
    assert {row["id"] for row in select(shuffled, "heldout")} == {i for i, s in sides.items() if s == "heldout"}
    kept = shuffled[: len(shuffled) // 3]
    assert all(split_of(row) == sides[row["id"]] for row in kept)
    assert {row["id"] for row in select(kept, "train")} == {r["id"] for r in kept if sides[r["id"]] == "train"}


def test_split_uses_id_without_group_and_depends_on_seed(example_rows):
    assert split_of({"id": "a", "group": None}) == split_of({"id": "a"})
    sides = [split_of(row) for row in example_rows]
    other_seed = [split_of(row, seed=1) for row in example_rows]
    assert sides != other_seed
    assert all(split_of(row, heldout_fraction=0.0) == "train" for row in example_rows[:50])
    assert all(split_of(row, heldout_fraction=1.0) == "heldout" for row in example_rows[:50])
    assert 0 < HELDOUT_FRACTION < 0.5


def test_select_rejects_unknown_split(example_rows):
    with pytest.raises(ValueError):
        select(example_rows, "test")


def test_example_conversations_for_the_behaviour_task():
    from distill.records import read_queries

    queries = read_queries(str(REPO / "example-data" / "in_short_conversations.jsonl"))
    rows = queries.rows
    assert queries.kind == "conversations" and len(rows) == 60 and queries.duplicates == queries.empty == 0
    assert len({row["id"] for row in rows}) == 60 and len(Counter(row["group"] for row in rows)) == 10
    assert all(2 <= len(row["messages"]) <= 4 for row in rows)
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert any(turn["role"] == "assistant" for row in rows for turn in row["messages"])  # earlier answers as context
    # the default split holds out whole groups: 2 of the 10 (12 conversations), the rest train
    assert Counter(split_of(row) for row in rows) == {"train": 48, "heldout": 12}
