"""The evaluated student is the trained student: training writes fingerprint.json (distill/fingerprint.py) and
evaluate.py refuses a served model that does not reproduce it. On the session's trained adapter (tests/conftest.py):
the fingerprint is the saved adapter's own log-probabilities; it passes merged and through vLLM's LoRA path (forced
on this CPU); it fails with the adapter dropped and with the chat template changed; a skip and an old adapter
without a fingerprint are recorded. The MoE student's serving paths are in tests/test_moe.py."""

import json
import shutil
from unittest import mock

import pytest

from tests.conftest import EXAMPLE_DATA, run_main

# evaluate.py on 4 held-out rows, no latency rows, no lingua: the fingerprint check is what these tests are about
QUICK = ["--test_file", EXAMPLE_DATA.relative_to(EXAMPLE_DATA.parents[1]), "--max_samples", 4,
         "--latency_requests", 0, "--no-lingua", "--quiet"]


def hf_answer_logprobs(model, probes) -> list[list[float]]:
    from distill.fingerprint import answer_logprobs

    model.eval()
    return [answer_logprobs(model, p["input_ids"], p["answer_start"], "cpu") for p in probes]


def fingerprint_of(run_dir) -> dict:
    return json.loads((run_dir / "fingerprint.json").read_text())


# ---- the check itself, no model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def made_up_fingerprint(tokenizer, dtype="float32"):
    from distill.fingerprint import probes

    made = probes(tokenizer, [("a", "Bonjour tout le monde", "fr"), ("b", "Hello there", "en")])
    return {"dtype": dtype, "probes": [{**p, "logprobs": [-1.0] * (len(p["input_ids"]) - p["answer_start"])}
                                       for p in made]}


def test_probes_hold_the_prompt_then_the_answer_and_end_of_turn(tokenizer):
    from distill.render import student_ids

    fingerprint = made_up_fingerprint(tokenizer)
    first = fingerprint["probes"][0]
    prompt = student_ids(tokenizer, "Bonjour tout le monde")
    assert first["input_ids"][: first["answer_start"]] == prompt
    assert tokenizer.decode(first["input_ids"][first["answer_start"]:]) == "fr<|im_end|>"


def test_a_template_skew_names_the_first_token_that_differs(tokenizer):
    from distill.fingerprint import FingerprintMismatch, check_ids

    fingerprint = made_up_fingerprint(tokenizer)
    prompts = [p["input_ids"][: p["answer_start"]] for p in fingerprint["probes"]]
    check_ids(fingerprint, prompts, tokenizer)  # the same ids: passes
    skewed = [list(ids) for ids in prompts]
    skewed[1][2] = tokenizer.convert_tokens_to_ids("<think>")
    with pytest.raises(FingerprintMismatch,
                       match=r"probe 'b'.*at token 2 of .*evaluation \d+ '<think>'.*chat template"):
        check_ids(fingerprint, skewed, tokenizer)
    with pytest.raises(FingerprintMismatch, match=r"at token 3 .*evaluation \(end of prompt\)"):
        check_ids(fingerprint, [prompts[0][:3], prompts[1]], tokenizer)


def test_a_conversation_probe_renders_with_the_student_side_it_trained_with(tokenizer):
    from distill.fingerprint import FingerprintMismatch, check_ids, probes
    from distill.prompts import StudentSide
    from distill.render import student_ids

    chat = [{"role": "system", "content": "A cooking app."}, {"role": "user", "content": "Can I freeze rice?"},
            {"role": "assistant", "content": "In short: yes."}, {"role": "user", "content": "How long?"}]
    student = StudentSide("Be brief.", "Q: {query}\nA:")
    fingerprint = {"probes": probes(tokenizer, [("c", chat, "A month."), ("t", "Why?", "Because.")], student)}
    queries = [p["query"] for p in fingerprint["probes"]]
    assert queries == [chat, "Why?"]
    check_ids(fingerprint, [student_ids(tokenizer, query, student) for query in queries], tokenizer)
    with pytest.raises(FingerprintMismatch, match="probe 'c'"):  # the bare student: another prompt
        check_ids(fingerprint, [student_ids(tokenizer, query) for query in queries], tokenizer)


