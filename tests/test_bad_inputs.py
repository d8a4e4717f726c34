"""Bad inputs as a new user meets them (issue 30): every case runs a stage in this process (run_main) and checks the
exit status, that the message names the flag or the `file:line` (`file: row N`), that there is no traceback, and that
nothing was written or the earlier output is unchanged. docs/troubleshooting.md lists the refusals.

No case loads a model it does not need: the ones refused before a model loads load none, stage 1's runs that must
answer use the tiny model's tokenizer and a stand-in engine behind the real stream (distill.teacher.stream, so the rows
are written as a real run writes them), and only the two runs that train nothing train the tiny model (marked slow,
a second each).
"""

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill import stage1
from distill.records import output_paths
from distill.splits import split_of
from tests.conftest import EXAMPLE_DATA, run_main, write_teacher_file
from tests.test_teacher_stream import ScramblingEngine

MAX_LEN = ["--max-model-len", "4096"]  # the tiny model's context: the long prompt is ~3.7k of its tokens
IN_SHORT = "prompts/in_short.md"


# ---- helpers --------------------------------------------------------------------------------------------------


def refused(result, *named: str, code: int = 1) -> str:
    """The run exited `code` with a message naming each of `named`, and no traceback; returns its stderr."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for name in named:
        assert str(name) in result.stderr, f"{name!r} not in:\n{result.stderr[-3000:]}"
    return result.stderr


def files_under(*places: Path) -> dict:
    """Every file under `places` with its bytes: what a refusal must leave as it was."""
    found = {}
    for place in places:
        paths = [place] if place.is_file() else sorted(place.rglob("*")) if place.exists() else []
        found.update({path: path.read_bytes() for path in paths if path.is_file()})
    return found


def stand_in_answers(args, teacher, todo, selected, settings, files):
    """stage1.answer_queries with a stand-in engine that answers every query 'Final Answer: en' at the next step."""
    from vllm import SamplingParams

    from distill.teacher import StreamStats, stream

    stats = StreamStats()
    engine = ScramblingEngine(lambda query, attempt: "Final Answer: en", max_steps=1)  # done at the next step
    with stage1.answer_writer(files, stats, selected, selected - len(todo)) as write:
        for outcome in stream(engine, teacher, todo, SamplingParams(max_tokens=8), stats=stats):
            write(stage1.answer_records(outcome, args, teacher))
    return stats.summary(), None


@pytest.fixture(scope="module")
def stand_in_engine():
    patch = pytest.MonkeyPatch()
    patch.setattr(stage1, "answer_queries", stand_in_answers)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def read_only_dir(work) -> Path:
    """A directory no file can be created in: chmod 555, or for root (who ignores that) a sysfs directory."""
    for place in (work / "read-only", Path("/sys/fs")):
        if place.parent == work:
            place.mkdir(exist_ok=True)
            place.chmod(0o555)
        try:
            tempfile.TemporaryFile(dir=place).close()
        except OSError:
            return place
    pytest.skip("no read-only directory on this machine (root on a writable filesystem)")


# A model path that does not exist: a refusal that names its input, not this, came before any model loaded.
NO_MODEL = "no-such-model"


def stage1_run(model, input_file, output, *extra, prompt=None):
    return run_main("create_data.py", "--input_file", input_file, "--output_file", output, "--model_name",
                    model, *(["--prompt_file", prompt] if prompt else []), *MAX_LEN, *extra, check=False)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# ---- stage 1: the input file, the prompt file, the flags, refused before any model loads --------------------------


BAD_INPUTS = {  # file name, content, what the message must name besides the file
    "malformed_json": ("in.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c\n', ":3: malformed JSON"),
    "no_text_field": ("in.jsonl", b'{"text": "a"}\n{"body": "b"}\n', ":2: no 'text' field"),
    "invalid_utf8": ("in.jsonl", b'{"text": "a"}\n{"text": "\xff\xfe"}\n', ":2: invalid UTF-8"),
    "csv_without_text": ("in.csv", b"body,label\nhello,en\n", ":2: no 'text' field"),
    "conversation_ends_in_assistant": ("in.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}).encode() + b"\n",
        ":1: the conversation ends in an assistant turn"),
    "duplicate_ids": ("in.jsonl", b'{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', ":2: id 'x' already used"),
    "empty_file": ("in.jsonl", b"", ": no queries (the file is empty)"),
    "blank_lines_only": ("in.txt", b"\n  \n\n", ": no queries (all 3 of its lines are blank)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_file_is_named_at_its_line(tmp_path, case):
    name, content, message = BAD_INPUTS[case]
    source = tmp_path / name
    source.write_bytes(content)
    result = stage1_run(NO_MODEL, source, tmp_path / "out" / "teacher.jsonl")
    refused(result, f"{source}{message}")
    assert not (tmp_path / "out").exists()


PROMPTS = {  # front matter and body, what the message must name after the file
    "broken_yaml": ('---\nlabels: [a, b\nanswer_format: "Final Answer: {label}"\nquery_template: "{query}"\n---\n'
                    'Classify.\n', ":3: not valid YAML"),  # PyYAML's line 2 of the front matter is the file's 3
    "regex_that_does_not_compile": ('---\ncheck: {regex: "(unclosed"}\n---\nAnswer.\n',
                                    ":2: regex '(unclosed' does not compile"),
}


@pytest.mark.parametrize("case", PROMPTS)
def test_a_bad_prompt_file_is_named_at_its_line(tmp_path, case):
    text, message = PROMPTS[case]
    prompt = tmp_path / "prompt.md"
    prompt.write_text(text, encoding="utf-8")
    refused(stage1_run(NO_MODEL, EXAMPLE_DATA, tmp_path / "out" / "teacher.jsonl", prompt=prompt),
            f"{prompt}{message}")
    assert not (tmp_path / "out").exists()


def test_a_missing_prompt_file_names_the_flag(tmp_path):
    refused(stage1_run(NO_MODEL, EXAMPLE_DATA, tmp_path / "out" / "teacher.jsonl", prompt=tmp_path / "nope.md"),
            f"--prompt_file {tmp_path / 'nope.md'}: no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["create_data.py", "evaluate.py"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_samples_must_be_positive(tiny_model, tmp_path, script, value):
    """--max_samples -1 once dropped the last row and 0 blamed the split."""
    model = ["--model_name" if script == "create_data.py" else "--model_path", tiny_model]
    result = run_main(script, *model, "--output_file", tmp_path / "out" / "x.json", "--max_samples", value, check=False)
    refused(result, "--max-samples", "must be 1 or more", code=2)
    assert not (tmp_path / "out").exists()


def test_a_read_only_output_dir_is_refused_before_the_model(tiny_model, tmp_path, read_only_dir):
    output = read_only_dir / "run" / "teacher.jsonl"
    refused(stage1_run(NO_MODEL, EXAMPLE_DATA, output), f"--output_file {output}: cannot write in")
    refused(run_main("evaluate.py", "--model_path", tiny_model, "--with_prompt", "--output_file", output, check=False),
            f"--output_file {output}: cannot write in")
    refused(run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_model,
                     "--output_dir", read_only_dir / "adapter", "--report_to", "none", check=False),
            f"--output_dir {read_only_dir / 'adapter'}: cannot write in")
    assert not (read_only_dir / "run").exists() and not (read_only_dir / "adapter").exists()


# ---- stage 1: runs that resume, refuse a changed recipe or input, and write what they can ----------------------


@pytest.fixture(scope="module")
def first_run(tiny_model, work, stand_in_engine):
    """A finished stage-1 run into a directory that did not exist, on 6 queries with ids, one a 1 MB line."""
    source = jsonl(work / "queries.jsonl", [
        {"id": "q1", "text": "Bonjour, comment allez-vous ?"}, {"id": "q2", "text": "Wie spät ist es?"},
        {"id": "big", "text": "Ceci est une phrase assez longue. " * 30_000},  # ~1 MB: more than the context
        {"id": "q3", "text": "¿Dónde está la estación?"}, {"id": "q4", "text": "Merhaba dünya"},
        {"id": "q5", "text": "Привет, как дела?"}])
    output = work / "new" / "dir" / "teacher.jsonl"
    assert not output.parent.parent.exists()
    command = ["create_data.py", "--input_file", source, "--output_file", output, "--model_name", tiny_model, *MAX_LEN]
    return SimpleNamespace(source=source, output=output, command=command, result=run_main(*command, check=False))


def test_an_output_dir_that_does_not_exist_is_created_and_a_1mb_line_rejected(first_run):
    assert first_run.result.returncode == 0, first_run.result.stderr[-3000:]
    out, rejects, record = output_paths(str(first_run.output))
    written, rejected = (list(map(json.loads, path.read_text().splitlines())) for path in (out, rejects))
    assert sorted(row["id"] for row in written) == ["q1", "q2", "q3", "q4", "q5"]
    assert [(row["id"], row["reason"]) for row in rejected] == [("big", "too_long")]
    assert all(row["teacher"]["input_sha256"] for row in written) and rejected[0]["input_sha256"]
    assert json.loads(record.read_text())["status"] == "finished"


def test_the_same_command_again_resumes_and_writes_nothing_twice(first_run):
    out, rejects, _ = output_paths(str(first_run.output))
    before = files_under(out, rejects)
    result = run_main(*first_run.command)
    assert "6 done by an earlier run, 0 to go" in result.stdout
    assert files_under(out, rejects) == before


def test_a_changed_temperature_over_an_existing_output_is_refused(first_run):
    before = files_under(first_run.output.parent)
    refused(run_main(*first_run.command, "--temperature", "0.7", check=False), "temperature", "--overwrite",
            first_run.output)
    assert files_under(first_run.output.parent) == before


def test_a_query_edited_under_its_id_is_refused_on_resume(first_run, work):
    """Resume once trusted ids: an edited query kept its old answer. Now the rendered input is compared."""
    source = jsonl(work / "edited.jsonl", [
        {**row, "text": "Good morning, how are you?"} if row["id"] == "q3" else row
        for row in map(json.loads, first_run.source.read_text().splitlines())])
    copy = work / "edited-run"
    shutil.copytree(first_run.output.parent, copy)
    output = copy / first_run.output.name
    command = [str(part) for part in first_run.command]
    command[command.index(str(first_run.source))], command[command.index(str(first_run.output))] = source, output
    before = files_under(copy)
    stderr = refused(run_main(*command, check=False), f"{output}:", "(id q3)", "--overwrite")
    assert "1 finished rows" in stderr
    assert files_under(copy) == before

    run_main(*command, "--overwrite")
    rows = {row["id"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert rows["q3"]["messages"][0]["content"] == "Good morning, how are you?"


def test_rows_written_before_input_hashes_resume_with_a_note(first_run, work):
    copy = work / "legacy-run"
    shutil.copytree(first_run.output.parent, copy)
    out, rejects, _ = output_paths(str(copy / first_run.output.name))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        del row["teacher"]["input_sha256"]
    jsonl(out, rows)
    command = [str(part) for part in first_run.command]
    command[command.index(str(first_run.output))] = str(copy / first_run.output.name)
    result = run_main(*command)
    assert "5 finished rows carry no input hash" in result.stdout
    assert "6 done by an earlier run, 0 to go" in result.stdout


# ---- stage 3: what evaluation scores, refused before the model loads ------------------------------------------


@pytest.fixture(scope="module")
def gold3(work) -> Path:
    return jsonl(work / "gold3.jsonl", [{"id": "a", "text": "Bonjour tout le monde", "label": "fr"},
                                        {"id": "b", "text": "Hello world", "label": "en"},
                                        {"id": "c", "text": "Hello again", "label": "English"}])


def evaluate(tiny_model, test_file, work, *extra):
    output = work / "eval-out" / "eval.json"
    result = run_main("evaluate.py", "--model_path", tiny_model, "--with_prompt", "--test_file", test_file, "--split",
                      "all", "--output_file", output, *extra, check=False)
    assert not output.parent.exists()
    return result


def test_a_gold_label_outside_the_label_set_is_refused(tiny_model, work, gold3):
    """It was scored wrong without a word, and crashed the wandb confusion matrix after generation."""
    refused(evaluate(tiny_model, gold3, work), f"{gold3}:3: gold label 'English'", "--ignore_unknown_labels")
    every_one = jsonl(work / "all_unknown.jsonl", [{"id": "x", "text": "Hallo", "label": "German"}])
    refused(evaluate(tiny_model, every_one, work), f"{every_one}:1: gold label 'German'")
    upper = jsonl(work / "upper.jsonl", [{"id": "x", "text": "Hello", "label": "EN"}])
    refused(evaluate(tiny_model, upper, work), "the label set is lower case: 'en'?")


def test_ignore_unknown_labels_drops_and_counts_them(tiny_model, work, gold3):
    # a teacher file answering only the dropped row: the coverage check, after the drop, counts 2 rows scored
    teacher = jsonl(work / "teacher_c.jsonl", [{"id": "c", "messages": [{"role": "user", "content": "Hello again"},
                                                                     {"role": "assistant", "content": "en"}]}])
    stderr = refused(evaluate(tiny_model, gold3, work, "--ignore_unknown_labels", "--teacher_file", teacher),
                     f"--teacher_file {teacher} answers 0 of the 2 rows scored")
    assert "1 rows dropped, their gold label outside the label set (English: 1); 2 scored" in stderr


@pytest.mark.parametrize("answered, flags, needed", [([], [], 3), (["a", "b"], [], 3),
                                                     (["a"], ["--teacher_min_share", "0.5"], 2)])
def test_a_teacher_file_for_other_rows_is_refused(tiny_model, work, answered, flags, needed):
    """A teacher file that matched none of the ids printed `chrF vs teacher: n/a (n=0)` and exited 0."""
    test_file = jsonl(work / "fr3.jsonl", [{"id": i, "text": f"Bonjour {i}", "label": "fr"} for i in "abc"])
    teacher = jsonl(work / f"teacher-{len(answered)}.jsonl", [
        {"id": i, "messages": [{"role": "user", "content": f"Bonjour {i}"}, {"role": "assistant", "content": "fr"}]}
        for i in answered])
    refused(evaluate(tiny_model, test_file, work, "--teacher_file", teacher, *flags),
            f"--teacher_file {teacher} answers {len(answered)} of the 3 rows scored", f"needs {needed}")


def test_a_teacher_file_counts_its_rejects(work):
    """A teacher's query that broke the answer contract is in the rejects beside its stage-1 file: answered."""
    from distill.input_checks import check_teacher_coverage

    teacher = jsonl(work / "answered.jsonl", [{"id": "a", "messages": [{"role": "assistant", "content": "fr"}]}])
    jsonl(output_paths(str(teacher))[1], [{"id": "b", "text": "Bonjour b", "reason": "no_answer_line"}])
    check_teacher_coverage(str(teacher), [{"id": "a"}, {"id": "b"}], 1.0)


