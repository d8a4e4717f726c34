"""Stage 3 (evaluate.py) through the real vLLM on the tiny model: the results JSON and heatmap, the held-out rows,
the teacher-with-prompt run and the cost ratio. Three evaluations, in this process (run_main), shared by the tests
through module fixtures: the session's trained adapter against a teacher file that is wrong on every third row, the
base model with the prompt (on the engine stage 1's tests use too), the student against that run."""

import hashlib
import json

import pytest

from tests.conftest import EXAMPLE_DATA, run_main, write_teacher_file

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


def wrong_label(label: str) -> str:
    from distill.prompts import load_prompt

    labels = load_prompt().labels
    return labels[(labels.index(label) + 1) % len(labels)]


@pytest.fixture(scope="module")
def noisy_teacher_jsonl(workdir, example_rows):
    """A teacher that is wrong on every third row of the file, so agreement with it is not accuracy."""
    wrong_ids = {row["id"] for row in example_rows[::3]}

    def answer(row):
        return wrong_label(row["label"]) if row["id"] in wrong_ids else row["label"]

    return write_teacher_file(workdir / "noisy_teacher.jsonl", example_rows, answer)


@pytest.fixture(scope="module")
def adapter(trained_run):
    """The session's adapter: 2 steps of recipes/cpu.yaml on the gold labels (tests/conftest.py)."""
    return trained_run["dir"]


def evaluate(*args):
    return run_main("evaluate.py", "--test_file", EXAMPLE_DATA.relative_to(EXAMPLE_DATA.parents[1]),
                    "--latency_requests", 2, "--quiet", *args)


@pytest.fixture(scope="module")
def student_eval(adapter, noisy_teacher_jsonl, workdir, shared_engines):
    # no --max-model-len: evaluate.py sizes the context from the prompts
    output = workdir / "eval" / "eval.json"
    result = evaluate("--model_path", adapter, "--teacher_file", noisy_teacher_jsonl, "--output_file", output)
    return {"json": output, "stdout": result.stdout, "text": output.read_text(encoding="utf-8")}