def test_an_engine_that_does_not_stop_on_trainings_end_of_turn_fails(tokenizer):
    from distill.fingerprint import FingerprintMismatch, check_stop

    fingerprint = made_up_fingerprint(tokenizer)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    check_stop(fingerprint, {im_end, endoftext}, tokenizer)
    with pytest.raises(FingerprintMismatch, match=r"ended every answer with \d+ '<\|im_end\|>', but the served model "
                                                  r"stops only on \[\d+\] \['<\|endoftext\|>'\]"):
        check_stop(fingerprint, {endoftext}, tokenizer)


def test_logprobs_pass_within_the_dtypes_tolerance_and_fail_beyond_it_with_the_advice(tokenizer):
    from distill.fingerprint import FingerprintMismatch, compare

    fingerprint = made_up_fingerprint(tokenizer)
    served = [[lp + 0.0004 for lp in p["logprobs"]] for p in fingerprint["probes"]]
    check = compare(fingerprint, served, "float32", "advice")
    assert check.status == "passed" and check.max_abs_diff == pytest.approx(0.0004) and check.tolerance == 1e-3
    assert check.answer_tokens == sum(len(p["logprobs"]) for p in fingerprint["probes"])
    served[1][0] += 0.02  # 0.0204 off on one token of probe b
    with pytest.raises(FingerprintMismatch, match=r"up to 0.0204 .*worst probe 'b'; tolerance 0.001 .*pass --merge"):
        compare(fingerprint, served, "float32", "pass --merge_lora")
    assert compare(fingerprint, served, "bfloat16", "").tolerance == 1.0  # bf16 on either side: the coarser one
    with pytest.raises(FingerprintMismatch):
        compare(fingerprint, [[*p["logprobs"][:-1], float("nan")] for p in fingerprint["probes"]], "float32", "")
    within = [list(p["logprobs"]) for p in fingerprint["probes"]]
    assert compare(fingerprint, within, "float32", "").conclusive is None  # no base log-probabilities recorded
    for p, shift in zip(fingerprint["probes"], (0.0005, 0.0002)):
        p["base_logprobs"] = [lp + shift for lp in p["logprobs"]]
    check = compare(fingerprint, within, "float32", "")
    assert check.adapter_effect == pytest.approx(0.0005) and check.conclusive is False  # a dropped adapter passes
    fingerprint["probes"][1]["base_logprobs"][0] -= 1.0
    assert compare(fingerprint, within, "float32", "").conclusive is True


def test_a_negative_probe_count_is_refused_before_anything_loads():
    result = run_main("train_sft_trl.py", "--fingerprint_probes", "-1", check=False)
    assert result.returncode == 1 and "--fingerprint_probes -1: give a number of training rows" in result.stderr


# ---- training writes it ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_writes_the_saved_adapters_own_logprobs_which_the_adapter_moved(trained_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distill.fingerprint import TOLERANCE
    from distill.records import read_jsonl
    from distill.training import training_rows

    fingerprint = fingerprint_of(trained_run["dir"])
    probes = fingerprint["probes"]
    trained, _ = training_rows(read_jsonl(trained_run["data"]), 0.2, 0)
    assert [p["id"] for p in probes] == [row["id"] for row in trained[:8]]  # the first 8 training rows (the default)
    assert fingerprint["dtype"] == "float32"
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_logprobs = hf_answer_logprobs(base, probes)
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                        trained_run["dir"])
    for p, reloaded, before in zip(probes, hf_answer_logprobs(student, probes), base_logprobs):
        assert len(p["logprobs"]) == len(p["input_ids"]) - p["answer_start"] >= 2  # the label and the end of turn
        assert p["logprobs"] == pytest.approx(reloaded, abs=1e-5)  # the adapter on disk is the one scored
        assert p["base_logprobs"] == pytest.approx(before, abs=1e-5)  # and with the adapter off, its base
    moved = max(abs(a - b) for p, before in zip(probes, base_logprobs) for a, b in zip(p["logprobs"], before))
    assert moved > 10 * TOLERANCE["float32"], "a dropped adapter must fall outside the tolerance"
    record = json.loads((trained_run["dir"] / "distill_run.json").read_text())
    assert record["fingerprint"] == {"file": "fingerprint.json", "probes": 8, "dtype": "float32",
                                     "answer_tokens": sum(len(p["logprobs"]) for p in probes)}


