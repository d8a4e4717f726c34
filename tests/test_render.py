"""One row rendered through every stage gives the same token ids per side (distill/render.py is the one place a model
input is rendered): the student's input in stage 2 (distill.sft_setup.prepare), stage 2b (what TRL samples from),
stage 3 (evaluate.render_prompts) and the fingerprint's probes; the teacher's in stage 1 (create_data's Teacher) and
stage 3 --with_prompt, and in stage 2b the same input in the final-answer state of its own template. For each kind of
Qwen3 chat template the recipes use: Instruct-2507, Thinking-2507 and hybrid."""

import json
from types import SimpleNamespace

import pytest

from tests.tiny_model import FINAL_ANSWER_TAIL, with_template

CONVERSATION = [{"role": "system", "content": "The user is a beginner cook."},
                {"role": "user", "content": "Can I freeze rice?"},
                {"role": "assistant", "content": "In short: yes, within a day of cooking it."},
                {"role": "user", "content": "How long does it keep in the freezer?"}]
ANSWER = "In short: about a month."
PROMPT_FILE = ('---\ncheck: {regex: "^In short: "}\nquery_template: "Question: {query}"\n'
               'student_system_prompt: "Answer briefly."\nstudent_template: "Q: {query}\\nA:"\n'
               'example_turns: [{user: "Why is snow white?", assistant: "In short: ice scatters every colour."}]\n'
               '---\nAnswer every question in one short sentence that starts with In short.\n')


@pytest.fixture(params=["instruct-2507", "thinking-2507", "hybrid"])
def setting(request, tiny_model, tmp_path_factory):
    """A tiny model with the template kind's chat template, the prompt file and a stage-1 file of one row."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = with_template(tiny_model, kind, root / "model")
    (root / "p.md").write_text(PROMPT_FILE)
    stage1 = root / "teacher.jsonl"
    stage1.write_text(json.dumps({"id": "rice", "group": "kitchen", "messages": CONVERSATION + [
        {"role": "assistant", "content": ANSWER}], "teacher": {"answer_chars": len(ANSWER)}}) + "\n")
    from distill.prompts import load_prompt

    prompt = load_prompt(root / "p.md")
    # stage 1's run record holds the student side stage 2 trains with
    (root / "teacher.run.json").write_text(json.dumps({"student": prompt.student.to_dict()}))
    return SimpleNamespace(kind=kind, model=model, prompt=prompt, prompt_file=root / "p.md", stage1=stage1, root=root)


def stage2_student_ids(s) -> list[int]:
    import train_sft_trl
    from distill import sft_setup

    args = train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--model_name_or_path", str(s.model),
                                     "--dataset_name", str(s.stage1), "--output_dir", str(s.root / "sft"),
                                     "--report_to", "none", "--heldout_fraction", "0"])
    example = sft_setup.prepare(*args).examples[0]
    return example["input_ids"][: example["completion_mask"].index(1)]


def stage2b(s):
    """Stage 2b's trainer as train_opd_trl.main builds it: (the student's ids as TRL samples from them, the
    teacher's ids as it scores, its tokenizer)."""
    import train_opd_trl
    from distill import opd_setup
    from distill.onpolicy import TeacherInputs

    script_args, training_args, model_args = train_opd_trl.parse_args([
        "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", str(s.model), "--prompt_file", str(s.prompt_file),
        "--dataset_name", str(s.stage1), "--output_dir", str(s.root / "opd"), "--report_to", "none",
        "--heldout_fraction", "0"])
    queries, _ = opd_setup.training_queries(script_args)
    tokenizers = opd_setup.check_teacher(script_args, training_args, model_args)
    trainer = opd_setup.build_trainer(script_args, training_args, model_args, None, s.prompt, queries.rows,
                                      tokenizers)
    row = trainer.train_dataset[0]
    (student,), _, _ = trainer._tokenize_prompts([row["prompt"]])
    teacher = TeacherInputs.build(trainer.teacher_tokenizer, s.prompt, [row["query"]], trainer.teacher_prefix)
    return student, teacher.prefix + teacher.suffixes[0]


def stage3(s, with_prompt: bool) -> list[int]:
    import evaluate

    args = SimpleNamespace(tokenizer=None, model_path=str(s.model), trust_remote_code=False, with_prompt=with_prompt)
    rows = [{"id": "rice", "text": CONVERSATION[-1]["content"], "messages": CONVERSATION}]
    return evaluate.render_prompts(args, s.prompt, rows)[1][0]


def test_one_row_renders_to_the_same_ids_in_every_stage(setting):
    from transformers import AutoTokenizer

    from distill import fingerprint
    from distill.teacher import Teacher

    s = setting
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    student_2b, teacher_2b = stage2b(s)
    probe = fingerprint.probes(tokenizer, [("rice", CONVERSATION, ANSWER)], s.prompt.student)[0]
    student = {"stage 2": stage2_student_ids(s), "stage 2b": student_2b, "stage 3": stage3(s, with_prompt=False),
               "fingerprint": probe["input_ids"][: probe["answer_start"]]}
    assert len({tuple(ids) for ids in student.values()}) == 1, {k: tokenizer.decode(v) for k, v in student.items()}
    student_text = tokenizer.decode(student["stage 2"])
    assert "Answer briefly." in student_text and "Q: How long does it keep in the freezer?\nA:" in student_text
    assert s.prompt.text not in student_text and "Why is snow white?" not in student_text  # never the prompt
    assert student_text.endswith(FINAL_ANSWER_TAIL[s.kind])

    teacher_1 = Teacher(tokenizer, s.prompt, 4096).token_ids(CONVERSATION)
    assert stage3(s, with_prompt=True) == teacher_1  # evaluate --with_prompt generates as stage 1 does
    generating, scoring = tokenizer.decode(teacher_1), tokenizer.decode(teacher_2b)
    assert s.prompt.text in scoring and "Why is snow white?" in scoring and "Question: How long" in scoring
    assert scoring.endswith(FINAL_ANSWER_TAIL[s.kind])  # 2b scores a final answer, in the teacher's own template
    # ...and is stage 1's input up to the generation prompt, which only the final-answer state changes
    header = "<|im_start|>assistant\n"
    assert scoring[: scoring.rindex(header)] == generating[: generating.rindex(header)]


def test_template_kinds_and_the_rendering_record(setting):
    from transformers import AutoTokenizer

    from distill.render import rendering_record, template_kind

    tokenizer = AutoTokenizer.from_pretrained(setting.model)
    expected = {"instruct-2507": "no_think", "thinking-2507": "thinking", "hybrid": "hybrid"}[setting.kind]
    assert template_kind(tokenizer) == expected
    record = rendering_record(setting.prompt, CONVERSATION, tokenizer, tokenizer)
    assert record["teacher"]["holds_prompt"] and not record["student"]["holds_prompt"]
    for side in record.values():
        assert side["template"] == expected and side["state"].startswith("final answer")
        assert side["input_ends_with"].endswith(FINAL_ANSWER_TAIL[setting.kind])


def test_whether_a_template_takes_a_system_role_is_asked_once_per_template(tiny_model):
    from transformers import AutoTokenizer

    from distill.render import takes_system_role

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    calls = []
    original = tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tokenizer.apply_chat_template = counting
    assert all(takes_system_role(tokenizer) for _ in range(5)) and len(calls) == 1
    tokenizer.chat_template = "{%- for m in messages %}{%- if m.role != 'system' %}{{ m.content }}{%- endif %}" \
                              "{%- endfor %}"
    assert not takes_system_role(tokenizer) and len(calls) == 2  # a new template is asked again