def test_an_empty_test_file_names_the_file(tiny_model, work):
    empty = work / "empty_test.jsonl"
    empty.write_text("")
    refused(evaluate(tiny_model, empty, work), f"{empty}: no queries (the file is empty)")


def test_a_model_path_that_does_not_exist_says_so(tiny_model, work, gold3):
    """It once gave four chained hub tracebacks."""
    result = run_main("evaluate.py", "--model_path", "models/no-such-run", "--test_file", gold3, check=False)
    refused(result, "--model_path models/no-such-run does not exist")


def test_an_adapter_dir_without_its_config_is_named(tiny_model, work, gold3):
    """It was taken for a full model, then 'Unrecognized model'."""
    adapter = work / "adapter-without-config"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    refused(run_main("evaluate.py", "--model_path", adapter, "--test_file", gold3, check=False),
            f"--model_path {adapter}: no adapter_config.json there beside adapter_model.safetensors")
    assert [path.name for path in adapter.iterdir()] == ["adapter_model.safetensors"]


# ---- stage 2 and 2b: the recipe, the flags, the data -----------------------------------------------------------


def train(tiny_model, output_dir, *extra, script="train_sft_trl.py", config="recipes/cpu.yaml"):
    return run_main(script, "--config", config, "--model_name_or_path", tiny_model, "--output_dir", output_dir,
                    "--report_to", "none", *extra, check=False)


