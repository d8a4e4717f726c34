"""Stage 1 (create_data.py) and its 8-GPU launcher, end to end on the tiny random Qwen3 through vLLM's CPU build.

vLLM starts cost ~20 s each on a 2-core box, so the slow tests share runs through module-scoped fixtures, and stage
runs whose process is not the point run in this process (run_main) on engines shared across the session; the kills,
the resume after them and the launcher run real processes.
The tiny model's ~1k-token tokenizer spends ~3.7k tokens on the long prompt, so every run here uses
--max-model-len 4096 (its max_position_embeddings); at 1024 every query would be rejected as too_long.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from distill import shards, stage1
from distill.prompts import load_prompt
from distill.records import InputError, RunRecord, output_paths, text_id
from distill.run_files import RunFiles
from tests.conftest import CLI_ENV, EXAMPLE_DATA, REPO, run_cli, run_main

MAX_LEN = ["--max-model-len", "4096"]
LABELS = set(load_prompt().labels)
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"


# ---- helpers --------------------------------------------------------------------------------------------------


def example_subset(path: Path, n: int, start: int = 0) -> Path:
    lines = EXAMPLE_DATA.read_text(encoding="utf-8").split("\n")[start : start + n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def input_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").split("\n") if line]


def complete_rows(path: Path) -> list[dict]:
    """Every line of a JSONL output, asserting none is torn or malformed."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends in a torn line: {data[-80:]!r}"
    rows = []
    for number, line in enumerate(data.decode("utf-8").split("\n")[:-1], start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"{path}:{number} does not parse: {line[:120]!r}") from None
    return rows


def paths(output: Path) -> tuple[Path, Path, Path]:
    return output_paths(str(output))


def ids_once(output: Path) -> Counter:
    out, rejects, _ = paths(output)
    return Counter(row["id"] for row in complete_rows(out) + complete_rows(rejects))


def run_record(output: Path) -> dict:
    return json.loads(paths(output)[2].read_text(encoding="utf-8"))


# ---- fast: sharding, resume state and merging without a model -------------------------------------------------


def test_output_paths():
    out, rejects, record = output_paths("data/run/teacher.jsonl")
    assert (str(out), str(rejects), str(record)) == ("data/run/teacher.jsonl", "data/run/teacher.rejects.jsonl",
                                                     "data/run/teacher.run.json")


