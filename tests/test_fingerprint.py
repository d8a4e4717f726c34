"""The evaluated student is the trained student: training writes fingerprint.json (distill/fingerprint.py,
docs/fingerprint.md) and evaluate.py refuses a served model that does not reproduce it. The check alone (no model):
per-probe means against a tolerance from the noise floor, an inconclusive adapter refused unless allowed, an old
fingerprint refused, greedy answers of a fixed number of forwards. On the session's trained adapter
(tests/conftest.py): the fingerprint is the saved adapter's own log-probabilities and greedy answers; it passes
through vLLM's LoRA path (forced on this CPU) and fails with the chat template changed. On an adapter trained
strongly (a few steps at a high learning rate): it passes merged, and fails with the adapter dropped and with half of
its LoRA modules zeroed. An adapter that barely moved is refused before the engine starts; a skip and an old adapter
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


def made_up_fingerprint(tokenizer, noise_floor=0.005):
    """Two probes with label answers ('fr', 'en', each then the end of turn) whose every answer token the student
    gave -1.0 (mean -1.0), and whose mean without the adapter is -3.0."""
    from distill.fingerprint import VERSION, probes, tolerance_for

    made = probes(tokenizer, [("a", "Bonjour tout le monde", "fr"), ("b", "Hello there", "en")])
    scored = [{**p, "logprobs": [-1.0] * (len(p["input_ids"]) - p["answer_start"]), "mean": -1.0, "base_mean": -3.0}
              for p in made]
    return {"version": VERSION, "dtype": "float32", "noise_floor": noise_floor,
            "tolerance": tolerance_for(noise_floor), "probes": scored}


def test_probes_hold_the_prompt_then_the_answer_and_end_of_turn(tokenizer):
    from distill.render import student_ids

    fingerprint = made_up_fingerprint(tokenizer)
    first = fingerprint["probes"][0]
    prompt = student_ids(tokenizer, "Bonjour tout le monde")
    assert first["input_ids"][: first["answer_start"]] == prompt
    assert tokenizer.decode(first["input_ids"][first["answer_start"]:]) == "fr<|im_end|>"
    assert first["end_of_turn"] == tokenizer.convert_tokens_to_ids("<|im_end|>") and first["source"] == "training"


def test_on_policy_probes_are_the_queries_prompts_without_an_answer(tokenizer):
    from distill.fingerprint import probes, query_probes

    rows = [{"id": "q1", "text": "Why is the sky blue?"}, {"id": "q2", "text": "Can I freeze rice?"},
            {"id": "q3", "text": "Not a probe."}]
    made = query_probes(tokenizer, rows, 2)
    with_answers = probes(tokenizer, [("q1", "Why is the sky blue?", "x"), ("q2", "Can I freeze rice?", "x")])
    assert [p["id"] for p in made] == ["q1", "q2"] and all(p["answer"] is None for p in made)
    for p, reference in zip(made, with_answers):  # `record` gives each the student's greedy answer
        prompt = reference["input_ids"][: reference["answer_start"]]
        assert p["input_ids"] == prompt and p["answer_start"] == len(prompt)
        assert p["end_of_turn"] == reference["end_of_turn"]


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
    fingerprint["probes"][1]["input_ids"][-1] = 7  # a greedy answer cut at its length ends on any token
    check_stop(fingerprint, {im_end, endoftext}, tokenizer)
    with pytest.raises(FingerprintMismatch, match=r"ended every answer with \d+ '<\|im_end\|>', but the served model "
                                                  r"stops only on \[\d+\] \['<\|endoftext\|>'\]"):
        check_stop(fingerprint, {endoftext}, tokenizer)


def test_each_probes_mean_must_stay_within_the_tolerance_the_noise_floor_sets(tokenizer):
    from distill.fingerprint import FLOOR_MULTIPLE, MIN_TOLERANCE, FingerprintMismatch, compare

    fingerprint = made_up_fingerprint(tokenizer, noise_floor=0.005)
    limit = FLOOR_MULTIPLE * 0.005 + MIN_TOLERANCE
    assert fingerprint["tolerance"] == pytest.approx(limit) and FLOOR_MULTIPLE > 1 and MIN_TOLERANCE > 0
    # every token off by 0.2 either way: the means agree (the noise of one token is not the model's answer)
    served = [[lp + (0.2 if i % 2 else -0.2) for i, lp in enumerate(p["logprobs"][:2])] + p["logprobs"][2:]
              for p in fingerprint["probes"]]
    check = compare(fingerprint, served, "bfloat16", "advice")
    assert check.status == "passed" and check.max_abs_diff == pytest.approx(0, abs=1e-12)
    assert check.tolerance == pytest.approx(limit) and check.noise_floor == 0.005 and check.served_dtype == "bfloat16"
    assert check.answer_tokens == sum(len(p["logprobs"]) for p in fingerprint["probes"])
    assert check.adapter_effect == 2.0 and check.conclusive is True and check.allow_inconclusive is False
    off = [list(p["logprobs"]) for p in fingerprint["probes"]]
    off[1] = [lp - 1.5 * limit for lp in off[1]]  # probe b's mean 1.5 tolerances off
    with pytest.raises(FingerprintMismatch, match=rf"up to {1.5 * limit:.4g} .*worst probe 'b' \(training answer\); "
                                                  rf"tolerance {limit:.3g} \(4 x the noise floor 0.005 \+ 0.01; "
                                                  r"float32 trained, float32 served\)\. pass --merge"):
        compare(fingerprint, off, "float32", "pass --merge_lora")
    off[1] = [lp + 0.5 * limit for lp in fingerprint["probes"][1]["logprobs"]]
    assert compare(fingerprint, off, "float32", "").max_abs_diff == pytest.approx(0.5 * limit)
    with pytest.raises(FingerprintMismatch):
        compare(fingerprint, [[*p["logprobs"][:-1], float("nan")] for p in fingerprint["probes"]], "float32", "")


def test_an_adapter_that_moves_no_probe_beyond_the_tolerance_is_refused_unless_allowed(tokenizer, capsys):
    from distill.fingerprint import FingerprintMismatch, check_conclusive, compare

    fingerprint = made_up_fingerprint(tokenizer)  # the adapter moves each probe's mean by 2.0: conclusive
    check_conclusive(fingerprint, allow_inconclusive=False)
    for p, shift in zip(fingerprint["probes"], (0.5, 0.8)):
        p["base_mean"] = p["mean"] - shift * fingerprint["tolerance"]  # within the tolerance: a dropped adapter passes
    with pytest.raises(FingerprintMismatch, match=r"inconclusive: the adapter moves .* by at most .*within the "
                                                  r"tolerance .*--allow_inconclusive"):
        check_conclusive(fingerprint, allow_inconclusive=False)
    check_conclusive(fingerprint, allow_inconclusive=True)
    assert "inconclusive" in capsys.readouterr().err
    check = compare(fingerprint, [p["logprobs"] for p in fingerprint["probes"]], "float32", "", True)
    assert check.conclusive is False and check.allow_inconclusive is True
    assert check.adapter_effect == pytest.approx(0.8 * fingerprint["tolerance"])
    for p in fingerprint["probes"]:
        del p["base_mean"]  # a model trained without an adapter: no base to fall back to, nothing to conclude
    check_conclusive(fingerprint, allow_inconclusive=False)
    assert compare(fingerprint, [p["logprobs"] for p in fingerprint["probes"]], "float32", "").conclusive is None


def test_a_fingerprint_from_before_the_noise_floor_is_refused_naming_the_fix(tmp_path):
    from distill.fingerprint import FingerprintMismatch, load

    assert load(tmp_path) is None
    (tmp_path / "fingerprint.json").write_text(json.dumps({"dtype": "float32", "probes": []}))
    with pytest.raises(FingerprintMismatch, match="written before version 2 .*train the adapter again, or pass "
                                                  "--skip_fingerprint"):
        load(tmp_path)


class ScriptedModel:
    """Answers like a causal LM on its KV cache, a batch at a time: each row's logits at the last position have their
    argmax at the row's next token of its `script`; keeps what it was given at every step."""

    def __init__(self, scripts, vocab=16):
        self.scripts, self.vocab, self.inputs = scripts, vocab, []

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, output_router_logits):
        from types import SimpleNamespace

        import torch

        assert use_cache and (past_key_values is None) == (not self.inputs)
        step = len(self.inputs)
        self.inputs.append((input_ids.tolist(), attention_mask.tolist(), position_ids.tolist()))
        logits = torch.zeros(len(self.scripts), input_ids.shape[1], self.vocab)
        for row, script in enumerate(self.scripts):
            logits[row, -1, script[step % len(script)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=f"cache of step {step}")


def test_greedy_answers_run_every_step_in_one_batch_and_are_cut_after_the_end_of_turn():
    from distill.fingerprint import GREEDY_TOKENS, greedy_answers

    model = ScriptedModel([[5, 7, 2, 9], [6, 8]])  # 2 is the end of turn; the second answer never ends
    answers = greedy_answers(model, [[1, 1, 1], [4]], 2, "cpu")
    assert answers == [[5, 7, 2], [6, 8] * (GREEDY_TOKENS // 2)]
    # every step runs, after the first answer has ended too: under FSDP every rank runs as many forwards
    assert len(model.inputs) == GREEDY_TOKENS
    ids, mask, positions = model.inputs[0]  # the prompts, left-padded (the pads masked, positions from 0 at each)
    assert ids == [[1, 1, 1], [2, 2, 4]] and mask == [[1, 1, 1], [0, 0, 1]] and positions == [[0, 1, 2], [0, 0, 0]]
    ids, mask, positions = model.inputs[1]  # then one token a row on the cache
    assert ids == [[5], [6]] and mask == [[1, 1, 1, 1], [0, 0, 1, 1]] and positions == [[3], [1]]


def test_float32_linears_compute_a_bf16_linear_in_fp32_under_bf16_autocast():
    import torch

    from distill.fingerprint import float32_linears

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = linear(x)
        with float32_linears():
            upcast = linear(x)
    expected = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert plain.dtype == torch.bfloat16 and upcast.dtype == torch.float32
    assert torch.equal(upcast, expected) and not torch.equal(plain.float(), expected)
    assert linear(x).dtype == torch.bfloat16  # the context is gone


def test_the_noise_floor_is_fp32_against_bf16_whichever_precision_the_model_trained_in(tiny_model, tokenizer,
                                                                                         tmp_path):
    """record() on the same adapter in fp32 weights (its other side: bf16 autocast), in bf16 weights and in fp32
    under bf16 autocast, as accelerate's mixed precision runs it (both: float32_linears)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distill.fingerprint import probes, record

    def student(dtype):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)  # LoRA B starts at zero: an adapter that moves its answers
        return model

    rows = probes(tokenizer, [("a", "Bonjour tout le monde", "fr"), ("b", "Hello there, how are you?", "en")])
    autocast = student(torch.float32)
    autocast.forward = torch.autocast("cpu", dtype=torch.bfloat16)(autocast.forward)  # as accelerate wraps it
    floors = {}
    for name, model, dtype in [("fp32", student(torch.float32), None), ("bf16", student(torch.bfloat16), None),
                               ("autocast", autocast, "bfloat16")]:
        out = tmp_path / name
        out.mkdir()
        summary = record(model, rows, out, "cpu", True, dtype, model, tokenizer)
        fingerprint = fingerprint_of(out)
        other = "bfloat16" if name == "fp32" else "float32"
        assert fingerprint["dtype"] == ("float32" if name == "fp32" else "bfloat16")
        assert all(f"{other}_mean" in p for p in fingerprint["probes"]) and summary["conclusive"] is True
        assert [p["source"] for p in fingerprint["probes"]] == ["training", "training", "greedy", "greedy"]
        floors[name] = fingerprint["noise_floor"]
    # one model's rounding, measured three ways: each above zero and within a few times the others
    assert all(floor > 0 for floor in floors.values())
    assert max(floors.values()) < 4 * min(floors.values()), floors
    print(f"noise floors on the tiny model, random adapter: {floors}")


def test_a_negative_probe_count_is_refused_before_anything_loads():
    result = run_main("train_sft_trl.py", "--fingerprint_probes", "-1", check=False)
    assert result.returncode == 1 and "--fingerprint_probes -1: give a number of training rows" in result.stderr


# ---- training writes it ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_writes_the_saved_adapters_own_greedy_answers_and_logprobs(trained_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distill.fingerprint import GREEDY_TOKENS, mean, tolerance_for
    from distill.records import read_jsonl
    from distill.training import training_rows

    fingerprint = fingerprint_of(trained_run["dir"])
    probes = fingerprint["probes"]
    trained, _ = training_rows(read_jsonl(trained_run["data"]), 0.2, 0)
    first_rows = [row["id"] for row in trained[:8]]  # the first 8 training rows (the default)
    assert [p["id"] for p in probes] == first_rows * 2
    assert [p["source"] for p in probes] == ["training"] * 8 + ["greedy"] * 8
    assert fingerprint["dtype"] == "float32" and fingerprint["version"] == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                        trained_run["dir"]).eval()
    for p, reloaded, before in zip(probes, hf_answer_logprobs(student, probes), hf_answer_logprobs(base, probes)):
        assert len(p["logprobs"]) == len(p["input_ids"]) - p["answer_start"] >= 1
        assert p["logprobs"] == pytest.approx(reloaded, abs=1e-5)  # the adapter on disk is the one scored
        assert p["base_logprobs"] == pytest.approx(before, abs=1e-5)  # and with the adapter off, its base
        assert p["mean"] == pytest.approx(mean(reloaded), abs=1e-5)
    for training_probe, greedy in zip(probes[:8], probes[8:]):
        # the same prompt, answered by the saved adapter itself: each answer token is its argmax there, and the
        # answer stops at the end-of-turn token or runs the full GREEDY_TOKENS
        start = greedy["answer_start"]
        assert greedy["input_ids"][:start] == training_probe["input_ids"][: training_probe["answer_start"]]
        answer = greedy["input_ids"][start:]
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([greedy["input_ids"]])).logits[0, start - 1: -1]
        chosen = logits.gather(-1, torch.tensor(answer)[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).abs().max() < 1e-4  # greedy (on the KV cache: a tie may differ)
        assert answer.count(greedy["end_of_turn"]) <= 1
        assert greedy["ended"] == (answer[-1] == greedy["end_of_turn"])
        assert greedy["ended"] or len(answer) == GREEDY_TOKENS
    # the noise floor: the saved adapter's probe means in fp32 (as trained) against bf16 autocast, measured again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = hf_answer_logprobs(student, probes)
    floor = max(abs(p["mean"] - mean(b)) for p, b in zip(probes, bf16))
    assert [p["bfloat16_mean"] for p in probes] == pytest.approx([mean(b) for b in bf16], abs=1e-5)
    assert 0 < fingerprint["noise_floor"] == pytest.approx(floor, rel=0.01)
    assert fingerprint["tolerance"] == pytest.approx(tolerance_for(floor), rel=0.01)
    record = json.loads((trained_run["dir"] / "distill_run.json").read_text())
    effect = max(abs(p["mean"] - p["base_mean"]) for p in probes)
    assert record["fingerprint"] == {
        "file": "fingerprint.json", "probes": 16, "greedy_probes": 8, "dtype": "float32",
        "answer_tokens": sum(len(p["logprobs"]) for p in probes), "noise_floor": fingerprint["noise_floor"],
        "tolerance": fingerprint["tolerance"], "adapter_effect": effect, "conclusive": True}
    print(f"2-step adapter: noise floor {floor:.3g}, tolerance {fingerprint['tolerance']:.3g}, effect {effect:.3g}")


# ---- evaluate.py checks it ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strong_run(tiny_model, example_rows, tmp_path_factory):
    """An adapter trained hard enough that its own greedy answers move (4 steps of recipes/cpu.yaml at lr 1e-2):
    2026-12-07 it moves its probes' means by up to 0.83 against a tolerance of 0.017."""
    from tests.conftest import write_teacher_file

    work = tmp_path_factory.mktemp("strong")
    data = write_teacher_file(work / "teacher.jsonl", example_rows)
    run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_model,
             "--dataset_name", data, "--output_dir", work / "run", "--report_to", "none", "--max_steps", 4,
             "--learning_rate", 1e-2)
    return work / "run"


def refused_by(stderr: str) -> float:
    """The largest per-probe difference a refusal names."""
    import re

    return float(re.search(r"differs from training's by up to ([0-9.e+-]+) ", stderr).group(1))


@pytest.mark.slow
def test_the_merged_student_passes(strong_run, tmp_path, shared_engines):
    output = tmp_path / "merged.json"
    result = run_main("evaluate.py", "--model_path", strong_run, *QUICK, "--output_file", output)
    check = json.loads(output.read_text())["fingerprint"]
    assert check["status"] == "passed" and check["probes"] == 16 and check["served_dtype"] == "float32"
    assert check["max_abs_diff"] < check["tolerance"] / 100  # fp32 both sides: 5e-7 measured
    assert check["conclusive"] is True and check["adapter_effect"] > 10 * check["tolerance"]
    assert check["allow_inconclusive"] is False
    assert "fingerprint passed: 16 probes" in result.stdout and "the adapter moves them by up to" in result.stdout
    print(f"merged, fp32 on CPU: largest difference {check['max_abs_diff']:.3g}, tolerance {check['tolerance']:.3g}, "
          f"adapter effect {check['adapter_effect']:.3g}")


@pytest.mark.slow
def test_an_adapter_with_half_its_lora_modules_zeroed_is_refused(strong_run, tmp_path, shared_engines):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "half"
    shutil.copytree(strong_run, adapter, ignore=shutil.ignore_patterns("merged*"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    modules = sorted(name.removesuffix(".lora_B.weight") for name in tensors if name.endswith(".lora_B.weight"))
    assert len(modules) >= 8
    for module in modules[::2]:  # every other module's LoRA B zeroed: that module adds nothing
        tensors[f"{module}.lora_B.weight"] = torch.zeros_like(tensors[f"{module}.lora_B.weight"])
    save_file(tensors, adapter / "adapter_model.safetensors")
    output = tmp_path / "half.json"
    result = run_main("evaluate.py", "--model_path", adapter, *QUICK, "--output_file", output, check=False)
    assert result.returncode == 1 and not output.exists()
    assert "error: fingerprint: the served model is not the trained student" in result.stderr
    tolerance = fingerprint_of(strong_run)["tolerance"]
    assert refused_by(result.stderr) > 5 * tolerance  # 0.58 against 0.017 on 2026-12-07
    print(f"half the LoRA modules zeroed: refused at {refused_by(result.stderr):.3g}, tolerance {tolerance:.3g}")


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
    assert check["status"] == "passed" and check["max_abs_diff"] < check["tolerance"] / 100
    assert "fingerprint passed" in result.stdout
    print(f"vLLM LoRA, fp32 on CPU: largest difference {check['max_abs_diff']:.3g}")


@pytest.mark.slow
def test_a_dropped_adapter_fails_and_skip_fingerprint_scores_it_anyway(strong_run, tiny_model, tmp_path,
                                                                         shared_engines):
    from distill import serving

    # vLLM serving the base without the adapter (as it is reported to do with fused MoE experts)
    dropped = serving.Serving("adapter dropped", {"model": str(tiny_model)}, config_source=str(tiny_model),
                              mismatch_advice="pass --merge_lora")
    output = tmp_path / "dropped.json"
    with mock.patch.object(serving, "serve", lambda *args: dropped):
        result = run_main("evaluate.py", "--model_path", strong_run, *QUICK, "--output_file", output, check=False)
        assert result.returncode == 1 and not output.exists()
        assert "the served model is not the trained student" in result.stderr
        assert "float32 trained, float32 served). pass --merge_lora" in result.stderr
        assert refused_by(result.stderr) > 10 * fingerprint_of(strong_run)["tolerance"]
        skipped = run_main("evaluate.py", "--model_path", strong_run, *QUICK, "--output_file", output,
                           "--skip_fingerprint")
    assert json.loads(output.read_text())["fingerprint"]["status"] == "skipped"
    assert "fingerprint" not in skipped.stderr


@pytest.mark.slow
def test_an_adapter_that_barely_moved_is_refused_before_the_engine_starts(tiny_model, gold_teacher_file, tmp_path):
    import argparse

    from transformers import AutoTokenizer

    import evaluate

    adapter = tmp_path / "barely"
    run_main("train_sft_trl.py", "--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_model,
             "--dataset_name", gold_teacher_file, "--output_dir", adapter, "--report_to", "none", "--max_steps", 2,
             "--learning_rate", 1e-7)  # step 1 is cpu.yaml's warm-up (lr 0: a run that trains nothing fails)
    record = json.loads((adapter / "distill_run.json").read_text())["fingerprint"]
    assert record["conclusive"] is False and record["adapter_effect"] < record["tolerance"] / 100
    with mock.patch("distill.engine.build_llm", side_effect=AssertionError("the engine started")):
        result = run_main("evaluate.py", "--model_path", adapter, *QUICK, check=False)
    assert result.returncode == 1 and not (adapter / "merged").exists()
    assert "error: fingerprint: inconclusive: the adapter moves its probes' mean answer log-probability by at " \
           "most" in result.stderr and "--allow_inconclusive" in result.stderr
    args = argparse.Namespace(model_path=str(adapter), skip_fingerprint=False, allow_inconclusive=True)
    assert evaluate.trained_fingerprint(args, AutoTokenizer.from_pretrained(adapter))["probes"]


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

    from transformers import AutoTokenizer

    import evaluate

    adapter = tmp_path / "old-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # an adapter dir, made before fingerprints
    args = argparse.Namespace(model_path=str(adapter), skip_fingerprint=False, allow_inconclusive=False)
    assert evaluate.trained_fingerprint(args, AutoTokenizer.from_pretrained(tiny_model)) is None
    assert "has no fingerprint.json (trained before fingerprints)" in capsys.readouterr().err
    assert evaluate.check_served(args, None, None, None).status == "absent"
    args.skip_fingerprint = True
    assert evaluate.check_served(args, None, None, None).status == "skipped"