@pytest.fixture(scope="module")
def teacher_rows(work, example_rows) -> Path:
    return write_teacher_file(work / "teacher.jsonl", example_rows[:40])


def test_a_recipe_key_typo_names_the_file_the_line_and_the_nearest_flags(tiny_model, work, teacher_rows):
    recipe = work / "typo.yaml"
    recipe.write_text("learning_rate: 1.0e-4\nnum_train_epoch: 2\n")
    refused(train(tiny_model, work / "typo-out", "--dataset_name", teacher_rows, config=recipe),
            f"{recipe}:2: unknown key 'num_train_epoch'", "did you mean num_train_epochs")
    assert not (work / "typo-out").exists()


@pytest.mark.parametrize("script", ["train_sft_trl.py", "train_opd_trl.py"])
def test_lora_rank_0_and_a_missing_student_are_refused_before_the_plan(tiny_model, work, teacher_rows, script):
    config = "recipes/cpu.yaml" if script == "train_sft_trl.py" else "recipes/opd_cpu.yaml"
    out = work / f"refused-{script}"
    refused(train(tiny_model, out, "--dataset_name", teacher_rows, "--lora_r", "0", script=script, config=config),
            "--lora_r 0: a LoRA rank is 1 or more")
    refused(train("models/no-such-student", out, "--dataset_name", teacher_rows, script=script, config=config),
            "--model_name_or_path models/no-such-student does not exist")
    assert not out.exists()