@pytest.fixture(scope="module")
def teacher_eval(tiny_model, workdir, shared_engines):
    # the prompt is ~3.7k tokens in the tiny 1k-token vocabulary: the context must hold it
    output = workdir / "eval" / "teacher_with_prompt.json"
    evaluate("--model_path", tiny_model, "--with_prompt", "--constrain_labels", "--max-model-len", 4096,
             "--max-tokens", 8, "--no-lingua", "--output_file", output)
    return json.loads(output.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def student_vs_teacher(adapter, teacher_eval, student_eval, workdir):
    merged = adapter / "merged" / "model.safetensors"
    before = merged.stat().st_mtime_ns
    output = workdir / "eval" / "student_vs_teacher.json"
    result = evaluate("--model_path", adapter, "--max-model-len", 1024, "--teacher_file",
                      workdir / "eval" / "teacher_with_prompt.json", "--no-lingua", "--output_file", output)
    return {"results": json.loads(output.read_text(encoding="utf-8")), "stdout": result.stdout,
            "merged_rebuilt": merged.stat().st_mtime_ns != before}


def heldout_rows():
    from distill.records import read_queries
    from distill.splits import select

    return select(read_queries(str(EXAMPLE_DATA)).rows, "heldout")


@pytest.mark.slow
def test_end_to_end_results_json(student_eval, adapter, tiny_model, example_rows):
    from distill import engine
    from distill.answers import parse_student
    from distill.prompts import load_prompt

    results = json.loads(student_eval["text"])  # a plain JSON document: round-trips
    assert json.loads(json.dumps(results)) == results
    for key in ("mode", "model_path", "serving", "max_model_len", "split_check", "split", "n", "accuracy_vs_gold",
                "n_with_gold", "agreement_with_teacher", "n_with_teacher", "parse_rate", "unparsed", "confusion_matrix",
                "per_label", "macro_f1", "baselines", "worst_labels", "cost", "examples", "git_revision", "command"):
        assert key in results, key
    n = len(heldout_rows())
    assert results["n"] == len(results["examples"]) == n
    assert results["split"] == "heldout" and results["mode"] == "student without the prompt"
    assert results["n_with_gold"] == n
    cm = results["confusion_matrix"]
    assert sum(map(sum, cm["matrix"])) == results["n_with_gold"]
    assert cm["columns_predicted"][-1] == "unparsed"
    # accuracy and agreement recomputed from the examples: the teacher differs from gold on every third file row
    examples = results["examples"]
    answers = [e["prediction"] or "unparsed" for e in examples]
    assert results["n_with_teacher"] == n
    assert results["accuracy_vs_gold"] == pytest.approx(sum(a == e["gold"] for a, e in zip(answers, examples)) / n)
    assert results["agreement_with_teacher"] == pytest.approx(
        sum(a == e["teacher"] for a, e in zip(answers, examples)) / n)
    wrong_ids = {row["id"] for row in example_rows[::3]}
    assert {e["id"] for e in examples if e["teacher"] != e["gold"]} == wrong_ids & {e["id"] for e in examples}
    assert all(e["teacher"] == wrong_label(e["gold"]) for e in examples if e["id"] in wrong_ids)
    assert 0 < len(wrong_ids & {e["id"] for e in examples}) < n
    assert set(results["baselines"]) == {"majority_class", "chance", "lingua"}
    assert results["baselines"]["lingua"]["accuracy"] > 0.5  # lingua knows these languages; a random model does not

    labels = load_prompt().labels
    gold_of = {row["id"]: row["label"] for row in heldout_rows()}
    for example in results["examples"]:
        assert example["prediction"] == parse_student(example["raw"], labels)
        assert example["gold"] == gold_of[example["id"]]
        assert example["input_tokens"] > 0
    # no --max-model-len given: the longest prompt plus --max_tokens (the student's default, 16), or the longest
    # fingerprint probe scored whole (its prompt and answer, plus the 1 token vLLM generates)
    probes = json.loads((adapter / "fingerprint.json").read_text())["probes"]
    assert results["max_model_len"] == max(max(e["input_tokens"] for e in results["examples"]) + 16,
                                           max(len(p["input_ids"]) for p in probes) + 1)
    assert results["fingerprint"]["status"] == "passed"
    # the adapter's run record says it trained with the split evaluate.py used: the score is held-out
    split_check = results["split_check"]
    assert split_check["record"] == str(adapter / "distill_run.json") and split_check["notes"] == []
    assert split_check["trained_heldout_fraction"] == 0.2 and split_check["trained_split_seed"] == 0
    assert split_check["scored_rows_trained_on"] is False
    unparsed = sum(e["prediction"] is None for e in results["examples"])
    assert results["unparsed"] == unparsed and results["parse_rate"] == pytest.approx(1 - unparsed / n)
    assert sum(row[-1] for row in cm["matrix"]) == unparsed
    cost = results["cost"]
    assert cost["latency_requests"] == 2 and cost["median_latency_seconds"] > 0
    assert cost["input_tokens_per_request"] == pytest.approx(sum(e["input_tokens"] for e in results["examples"]) / n)

    if not engine.on_gpu():  # on CPU the adapter is merged once into <adapter>/merged and served as a plain model
        assert "merged" in results["serving"]
        merged = adapter / "merged"
        assert (merged / "config.json").exists() and (merged / "tokenizer.json").exists()
        stamp = hashlib.sha256((adapter / "adapter_config.json").read_bytes()
                               + (adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert json.loads((merged / "merge_key.json").read_text()) == {
            "adapter_sha256": stamp, "base_model": str(tiny_model), "dtype": "float32"}


@pytest.mark.slow
def test_merged_model_is_base_plus_adapter(student_eval, adapter, tiny_model):
    from distill import engine

    if engine.on_gpu():
        pytest.skip("the GPU serves the adapter through vLLM's LoRA support: nothing is merged")
    import torch
    from safetensors.torch import load_file

    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(adapter / "merged" / "model.safetensors")
    assert set(merged) == set(base)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not a LoRA target
    changed = [key for key in base if "proj" in key and not torch.equal(merged[key], base[key])]
    assert changed, "merging a trained adapter changes the LoRA-targeted weights"
    assert all(torch.allclose(merged[key], base[key], atol=0.1) for key in changed)  # 2 small steps, not a new model


@pytest.mark.slow
def test_heatmap_png(student_eval):
    png = student_eval["json"].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert 600 <= width <= 1400 and 500 <= height <= 1200  # 9 x 7.5 in at 110 dpi
    assert image.std() > 0.05, "not a blank image"


@pytest.mark.slow
def test_only_heldout_rows_are_evaluated(student_eval, adapter):
    from distill.records import read_jsonl
    from distill.training import training_rows

    results = json.loads(student_eval["text"])
    evaluated = [e["id"] for e in results["examples"]]
    assert len(evaluated) == len(set(evaluated))
    heldout = heldout_rows()
    assert set(evaluated) == {row["id"] for row in heldout}

    record = json.loads((adapter / "distill_run.json").read_text())
    script = record["args"]["script"]
    trained, dropped = training_rows(read_jsonl(script["dataset_name"]), script["heldout_fraction"],
                                     script["split_seed"])
    assert record["counts"]["rows_used"] == len(trained) and record["counts"]["heldout_rows_dropped"] == dropped
    assert not set(evaluated) & {row["id"] for row in trained}
    assert not {e["text"] for e in results["examples"]} & {row["messages"][0]["content"] for row in trained}


@pytest.mark.slow
def test_teacher_with_prompt_constrained(teacher_eval, student_eval):
    from distill.prompts import load_prompt

    labels = load_prompt().labels
    student = json.loads(student_eval["text"])
    assert teacher_eval["mode"] == "teacher/base model with the prompt"
    assert teacher_eval["serving"] == "full model"
    assert teacher_eval["n"] == len(heldout_rows())
    assert teacher_eval["parse_rate"] == 1.0 and teacher_eval["unparsed"] == 0
    assert all(e["prediction"] in labels for e in teacher_eval["examples"])
    assert all(e["raw"].strip().lower() == e["prediction"] for e in teacher_eval["examples"])
    assert "lingua" not in teacher_eval["baselines"]  # --no-lingua
    teacher_tokens = teacher_eval["cost"]["input_tokens_per_request"]
    assert teacher_tokens > 10 * student["cost"]["input_tokens_per_request"]  # the long prompt is the cost
    assert all(e["input_tokens"] > 1000 for e in teacher_eval["examples"])


@pytest.mark.slow
def test_student_vs_teacher_cost_ratio(student_vs_teacher, teacher_eval):
    results = student_vs_teacher["results"]
    ratio = results["cost"]["vs_teacher_with_prompt"]
    assert ratio["input_tokens"] == pytest.approx(
        teacher_eval["cost"]["input_tokens_per_request"] / results["cost"]["input_tokens_per_request"])
    assert ratio["input_tokens"] > 1
    if "median_latency" in ratio:
        assert ratio["median_latency"] > 0
    # agreement is with the teacher run's predictions, row by row
    teacher_of = {e["id"]: e["prediction"] for e in teacher_eval["examples"]}
    assert all(e["teacher"] == teacher_of[e["id"]] for e in results["examples"])
    agree = [(e["prediction"] or "unparsed") == e["teacher"] for e in results["examples"]]
    assert results["n_with_teacher"] == len(agree)
    assert results["agreement_with_teacher"] == pytest.approx(sum(agree) / len(agree))
    # the merged copy is cached: the second evaluation of the same adapter does not merge again
    assert not student_vs_teacher["merged_rebuilt"] and "merged the adapter" not in student_vs_teacher["stdout"]


@pytest.mark.slow
def test_ignore_unknown_labels_scores_the_rest_with_a_full_confusion_matrix(shared_engines, adapter, workdir):
    """A gold label outside the label set is refused (tests/test_bad_inputs.py); with --ignore_unknown_labels its row
    is dropped and counted, and the rest are scored with a confusion matrix that holds every one of them."""
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:6]]
    test_file = workdir / "unknown_labels.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in [*rows[:3], {**rows[3], "label": "English"},
                                                                     *rows[4:]]))
    output = workdir / "eval" / "unknown_labels.json"
    result = evaluate("--model_path", adapter, "--max-model-len", 1024, "--no-lingua", "--test_file", test_file,
                      "--split", "all", "--ignore_unknown_labels", "--output_file", output)
    results = json.loads(output.read_text(encoding="utf-8"))
    assert results["unknown_gold_labels_dropped"] == {"English": 1}
    assert [e["id"] for e in results["examples"]] == [row["id"] for row in rows if row["id"] != rows[3]["id"]]
    assert results["n"] == results["n_with_gold"] == sum(map(sum, results["confusion_matrix"]["matrix"])) == 5
    assert "1 rows dropped" in result.stderr