# ---- evaluate.py checks it ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_merged_student_passes(trained_run, tmp_path, shared_engines):
    output = tmp_path / "merged.json"
    result = run_main("evaluate.py", "--model_path", trained_run["dir"], *QUICK, "--output_file", output)
    check = json.loads(output.read_text())["fingerprint"]
    assert check["status"] == "passed" and check["probes"] == 8 and check["served_dtype"] == "float32"
    assert check["max_abs_diff"] < check["tolerance"] == 1e-3
    assert check["conclusive"] is True and check["adapter_effect"] > 10 * check["tolerance"]
    assert "fingerprint passed: 8 probes" in result.stdout and "the adapter moves them by up to" in result.stdout
    print(f"merged, fp32 on CPU: largest difference {check['max_abs_diff']:.3g}")


@pytest.mark.slow
def test_the_student_through_vllms_lora_path_passes(trained_run, tmp_path, shared_engines):
    from distill import serving

    real = serving.serve
    output = tmp_path / "lora.json"
    # what the GPU path does (enable_lora, LoRARequest), forced here: vLLM's CPU build runs LoRA too, slowly
    with mock.patch.object(serving, "serve", lambda path, base, merge, gpu: real(path, base, merge, True)):
        result = run_main("evaluate.py", "--model_path", trained_run["dir"], *QUICK, "--output_file", output)
    results = json.loads(output.read_text())
    assert results["serving"].startswith("vLLM LoRA adapter")
    check = results["fingerprint"]
    assert check["status"] == "passed" and check["max_abs_diff"] < check["tolerance"]
    assert "fingerprint passed" in result.stdout
    print(f"vLLM LoRA, fp32 on CPU: largest difference {check['max_abs_diff']:.3g}")


@pytest.mark.slow
def test_a_dropped_adapter_fails_and_skip_fingerprint_scores_it_anyway(trained_run, tiny_model, tmp_path,
                                                                         shared_engines):
    from distill import serving

    # vLLM serving the base without the adapter (as it is reported to do with fused MoE experts)
    dropped = serving.Serving("adapter dropped", {"model": str(tiny_model)}, config_source=str(tiny_model),
                              mismatch_advice="pass --merge_lora")
    output = tmp_path / "dropped.json"
    with mock.patch.object(serving, "serve", lambda *args: dropped):
        result = run_main("evaluate.py", "--model_path", trained_run["dir"], *QUICK, "--output_file", output,
                          check=False)
        assert result.returncode == 1 and not output.exists()
        assert "the served model is not the trained student" in result.stderr
        assert "tolerance 0.001 (float32 trained, float32 served). pass --merge_lora" in result.stderr
        skipped = run_main("evaluate.py", "--model_path", trained_run["dir"], *QUICK, "--output_file", output,
                           "--skip_fingerprint")
    assert json.loads(output.read_text())["fingerprint"]["status"] == "skipped"
    assert "fingerprint" not in skipped.stderr


@pytest.mark.slow
def test_a_changed_chat_template_fails_before_a_merge_or_the_engine_naming_the_token(trained_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run["dir"], adapter, ignore=shutil.ignore_patterns("merged*"))
    template = adapter / "chat_template.jinja"
    assert template.exists(), "transformers 5 saves the template beside the tokenizer"
    # a "fixed" template that drops the empty think block from the generation prompt
    think = "'<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    template.write_text(template.read_text().replace(think, "'' }}{%- endif %}"))
    with mock.patch("distill.engine.build_llm", side_effect=AssertionError("the engine started")):
        result = run_main("evaluate.py", "--model_path", adapter, *QUICK, check=False)
    assert result.returncode == 1 and not (adapter / "merged").exists()
    assert "differs from the one training rendered at token" in result.stderr
    assert "training " in result.stderr and "'<think>'" in result.stderr and "chat template" in result.stderr


def test_an_adapter_without_fingerprint_is_a_warning_and_recorded_as_absent(tiny_model, tmp_path, capsys):
    import argparse

    import evaluate
    from transformers import AutoTokenizer

    adapter = tmp_path / "old-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # an adapter dir, made before fingerprints
    args = argparse.Namespace(model_path=str(adapter), skip_fingerprint=False)
    assert evaluate.trained_fingerprint(args, AutoTokenizer.from_pretrained(tiny_model)) is None
    assert "has no fingerprint.json (trained before fingerprints)" in capsys.readouterr().err
    assert evaluate.check_served(args, None, None, None).status == "absent"
    args.skip_fingerprint = True
    assert evaluate.check_served(args, None, None, None).status == "skipped"