def test_an_empty_dataset_is_named_not_blamed_on_the_split(tiny_model, work):
    empty = work / "empty_teacher.jsonl"
    empty.write_text("")
    refused(train(tiny_model, work / "empty-out", "--dataset_name", empty), f"{empty}: empty, no rows to train on")
    assert not (work / "empty-out").exists()


def test_stage2_rows_without_an_answer_are_named_at_their_line(tiny_model, work, example_rows):
    rows = [{"id": row["id"], "group": row["group"], "messages": [{"role": "user", "content": row["text"]}]}
            for row in example_rows[:40]]
    data = jsonl(work / "no_answers.jsonl", rows)
    first_trained = next(number for number, row in enumerate(rows, start=1) if split_of(row) == "train")
    refused(train(tiny_model, work / "no-answer-out", "--dataset_name", data),
            f"{data}:{first_trained}: row {rows[first_trained - 1]['id']} lacks a user turn or its answer")
    assert not (work / "no-answer-out").exists()


def test_an_output_dir_holding_a_finished_run_is_refused_and_left_as_it_was(tiny_model, work, teacher_rows):
    out = work / "finished-run"
    out.mkdir()
    (out / "distill_run.json").write_text(json.dumps({"status": "finished"}))
    (out / "adapter_model.safetensors").write_bytes(b"the finished run's adapter")
    before = files_under(out)
    refused(train(tiny_model, out, "--dataset_name", teacher_rows), f"{out} holds a finished run", "--overwrite")
    assert files_under(out) == before