def _settings(**changes):
    return {"model": "m", "prompt_sha256": "abc", "num_samples": 1, "constrain_labels": True, "temperature": 0.6,
            "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "max_tokens": 8192, "save_logprobs": None, **changes}


def run_files(output: Path, sidecar: bool = False) -> RunFiles:
    return RunFiles(str(output), RunRecord("create_data", {}), stage1.RESUME_KEYS, sidecar)


def resumed_ids(files: RunFiles, settings: dict, overwrite: bool = False) -> set[str]:
    return {row["id"] for part in files.resume(settings, overwrite) for row in part}


def test_resume_state_unit(tmp_path):
    files = run_files(tmp_path / "t.jsonl")
    out, rejects, record = paths(tmp_path / "t.jsonl")
    assert resumed_ids(files, _settings()) == set()
    out.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "mess', encoding="utf-8")
    rejects.write_text('{"id": "d", "reason": "too_long"}\n', encoding="utf-8")
    RunRecord("create_data", {}).mark_running(record, settings=_settings())
    assert resumed_ids(files, _settings()) == {"a", "b", "d"}
    assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n'  # the torn line is cut
    for change in ({"temperature": 0.7}, {"top_k": 40}, {"model": "other"}, {"prompt_sha256": "def"},
                   {"constrain_labels": False}):
        with pytest.raises(InputError, match=f"{next(iter(change))}.*--overwrite"):
            resumed_ids(files, _settings(**change))
    assert resumed_ids(files, _settings(temperature=0.7), overwrite=True) == set()
    assert not out.exists() and not rejects.exists() and not record.exists()


def _shard_files(tmp_path, rows, count, settings=None):
    for i in range(count):
        part = shards.select_shard(rows, i, count)
        out, rejects, record = paths(tmp_path / f"shard-{i}-of-{count}.jsonl")
        out.write_text("".join(json.dumps({"id": r["id"], "teacher": {"label": "en"}}) + "\n" for r in part[1:]))
        rejects.write_text("".join(json.dumps({"id": r["id"], "reason": "no_answer_line"}) + "\n" for r in part[:1]))
        RunRecord("create_data", {}).write(record, status="finished", counts={"selected": len(part)},
                                            settings=settings or _settings(), generation_seconds=1.5 + i)
    return str(tmp_path / f"shard-*-of-{count}.jsonl")


def _merge(tmp_path, pattern, rows, settings=None):
    settings = settings or _settings()
    run_files(tmp_path / "merged.jsonl", sidecar=bool(settings["save_logprobs"])).merge(pattern, rows, settings)
    return paths(tmp_path / "merged.jsonl")


def test_merge_shards_unit(tmp_path, capsys):
    rows = [{"id": f"r{i}", "text": f"t{i}"} for i in range(11)]
    pattern = _shard_files(tmp_path, rows, 3)
    out, rejects, record = _merge(tmp_path, pattern, rows)
    merged = complete_rows(out) + complete_rows(rejects)
    assert sorted(row["id"] for row in merged) == sorted(row["id"] for row in rows)
    assert len(complete_rows(rejects)) == sum(1 for i in range(3) if shards.select_shard(rows, i, 3))
    saved = json.loads(record.read_text())
    assert saved["counts"] == {"selected": 11, "written_total": len(complete_rows(out)),
                               "rejected_total": len(complete_rows(rejects))}
    assert saved["generation_seconds"] == 3.5 and len(saved["merged_from"]) == 3
    # the merged record keeps the settings: the same command run on the merged output resumes with nothing to do
    assert saved["settings"] == _settings()
    assert resumed_ids(run_files(out), _settings()) == {row["id"] for row in rows}


def test_merge_refuses_shards_made_with_other_settings(tmp_path):
    rows = [{"id": f"r{i}", "text": f"t{i}"} for i in range(10)]
    pattern = _shard_files(tmp_path, rows, 2, settings=_settings(temperature=0.15))
    with pytest.raises(InputError) as exit_:
        _merge(tmp_path, pattern, rows)
    assert "shard-0-of-2.jsonl was made with other settings (temperature)" in str(exit_.value)
    assert not paths(tmp_path / "merged.jsonl")[0].exists()


@pytest.mark.parametrize("damage, message", [
    ("duplicate", "appear more than once"), ("missing", "are missing"), ("extra", "were not selected"),
])
def test_merge_shards_unit_detects_bad_coverage(tmp_path, damage, message):
    rows = [{"id": f"r{i}", "text": f"t{i}"} for i in range(10)]
    pattern = _shard_files(tmp_path, rows, 2)
    shard1 = tmp_path / "shard-1-of-2.jsonl"
    lines = shard1.read_text().splitlines(keepends=True)
    if damage == "duplicate":
        shard1.write_text("".join(lines) + (tmp_path / "shard-0-of-2.jsonl").read_text().splitlines(True)[0])
    elif damage == "missing":
        shard1.write_text("".join(lines[1:]))
    else:
        shard1.write_text("".join(lines) + json.dumps({"id": "stranger"}) + "\n")
    with pytest.raises(InputError) as exit_:
        _merge(tmp_path, pattern, rows)
    out, rejects, record = paths(tmp_path / "merged.jsonl")
    assert message in str(exit_.value)
    assert not out.exists() and not record.exists()


# ---- bad input: fails with file and line, before any model is loaded -------------------------------------------


def _bad_malformed(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n', encoding="utf-8")
    return path, 2


def _bad_utf8(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"erste Zeile\nzweite Zeile\n" + b"caf\xe9 au lait\nvierte\n")
    return path, 3


def _bad_duplicate_id(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x", "text": "one"}\n{"id": "y", "text": "two"}\n{"id": "x", "text": "three"}\n')
    return path, 3


@pytest.mark.parametrize("make_bad", [_bad_malformed, _bad_utf8, _bad_duplicate_id])
def test_bad_input_fails_before_model_load(tmp_path, make_bad):
    path, line = make_bad(tmp_path)
    output = tmp_path / "never" / "teacher.jsonl"
    started = time.monotonic()
    # A model that does not exist: had the script tried to load it, the error would name the model, not the input.
    result = run_main("create_data.py", "--input_file", path, "--output_file", output,
                      "--model_name", tmp_path / "no-such-model", *MAX_LEN, check=False)
    assert result.returncode != 0
    assert f"{path}:{line}:" in result.stderr, result.stderr[-2000:]
    assert "no-such-model" not in result.stderr and "Traceback" not in result.stderr
    assert not output.parent.exists()  # nothing written, not even the output folder
    assert time.monotonic() - started < 90


@pytest.mark.parametrize("bad_row, reason", [
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
     "ends in an assistant turn"),
    ({"messages": [{"role": "customer", "content": "Hi?"}]}, "unknown role 'customer'"),
    ({"messages": []}, "an empty conversation"),
    ({"text": "a text among conversations"}, "mixes text rows and conversations"),
])
def test_a_bad_conversation_fails_before_model_load(tmp_path, bad_row, reason):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Why?"}]}
    path.write_text("".join(json.dumps(row) + "\n" for row in (good, good | {"id": "b"}, bad_row)), encoding="utf-8")
    output = tmp_path / "never" / "teacher.jsonl"
    result = run_main("create_data.py", "--input_file", path, "--output_file", output, "--prompt_file",
                      REPO / "prompts" / "in_short.md", "--model_name", tmp_path / "no-such-model", check=False)
    assert result.returncode == 1 and f"{path}:3: " in result.stderr and reason in result.stderr, result.stderr[-2000:]
    assert "no-such-model" not in result.stderr and not output.parent.exists()


# ---- --max_samples: a sample that training can use (no engine: the teacher is a stand-in) ----------------------


def gold_answers(args, teacher, todo, selected, settings, files):
    """stage1.answer_queries' stand-in: every query answered with its gold label, as a finished run writes it."""
    from distill.teacher import StreamStats

    with files.appender() as append:
        append([{"row": {"id": row["id"], "messages": [{"role": "user", "content": row["text"]},
                                                       {"role": "assistant", "content": row["label"]}],
                         **stage1.carried(row)}} for row in todo])
    stats = StreamStats()
    stats.answered = len(todo)
    return stats.summary(), None


@pytest.mark.parametrize("split_flags, side, trainable", [([], "train", 8), (["--split", "all"], "heldout", 0)])
def test_max_samples_without_split_takes_train_rows(tiny_model, tmp_path, monkeypatch, split_flags, side, trainable):
    """The first 16 rows of the example data are held out: `--max_samples 8` alone must not take them, and the
    summary and run record say how many selected rows training can use."""
    from distill.splits import split_of

    monkeypatch.setattr(stage1, "answer_queries", gold_answers)
    output = tmp_path / "teacher.jsonl"
    printed = run_main("create_data.py", "--input_file", EXAMPLE_DATA, "--output_file", output, "--model_name",
                       tiny_model, "--max_samples", "8", *split_flags, *MAX_LEN).stdout
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and {split_of(row) for row in rows} == {side}
    counts = json.loads(output_paths(str(output))[2].read_text())["counts"]
    assert counts["selected"] == 8 and counts["selected_train_side"] == counts["written_train_side"] == trainable
    assert f"--split {side if side == 'train' else 'all'}, {trainable} of them on the train side" in printed
    assert f"training can use {trainable} of the 8 written rows" in printed


def test_an_empty_selection_fails_before_the_model_loads(tmp_path):
    path = example_subset(tmp_path / "train_side.jsonl", 10, start=16)  # rows 16-25: all on the train side
    result = run_main("create_data.py", "--input_file", path, "--output_file", tmp_path / "out.jsonl", "--split",
                      "heldout", "--model_name", tmp_path / "no-such-model", check=False)
    assert result.returncode == 1 and "no queries of" in result.stderr and "on the heldout side" in result.stderr
    assert "no-such-model" not in result.stderr


# ---- slow: real runs on the tiny model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("create_data")


@pytest.fixture(scope="module")
def input50(work) -> Path:
    """50 example rows; every other one carries a `label_target` (its gold label), as create_queries.py writes for
    a label task, so the run record's label_targets count has something to count."""
    path = example_subset(work / "in50.jsonl", 50)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [{**row, "label_target": row["label"]} if number % 2 == 0 else row for number, row in enumerate(rows)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_run(tiny_model, work, input50, shared_engines):
    output = work / "single" / "teacher.jsonl"
    command = ["create_data.py", "--input_file", input50, "--output_file", output, "--model_name", tiny_model,
               "--constrain_labels", *MAX_LEN]
    result = run_main(*command)
    return output, command, result


@pytest.mark.slow
def test_real_run_counts(single_run, input50):
    output, _, result = single_run
    out, rejects, _ = paths(output)
    written, rejected = complete_rows(out), complete_rows(rejects)
    assert len(written) + len(rejected) == 50
    assert sorted(row["id"] for row in written + rejected) == sorted(input_ids(input50))
    gold = {row["id"]: row for row in map(json.loads, input50.read_text(encoding="utf-8").splitlines())}
    for row in written:
        label = row["teacher"]["label"]
        assert label in LABELS
        assert row["messages"] == [{"role": "user", "content": gold[row["id"]]["text"]},
                                   {"role": "assistant", "content": label}]
        assert row["group"] == gold[row["id"]]["group"] and row["label"] == gold[row["id"]]["label"]  # carried
        assert row["teacher"]["votes"] == {label: 1} and row["teacher"]["finish_reasons"] == ["stop"]
        assert "text" not in row and "raw" not in row["teacher"]
    for row in rejected:
        assert row["reason"] and row["text"] == gold[row["id"]]["text"]
    record = run_record(output)
    counts = record["counts"]
    assert record["status"] == "finished"
    assert counts["input_lines"] == counts["selected"] == 50 and counts["resumed"] == 0
    assert counts["written_total"] == counts["written_this_run"] == len(written)
    assert counts["rejected_total"] == counts["rejected_this_run"] == len(rejected)
    assert sum(counts["reject_reasons_this_run"].values()) == len(rejected)
    assert record["settings"]["constrain_labels"] is True and record["expects_reasoning"] is False
    assert f"50 selected -> {len(written)} written, {len(rejected)} rejected" in result.stdout
    targeted = [row for row in written if "label_target" in row]
    hits = [row for row in targeted if row["teacher"]["label"] == row["label_target"]]
    assert 0 < len(targeted) < len(written)
    assert counts["label_targets"]["queries"] == len(targeted)
    assert counts["label_targets"]["labelled_as_target"] == len(hits)
    assert f"{len(hits)} of {len(targeted)} queries written for a label got it" in result.stdout


@pytest.mark.slow
def test_rerun_of_finished_command_does_nothing(single_run):
    output, command, _ = single_run
    out, rejects, _ = paths(output)
    before = out.read_bytes(), rejects.read_bytes()
    result = run_main(*command)
    assert "50 done by an earlier run, 0 to go" in result.stdout
    assert (out.read_bytes(), rejects.read_bytes()) == before
    counts = run_record(output)["counts"]
    assert counts["resumed"] == 50 and counts["written_this_run"] == counts["rejected_this_run"] == 0
    assert counts["written_total"] + counts["rejected_total"] == 50


LONG_TEXT = ("Ceci est une phrase française assez ordinaire. " * 2200)[:100_000]
SHORT_TEXTS = ["Hello there, how are you?", "Wie spät ist es?", "¿Dónde está la estación?", "Merhaba dünya",
               "Привет, как дела?"]


@pytest.fixture(scope="module")
def txt_run(tiny_model, work, shared_engines):
    path = work / "queries.txt"
    lines = [SHORT_TEXTS[0], LONG_TEXT, "", *SHORT_TEXTS[1:], "   ", SHORT_TEXTS[2]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = work / "txt" / "teacher.jsonl"
    command = ["create_data.py", "--input_file", path, "--output_file", output, "--model_name", tiny_model,
               "--constrain_labels", *MAX_LEN]
    return output, command, run_main(*command)


@pytest.mark.slow
def test_too_long_query_is_rejected_and_counted(txt_run):
    output, _, result = txt_run
    out, rejects, _ = paths(output)
    rejected = complete_rows(rejects)
    too_long = [row for row in rejected if row["reason"] == "too_long"]
    assert len(too_long) == 1
    assert too_long[0]["text"] == LONG_TEXT and too_long[0]["id"] == text_id(LONG_TEXT)
    ids = ids_once(output)
    assert set(ids) == {text_id(t) for t in [*SHORT_TEXTS, LONG_TEXT]} and max(ids.values()) == 1
    counts = run_record(output)["counts"]
    assert counts["input_lines"] == 9 and counts["skipped_empty"] == 2 and counts["duplicates"] == 1
    assert counts["selected"] == 6
    assert counts["reject_reasons_this_run"].get("too_long") == 1
    assert counts["written_total"] + counts["rejected_total"] == 6
    assert "too_long: 1" in result.stdout


@pytest.mark.slow
def test_resume_with_other_settings_refuses_then_overwrite_starts_over(txt_run, work):
    output, command, _ = txt_run
    # work on a copy so the other test of this fixture is unaffected by the order tests run in
    copy_dir = work / "txt-copy"
    shutil.copytree(output.parent, copy_dir)
    copy = copy_dir / output.name
    command = [str(c) for c in command]
    command[command.index(str(output))] = str(copy)
    out, rejects, record = paths(copy)
    out.write_text(out.read_text(encoding="utf-8") + json.dumps({"id": "marker-from-old-run"}) + "\n")
    before = out.read_bytes(), rejects.read_bytes(), record.read_bytes()

    refused = run_main(*command, "--temperature", "0.7", check=False)
    assert refused.returncode != 0
    assert "temperature" in refused.stderr and "--overwrite" in refused.stderr
    assert (out.read_bytes(), rejects.read_bytes(), record.read_bytes()) == before

    run_main(*command, "--temperature", "0.7", "--overwrite")
    ids = ids_once(copy)
    assert "marker-from-old-run" not in ids
    assert len(ids) == 6 and max(ids.values()) == 1
    saved = json.loads(record.read_text())
    assert saved["settings"]["temperature"] == 0.7
    assert saved["counts"]["resumed"] == 0 and saved["counts"]["written_this_run"] + saved["counts"][
        "rejected_this_run"] == 6


# ---- slow: SIGKILL at several points, resume, finish --------------------------------------------------------------


class Launch:
    """create_data.py in its own session, its output in a log file."""

    def __init__(self, command, log: Path):
        self.log = log
        self.handle = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO,
                                     env={**CLI_ENV, "PYTHONUNBUFFERED": "1"}, stdout=self.handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"create_data exited ({self.proc.returncode}) before {what}:\n{self.output()}")
            time.sleep(0.002)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        try:  # anything the run started in its session (nothing, normally)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.handle.close()

    def terminate(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.handle.close()

    def output(self) -> str:
        if not self.handle.closed:
            self.handle.flush()
        return self.log.read_text(errors="replace")[-3000:]


def newline_count(*files: Path) -> int:
    total = 0
    for path in files:
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return total


def check_survivors(finished: dict, output: Path, when: str, selected: list[str] = ()) -> dict:
    """Every row that was on disk at an earlier kill is still there, unchanged, every id is there once, and (at the
    end of a run) every `selected` id is there. Returns the rows on disk now, by id: the log of finished ids the next
    kill is checked against. The counts go to `make soak`'s report first (soak_record), so a failing run counts too."""
    out, rejects, _ = paths(output)
    rows = complete_rows(out) + complete_rows(rejects)
    ids = Counter(row["id"] for row in rows)
    duplicated = [i for i, n in ids.items() if n > 1]
    now = {row["id"]: row for row in rows}
    lost = [row_id for row_id, row in finished.items() if now.get(row_id) != row]
    missing = [row_id for row_id in selected if row_id not in now and row_id not in finished]
    soak_record(when, lost=len(lost) + len(missing), duplicated=len(duplicated), on_disk=len(now))
    assert not duplicated, f"{when}: duplicated ids {duplicated}"
    assert not lost, f"{when}: rows finished before an earlier kill were lost or changed: {lost}"
    assert not missing, f"{when}: selected ids in neither the output nor the rejects: {missing}"
    return now


def soak_record(when: str, **counts) -> None:
    """One line of figures for `make soak` (scripts/soak.py), which names the file in SOAK_REPORT; nothing otherwise."""
    report = os.environ.get("SOAK_REPORT")
    if report:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(report, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, "when": when, **counts}) + "\n")


@pytest.mark.slow
def test_kills_at_random_moments_then_resume(tiny_model, tmp_path):
    """SIGKILL during start-up and at random moments mid-stream, a SIGTERM (a clean stop), torn last lines, then a
    resume to the end: every selected id exactly once, and no row that finished before a kill is lost."""
    seed = time.time_ns() % 10_000
    moments = random.Random(seed)
    queries = example_subset(tmp_path / "in40.jsonl", 40, start=100)
    selected = input_ids(queries)
    output = tmp_path / "kill" / "teacher.jsonl"
    out, rejects, record = paths(output)
    # free-form with 16 tokens per answer and a redraw: slow enough on the tiny model that a kill lands mid-stream
    command = ["create_data.py", "--input_file", queries, "--output_file", output, "--model_name", tiny_model,
               "--max_tokens", "16", "--max_retries", "1", "--max_in_flight", "2", *MAX_LEN]

    # 1. during start-up: the run record says "running", the engine is still starting
    run = Launch(command, tmp_path / "run1.log")
    run.wait_for(record.exists, "the run record was written")
    run.kill()
    assert json.loads(record.read_text())["status"] == "running"
    assert newline_count(out, rejects) == 0

    # 2. and 3. SIGKILL mid-stream at random moments; 4. SIGTERM: stop admitting, keep what finished, say so
    finished = {}
    for number, how in ((2, "kill"), (3, "kill"), (4, "term")):
        run = Launch(command, tmp_path / f"run{number}.log")
        target = len(finished) + moments.randint(1, 6)
        run.wait_for(lambda target=target: newline_count(out, rejects) >= target, f"{target} rows were on disk")
        time.sleep(moments.uniform(0, 0.4))
        if how == "kill":
            run.kill()
        else:
            run.terminate()
            assert run.finish() == 128 + signal.SIGTERM, f"seed {seed}: {run.output()}"
        before = len(finished)
        finished = check_survivors(finished, output, f"after kill {number} (seed {seed})")
        assert f"{before} done by an earlier run, {40 - before} to go" in run.log.read_text()
        assert target <= len(finished) < 40, f"kill {number} came too late to interrupt the run (seed {seed})"
        saved = json.loads(record.read_text())
        if how == "kill":
            assert saved["status"] == "running"
        else:
            assert saved["status"] == "interrupted", saved["status"]
            this_run = saved["counts"]["written_this_run"] + saved["counts"]["rejected_this_run"]
            assert this_run == len(finished) - before and "interrupted (SIGTERM)" in run.log.read_text()

    # a crash mid-write: torn last lines in both files
    pending = next(i for i in selected if i not in finished)
    with open(out, "ab") as handle:
        handle.write(f'{{"id": "{pending}", "messages": [{{"role": "user", "content": "Die B'.encode())
    with open(rejects, "ab") as handle:
        handle.write(b'{"id": "x", "reason": "too_')

    # 5. resume to the end
    run = Launch(command, tmp_path / "run5.log")
    assert run.finish() == 0, run.output()
    log = run.log.read_text()
    assert "cut a torn last line" in log and str(out) in log and str(rejects) in log
    assert f"{len(finished)} done by an earlier run, {40 - len(finished)} to go" in log

    final = check_survivors(finished, output, f"after the resume (seed {seed})", selected)
    assert sorted(final) == sorted(selected), "every selected id must be in the output or the rejects"
    saved = run_record(output)
    assert saved["status"] == "finished"
    assert saved["counts"]["resumed"] == len(finished)
    assert saved["counts"]["written_this_run"] + saved["counts"]["rejected_this_run"] == 40 - len(finished)
    assert saved["counts"]["written_total"] + saved["counts"]["rejected_total"] == 40
    stream = saved["stream"]
    assert stream["finished"] == 40 - len(finished) and stream["generated_tokens_per_second"] > 0
    assert 0 < stream["prefix_cache_hit_rate"] < 1  # the long prompt is cached; each query's own tokens are not


# ---- slow: the multi-instance launcher ---------------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_matches_single_run(single_run, tiny_model, work, input50):
    single_output, _, _ = single_run
    output = work / "launcher" / "teacher.jsonl"
    env = {"MODEL": str(tiny_model), "TP": "1", "NUM_GPUS": "2", "INPUT": str(input50), "OUTPUT": str(output),
           "PYTHON": sys.executable}
    result = run_cli("bash", "create_data_h100x8.sh", "--constrain_labels", *MAX_LEN, env=env)
    shard_dir = output.parent / "teacher.shards"
    assert "2 instance(s)" in result.stdout

    merged = ids_once(output)
    assert merged == ids_once(single_output)  # same ids, each exactly once
    assert sorted(merged) == sorted(input_ids(input50))
    per_shard = [ids_once(shard_dir / f"shard-{i}-of-2.jsonl") for i in range(2)]
    assert [set(c) for c in per_shard] == [{i for i in input_ids(input50) if shards.shard_of(i, 2) == index}
                                           for index in range(2)]
    assert all(c and max(c.values()) == 1 for c in per_shard)
    record = run_record(output)
    assert record["counts"]["selected"] == 50 and len(record["merged_from"]) == 2
    assert record["counts"]["written_total"] + record["counts"]["rejected_total"] == 50
    for row in complete_rows(paths(output)[0]):
        assert row["teacher"]["label"] in LABELS

    # the merged record keeps the settings: the same command on the merged output resumes and has nothing to do
    rerun = run_main("create_data.py", "--input_file", input50, "--model_name", tiny_model, "--output_file", output,
                     "--constrain_labels", *MAX_LEN)
    assert "50 done by an earlier run, 0 to go" in rerun.stdout

    # the merge on its own notices a row that went missing from a shard
    shard1 = shard_dir / "shard-1-of-2.jsonl"
    lines = shard1.read_text(encoding="utf-8").splitlines(keepends=True)
    lost = json.loads(lines[0])["id"]
    shard1.write_text("".join(lines[1:]), encoding="utf-8")
    merge = run_main("create_data.py", "--input_file", input50, "--model_name", tiny_model, "--constrain_labels",
                     "--output_file", work / "launcher" / "remerged.jsonl",
                     "--merge_shards", f"{shard_dir}/shard-*-of-2.jsonl", check=False)
    assert merge.returncode != 0
    assert "1 ids are missing" in merge.stderr and lost in merge.stderr
    assert not (work / "launcher" / "remerged.jsonl").exists()


FAILING_PYTHON = """#!/usr/bin/env bash
# shard 1 fails at once (after shard 0 is up); shard 0 would run for a minute; anything else is real python
for arg in "$@"; do [ "${prev:-}" = --shard_index ] && idx=$arg; prev=$arg; done
case "${idx:-}" in
  1) for _ in $(seq 100); do [ -f "$PIDDIR/shard-0.pid" ] && break; sleep 0.1; done
     echo "shard 1: simulated crash" >&2; exit 3 ;;
  0) echo $$ > "$PIDDIR/shard-0.pid"; exec sleep 60 ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def test_launcher_fails_when_one_instance_fails(tmp_path):
    wrapper = tmp_path / "python"
    wrapper.write_text(FAILING_PYTHON)
    wrapper.chmod(0o755)
    output = tmp_path / "out" / "teacher.jsonl"
    env = {"MODEL": "tiny", "TP": "1", "NUM_GPUS": "2", "OUTPUT": str(output), "PYTHON": str(wrapper),
           "PIDDIR": str(tmp_path), "REAL_PYTHON": sys.executable}
    started = time.monotonic()
    result = run_cli("bash", "create_data_h100x8.sh", "--max_samples", "10", env=env, check=False, timeout=60)
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert time.monotonic() - started < 30  # it did not wait for shard 0's minute
    assert "a teacher instance failed" in result.stderr and "simulated crash" in result.stderr
    assert not output.exists()  # no merge after a failure
    pid = int((tmp_path / "shard-0.pid").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the launcher left shard 0 running after shard 1 failed")


# ---- slow: the embedded model answers a chat through vLLM ------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_answers_a_chat(shared_engines):
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    from vllm import SamplingParams
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from distill import engine

    args = engine.add_engine_args(FlexibleArgumentParser()).parse_args(["--model", str(SMOLLM2), *MAX_LEN])
    assert args.enable_prefix_caching and args.seed == 0
    if not engine.on_gpu():  # the CPU defaults: no torch.compile warm-up, fp32
        assert args.enforce_eager and args.dtype == "float32", vars(args)
    llm = engine.build_llm(args)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    answer = out[0].outputs[0].text
    assert answer.strip()
    assert "paris" in answer.lower()


@pytest.mark.slow
def test_embedded_model_free_form_queries_all_accounted_for(tmp_path, shared_engines):
    """The issue's check on the real embedded model, free-form (no label constraint), where rejects really happen:
    every query ends in the output or the rejects file, and the run record's counts agree with both. (20 queries:
    the issue's 50 took 4 minutes of a 15-minute suite and assert nothing more.)"""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (make setup builds it)")
    source = example_subset(tmp_path / "in20.jsonl", 20)
    output = tmp_path / "teacher.jsonl"
    run_main("create_data.py", "--input_file", source, "--output_file", output, "--model_name", SMOLLM2,
             "--max_tokens", 24, "--max_retries", 1, "--save_raw", "--max-model-len", 4096)
    out, rejects, _ = paths(output)
    written, rejected = complete_rows(out), complete_rows(rejects)
    assert sorted(row["id"] for row in written + rejected) == sorted(input_ids(source))
    assert all(row["teacher"]["label"] in LABELS for row in written)
    assert rejected, "free-form answers to the language-ID prompt: some must fail its label check"
    assert all(len(row["failures"]) == 2 and row["reason"] for row in rejected)  # 1 try + 1 retry, raw kept
    counts = run_record(output)["counts"]
    assert (counts["written_total"], counts["rejected_total"]) == (len(written), len(rejected))
    assert sum(counts["reject_reasons_this_run"].values()) == len(rejected)