def test_constrain_labels_needs_with_prompt(tmp_path):
    result = run_main("evaluate.py", "--model_path", tmp_path, "--constrain_labels", check=False)
    assert result.returncode != 0 and "--constrain_labels applies to --with_prompt" in result.stderr


def test_a_prompt_file_whose_student_side_is_not_the_adapters_is_refused_before_loading(tmp_path):
    from distill.prompts import StudentSide
    from distill.serving import check_student
    from tests.conftest import REPO

    adapter = tmp_path / "adapter"  # a run record and an adapter config: nothing that loads
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    record = {"args": {"script": {"heldout_fraction": 0.2, "split_seed": 0}},
              "student": {"system_prompt": "Be brief.", "template": "Q: {query}\nA:"}}
    (adapter / "distill_run.json").write_text(json.dumps(record))
    check_student(adapter, StudentSide("Be brief.", "Q: {query}\nA:"))  # the adapter's own side passes
    result = run_main("evaluate.py", "--model_path", adapter, "--prompt_file", REPO / "prompts" / "in_short.md",
                      "--test_file", REPO / "example-data" / "in_short_conversations.jsonl", "--split", "all",
                      check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the model trained with the student side {'system_prompt': 'Be brief.'" in result.stderr
    # a record from before student sides stored none: the bare query, which a prompt file with a side differs from
    del record["student"]
    (adapter / "distill_run.json").write_text(json.dumps(record))
    check_student(adapter, StudentSide())
    with pytest.raises(ValueError, match="student_system_prompt / student_template"):
        check_student(adapter, StudentSide("Be brief."))