def test_a_closed_teacher_server_port_fails_at_once(tiny_model, work):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    refused(train(tiny_model, work / "server-out", "--teacher_server_url", url, script="train_opd_trl.py",
                  config="recipes/opd_cpu.yaml"), f"--teacher_server_url {url}: unreachable")
    assert not (work / "server-out").exists()


def test_a_prompt_file_without_system_text_is_refused_by_stage_2b_or_noted(tiny_model, work):
    bare = work / "bare.md"
    bare.write_text('---\ncheck: {regex: "\\\\S"}\n---\n')
    out = work / "bare-out"
    refused(train(tiny_model, out, "--prompt_file", bare, "--dataset_name", "example-data/general_questions.jsonl",
                  script="train_opd_trl.py", config="recipes/opd_cpu.yaml"),
            f"--prompt_file {bare}: no system text below the front matter and no example_turns")
    turns_only = work / "turns_only.md"
    turns_only.write_text('---\ncheck: {regex: "\\\\S"}\nexample_turns: [{user: "Hi?", assistant: "Hello."}]\n---\n')
    empty = work / "no_queries.txt"
    empty.write_text("")  # stops the run right after the note, before any weights load
    result = train(tiny_model, out, "--prompt_file", turns_only, "--dataset_name", empty, script="train_opd_trl.py",
                   config="recipes/opd_cpu.yaml")
    refused(result, f"{empty}: empty, no queries to train on")
    assert f"note: --prompt_file {turns_only} has no system text" in result.stdout
    assert not out.exists()


# ---- runs that trained nothing end failed ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_one_step_sft_run_inside_its_warm_up_ends_failed(tiny_model, work, teacher_rows):
    """recipes/cpu.yaml warms up over a tenth of the steps: one step is all warm-up, learning rate 0."""
    out = work / "warm-up-only"
    stderr = refused(train(tiny_model, out, "--dataset_name", teacher_rows, "--max_steps", "1"),
                     "the run trained nothing", "every LoRA B tensor is still 0", "--warmup_steps")
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "failed" and "LoRA B" in record["error"] and "distill_run.json says failed" in stderr


@pytest.mark.slow
def test_an_on_policy_run_of_zero_steps_ends_failed(tiny_model, work):
    """3 queries and a batch of 8: no optimizer step, the adapter untrained, and the run was `finished`."""
    queries = jsonl(work / "three.jsonl", [{"id": f"t{i}", "text": text, "group": "train-side"} for i, text in
                                           enumerate(["Why is the sky blue?", "What is rain?", "Who wrote Hamlet?"])])
    assert all(split_of(row) == "train" for row in map(json.loads, queries.read_text().splitlines()))
    out = work / "zero-steps"
    refused(train(tiny_model, out, "--prompt_file", IN_SHORT, "--dataset_name", queries, "--max_steps", "1",
                  "--per_device_train_batch_size", "8", "--max_completion_length", "8", script="train_opd_trl.py",
                  config="recipes/opd_cpu.yaml"), "the run trained nothing", "0 optimizer steps")
    assert json.loads((out / "distill_run.json").read_text())["status"] == "failed"


def test_a_warm_start_left_as_it_was_is_untrained(tmp_path):
    """--init_adapter's tensors unchanged is no training; one changed value is."""
    import torch
    from safetensors.torch import load_file, save_file

    from distill.checkpoint import untrained_reason

    initial = {"a.lora_A.weight": torch.ones(2, 2), "a.lora_B.weight": torch.full((2, 2), 0.5)}
    for name, tensors in (("init", initial), ("same", initial),
                          ("moved", {**initial, "a.lora_B.weight": torch.tensor([[0.5, 0.5], [0.5, 0.50001]])})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "adapter_model.safetensors")
    state = SimpleNamespace(global_step=3, log_history=[{"learning_rate": 0.0}, {"learning_rate": 0.0}])
    saved = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("init", "same", "moved")}
    assert "equals --init_adapter" in untrained_reason(saved["same"], state, str(tmp_path / "init"))
    assert "learning rate was 0" in untrained_reason(saved["same"], state, str(tmp_path / "init"))
    assert untrained_reason(saved["moved"], state, str(tmp_path / "init")) is None
    assert untrained_reason(saved["init"], state) is None  # a fresh adapter whose B moved off 0

