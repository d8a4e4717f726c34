"""Stage 2 (train_sft_trl.py, train_trl.sh): the loss mask, what a run writes, resuming, overwriting, the held-out
split, config errors and the launchers. Everything trains the random tiny Qwen3 on CPU for a few steps."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli, run_main, write_teacher_file

IM_END = "<|im_end|>"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def train_args(model, data, output_dir, *extra):
    return ["--config", "recipes/cpu.yaml", "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(output_dir), "--report_to", "none", *map(str, extra)]


def build(model, data, output_dir, *extra):
    """The trainer and the run record's counts, built in this process as train_sft_trl.main builds them."""
    import train_sft_trl
    from distill import sft_setup

    args = train_sft_trl.parse_args(train_args(model, data, output_dir, "--max_steps", 2, *extra))
    prepared = sft_setup.prepare(*args)
    return sft_setup.build_trainer(*args, prepared), prepared.counts


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_example(tokenizer, input_ids, labels):
    """(decoded masked part, decoded unmasked part, user text) of one tokenized row."""
    input_ids, labels = list(input_ids), list(labels)
    prompt = tokenizer.decode([i for i, lab in zip(input_ids, labels) if lab == -100])
    answer = tokenizer.decode([i for i, lab in zip(input_ids, labels) if lab != -100])
    user = prompt.split("<|im_start|>user\n", 1)[1].split(IM_END, 1)[0]
    return prompt, answer, user


# --- the loss mask ---------------------------------------------------------------------------------------------


def test_collated_batch_masks_all_but_answer_and_end_of_turn(tiny_model, gold_teacher_file, tmp_path, example_rows):
    trainer, _ = build(tiny_model, gold_teacher_file, tmp_path / "out", "--padding_free", "false", "--max_length", 256)
    tokenizer = trainer.processing_class
    label_of = {row["text"]: row["label"] for row in example_rows}
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[0] == 8  # per_device_train_batch_size of recipes/cpu.yaml
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    for input_ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        kept = (labels != -100).nonzero().flatten().tolist()
        length = int(attention.sum())
        # the unmasked tokens are one contiguous run that ends the real (unpadded) sequence with <|im_end|>
        assert kept == list(range(kept[0], length)), "loss must cover exactly the tail: answer + end of turn"
        assert int(input_ids[length - 1]) == im_end
        assert (labels[kept] == input_ids[kept]).all()
        assert (labels[length:] == -100).all(), "padding carries no loss"
        prompt, answer, user = split_example(tokenizer, input_ids[:length], labels[:length])
        assert answer == f"{label_of[user]}{IM_END}"
        # the template, the user's text and the empty think block are all in the masked part
        assert prompt.startswith("<|im_start|>user\n")
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert user in label_of


def test_padding_free_batch_masks_all_but_answer_and_end_of_turn(tiny_model, gold_teacher_file, tmp_path,
                                                                 example_rows):
    """recipes/cpu.yaml trains padding-free: one row holding the batch's sequences, position_ids restarting at 0."""
    trainer, _ = build(tiny_model, gold_teacher_file, tmp_path / "out")
    assert trainer.args.padding_free
    tokenizer = trainer.processing_class
    label_of = {row["text"]: row["label"] for row in example_rows}
    batch = next(iter(trainer.get_train_dataloader()))
    input_ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    assert len(starts) - 1 == 8  # the recipe's batch of 8 sequences, packed into one row
    for start, end in zip(starts, starts[1:]):
        prompt, answer, user = split_example(tokenizer, input_ids[start:end], labels[start:end])
        assert answer == f"{label_of[user]}{IM_END}"
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_smollm2_mask_covers_only_answer_despite_default_system_prompt():
    if not (SMOLLM2 / "tokenizer.json").exists():
        pytest.skip(f"{SMOLLM2} is not built (make setup)")
    from transformers import AutoTokenizer

    from distill.render import student_example, student_ids

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    query = "Je voudrais un café, s'il vous plaît."
    row = student_example(tokenizer, query, "fr")
    assert len(row["input_ids"]) == len(row["completion_mask"])
    answer_ids = [i for i, m in zip(row["input_ids"], row["completion_mask"]) if m]
    prompt_ids = [i for i, m in zip(row["input_ids"], row["completion_mask"]) if not m]
    assert tokenizer.decode(answer_ids) == f"fr{IM_END}"
    assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * len(answer_ids)
    prompt = tokenizer.decode(prompt_ids)
    assert "You are a helpful AI assistant named SmolLM" in prompt  # the template's default system prompt: masked
    assert query in prompt and prompt.endswith("<|im_start|>assistant\n")
    # the student's input at training time is token for token what evaluation feeds it
    assert prompt_ids == student_ids(tokenizer, query)


def test_a_conversation_trains_on_its_new_answer_with_the_student_side_of_stage_1(tiny_model, tmp_path):
    """A stage-1 row of a conversation: the loss covers only its last assistant turn; the earlier turns, the row's
    own system turn and the student side stage 1's run record names make up the prompt, as evaluation renders it."""
    import train_sft_trl
    from distill import sft_setup
    from distill.prompts import StudentSide
    from distill.records import output_paths
    from distill.render import student_ids
    from distill.splits import select

    chat = [{"role": "system", "content": "A cooking app."}, {"role": "user", "content": "Can I freeze rice?"},
            {"role": "assistant", "content": "In short: yes."}, {"role": "user", "content": "How long?"}]
    rows = [{"id": f"c{i}", "group": f"g{i}", "messages": chat + [{"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(12)]
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    student = StudentSide("Be brief.", "Q: {query}\nA:")
    output_paths(str(data))[2].write_text(json.dumps({"student": student.to_dict()}))  # stage 1's run record
    args = train_sft_trl.parse_args(train_args(tiny_model, data, tmp_path / "out", "--max_steps", 1))
    prepared = sft_setup.prepare(*args)
    tokenizer = prepared.tokenizer
    train = select(rows, "train")
    assert len(prepared.examples) == len(train) > 0
    for row, example in zip(train, prepared.examples):
        answer = [i for i, keep in zip(example["input_ids"], example["completion_mask"]) if keep]
        prompt = example["input_ids"][: example["completion_mask"].index(1)]
        assert tokenizer.decode(answer) == row["messages"][-1]["content"] + IM_END
        assert prompt == student_ids(tokenizer, chat, student)  # what evaluate.py feeds the student
        assert tokenizer.decode(prompt).startswith("<|im_start|>system\nBe brief.\n\nA cooking app.<|im_end|>")
        assert "In short: yes." in tokenizer.decode(prompt) and "Q: How long?\nA:" in tokenizer.decode(prompt)
    assert prepared.student == {"student": student.to_dict(), "system_merged_into_user": False}
    assert prepared.probes[0]["query"] == chat  # the fingerprint renders the whole conversation too


# --- a real CLI run ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_run_trains_adapter_only(trained_run, tiny_model):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = trained_run["dir"]
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter), "the adapter file holds LoRA weights only"
    lora_b = [tensor for key, tensor in adapter.items() if "lora_B" in key]
    assert lora_b and any(tensor.abs().max() > 0 for tensor in lora_b), "LoRA B starts at zero: training moved it"

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 16
    targeted = {module.rsplit(".", 1)[-1] for module in config["target_modules"]}
    assert targeted >= ALL_LINEAR
    assert {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in adapter} >= ALL_LINEAR

    # the base is untouched: on disk, and as the weights under the loaded adapter
    assert sha256(tiny_model / "model.safetensors") == trained_run["model_hash_before"]
    base_weights = load_file(tiny_model / "model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), out)
    compared = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param.detach(), base_weights[key]), key
        compared += 1
    assert compared >= len(base_weights) - 1  # every base tensor (lm_head is tied to the embeddings)
    assert (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_cli_run_record(trained_run, example_rows):
    from distill.splits import select

    record = json.loads((trained_run["dir"] / "distill_run.json").read_text())
    assert record["status"] == "finished"
    assert record["stage"] == "train_sft_trl"
    heldout = len(select(example_rows, "heldout"))
    batch = record["counts"].pop("batch")
    assert record["counts"] == {"rows_in_file": len(example_rows), "heldout_rows_dropped": heldout,
                                "rows_used": len(example_rows) - heldout, "answer_source": "assistant turn (teacher)"}
    assert batch["world_size"] == 1 and batch["global_batch"] == batch["micro_batch"] == 8
    assert record["split"] == {"heldout_fraction": 0.2, "split_seed": 0}
    assert record["saved"]["adapter_tensors"] == 14 * 2 and record["saved"]["max_abs_lora_b"] > 0  # 2 layers x 7
    assert record["memory_plan"]["trainable_parameters"]["router"] == 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert record["git_revision"].startswith(head) and head
    assert "train_sft_trl.py" in record["command"] and "--max_steps 2" in record["command"]
    assert record["args"]["script"]["dataset_name"] == str(trained_run["data"])
    assert record["args"]["training"]["max_steps"] == 2
    assert record["args"]["training"]["learning_rate"] == pytest.approx(1e-3)  # from recipes/cpu.yaml
    assert record["train_metrics"]["train_loss"] > 0
    assert record["log_history"][-1]["step"] == 2
    assert "held-out rows dropped" in trained_run["stdout"]


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tiny_model, gold_teacher_file, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model, gold_teacher_file, out, "--max_steps", 4, "--save_strategy", "steps",
                      "--save_steps", 2, "--logging_steps", 1)
    run_main("train_sft_trl.py", *args)
    reference = {h["step"]: h for h in json.loads((out / "distill_run.json").read_text())["log_history"] if "loss" in h}
    assert sorted(reference) == [1, 2, 3, 4]

    # Crash after step 2: only checkpoint-2 survives and the run record still says "running".
    shutil.rmtree(out / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    record = json.loads((out / "distill_run.json").read_text())
    (out / "distill_run.json").write_text(json.dumps({**record, "status": "running"}))
    # Mark the checkpoint's state so the resumed run's history shows it was loaded, not recomputed.
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["global_step"] == 2
    state["log_history"][-1]["from_checkpoint"] = True
    state_file.write_text(json.dumps(state))

    run_main("train_sft_trl.py", *args, "--resume_from_checkpoint", out / "checkpoint-2")
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished"
    steps = [h for h in record["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4], "steps 1-2 come from the checkpoint, 3-4 are new"
    assert steps[1].get("from_checkpoint") is True, "the history was restarted instead of resumed"
    for h in steps[2:]:  # weights, optimizer, scheduler and data order all continue where they stopped
        assert h["loss"] == pytest.approx(reference[h["step"]]["loss"], rel=1e-4)
        assert h["learning_rate"] == pytest.approx(reference[h["step"]]["learning_rate"], abs=1e-9)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("value", ["true", "last"])
def test_resume_true_means_last_checkpoint(value):
    import train_sft_trl

    _, training_args, _ = train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--resume_from_checkpoint", value])
    assert training_args.resume_from_checkpoint is True


@pytest.mark.slow
def test_refuses_to_overwrite_finished_run(trained_run, tiny_model, gold_teacher_file, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run["dir"], out)
    (out / "marker.txt").write_text("from the finished run")
    args = train_args(tiny_model, gold_teacher_file, out, "--max_steps", 2)  # 1 would be all warm-up: untrained
    refused = run_main("train_sft_trl.py", *args, check=False)
    assert refused.returncode != 0
    assert "finished run" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "marker.txt").exists() and sha256(out / "adapter_model.safetensors") == sha256(
        trained_run["dir"] / "adapter_model.safetensors")

    run_main("train_sft_trl.py", *args, "--overwrite")
    assert not (out / "marker.txt").exists(), "--overwrite replaces the old run"
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished" and record["args"]["training"]["max_steps"] == 2


# --- the split and the answer source ------------------------------------------------------------------------


def test_heldout_rows_never_reach_trainer(tiny_model, gold_teacher_file, tmp_path, example_rows):
    from distill.records import read_jsonl
    from distill.splits import select

    trainer, counts = build(tiny_model, gold_teacher_file, tmp_path / "out")
    tokenizer = trainer.processing_class
    queries = [split_example(tokenizer, ex["input_ids"], ex["labels"])[2] for ex in trainer.train_dataset]
    rows = read_jsonl(gold_teacher_file)
    heldout = select(rows, "heldout")
    heldout_texts = {row["messages"][0]["content"] for row in heldout}
    train_texts = {row["messages"][0]["content"] for row in select(rows, "train")}
    assert heldout_texts and not heldout_texts & set(queries)
    assert set(queries) == train_texts and len(queries) == len(train_texts)
    assert counts["heldout_rows_dropped"] == len(heldout)
    assert counts["rows_used"] == len(queries) == len(rows) - len(heldout)
    # the same split evaluate.py applies to the test file
    assert {row["id"] for row in heldout} == {row["id"] for row in select(example_rows, "heldout")}


def test_answer_field_label_trains_on_gold_column(tiny_model, example_rows, tmp_path):
    # The teacher says "zz" everywhere; --answer_field label must train on the gold column instead.
    data = write_teacher_file(tmp_path / "teacher.jsonl", example_rows, answer=lambda row: "zz")
    label_of = {row["text"]: row["label"] for row in example_rows}

    trainer, counts = build(tiny_model, data, tmp_path / "gold", "--answer_field", "label")
    tokenizer = trainer.processing_class
    answers = [split_example(tokenizer, ex["input_ids"], ex["labels"]) for ex in trainer.train_dataset]
    assert all(answer == f"{label_of[user]}{IM_END}" for _, answer, user in answers)
    assert len({answer for _, answer, _ in answers}) == len(set(label_of.values()))
    assert counts["answer_source"] == "label"
    assert trainer.args.run_name.endswith("-gold")

    trainer, counts = build(tiny_model, data, tmp_path / "teacher")
    tokenizer = trainer.processing_class
    assert {split_example(tokenizer, ex["input_ids"], ex["labels"])[1] for ex in trainer.train_dataset} == {
        f"zz{IM_END}"}
    assert counts["answer_source"] == "assistant turn (teacher)"


# --- configuration errors -------------------------------------------------------------------------------------


def test_unknown_yaml_key_is_an_error(tmp_path):
    import train_sft_trl

    config = tmp_path / "recipe.yaml"
    config.write_text((REPO / "recipes" / "cpu.yaml").read_text() + "learning_rat: 1.0e-4\n")
    with pytest.raises((ValueError, SystemExit), match="learning_rat"):
        train_sft_trl.parse_args(["--config", str(config)])
    result = run_main("train_sft_trl.py", "--config", config, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode != 0 and "learning_rat" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_cli_flag_is_an_error():
    import train_sft_trl

    with pytest.raises((ValueError, SystemExit), match="--learning_rates"):
        train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--learning_rates", "1e-4"])
    with pytest.raises((ValueError, SystemExit), match="--no_such_flag"):
        train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--no_such_flag"])


def test_flags_override_recipe():
    import train_sft_trl

    script, training, model = train_sft_trl.parse_args(
        ["--config", "recipes/cpu.yaml", "--learning_rate", "5e-4", "--lora_r", "8", "--answer_field", "label"])
    assert training.learning_rate == pytest.approx(5e-4) and model.lora_r == 8
    assert training.per_device_train_batch_size == 8 and model.lora_alpha == 16  # still from the recipe
    assert script.answer_field == "label"
    assert training.run_name == "SmolLM2-135M-Instruct-r8-lr0.0005-bs8-gold"  # cpu.yaml: 8 rows x 1 step x 1 process


@pytest.mark.parametrize("world_size, accumulation", [(1, 16), (2, 8), (8, 2)])
def test_global_batch_is_the_recipes_at_any_world_size(monkeypatch, world_size, accumulation):
    import train_sft_trl

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    _, training, _ = train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--global_batch_size", "128"])
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size == 128
    assert training.gradient_accumulation_steps == accumulation
    assert "-bs128" in training.run_name


def test_run_name_counts_every_process_without_a_global_batch(monkeypatch):
    import train_sft_trl

    monkeypatch.setenv("WORLD_SIZE", "4")
    _, training, _ = train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--gradient_accumulation_steps", "2"])
    assert training.run_name.endswith("-bs64")  # 8 rows x 2 steps x 4 processes


def test_a_global_batch_that_does_not_divide_is_refused(monkeypatch, capsys):
    import train_sft_trl

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--global_batch_size", "128"])
    assert "does not split evenly over 3 processes" in capsys.readouterr().err


def test_micro_batch_from_a_token_budget():
    from distill.training import derive_batch, micro_batch_for_tokens

    assert micro_batch_for_tokens(128, 75.0, 8192) == 64  # 64 x 75 = 4,800 tokens; 128 x 75 would be 9,600
    assert micro_batch_for_tokens(16, 75.0, 4096) == 16
    assert micro_batch_for_tokens(128, 300.0, 8192) == 16  # 27 rows would fit, but 16 is the largest divisor
    assert micro_batch_for_tokens(128, 9000.0, 8192) == 1
    assert derive_batch(128, 2, 16) == 4
    with pytest.raises(ValueError, match="does not divide"):
        derive_batch(128, 1, 48)


def test_micro_batch_tokens_sets_micro_batch_and_keeps_the_global_batch(tiny_model, gold_teacher_file, tmp_path):
    trainer, counts = build(tiny_model, gold_teacher_file, tmp_path / "out", "--global_batch_size", 32,
                            "--micro_batch_tokens", 1000)
    batch = counts["batch"]
    expected = max(d for d in (1, 2, 4, 8, 16, 32) if d * batch["mean_row_tokens"] <= 1000)
    assert batch["micro_batch"] == trainer.args.per_device_train_batch_size == expected
    assert batch["micro_batch"] * trainer.args.gradient_accumulation_steps == 32 == batch["global_batch"]


def test_plan_only_exits_by_whether_the_plan_fits(tiny_model, tmp_path):
    args = ["--config", "recipes/cpu.yaml", "--model_name_or_path", tiny_model, "--output_dir", tmp_path / "out",
            "--plan_only", "--plan_gpus", "1"]
    fits = run_main("train_sft_trl.py", *args, "--plan_gpu_gb", "80")
    assert "memory plan:" in fits.stdout and "-> fits" in fits.stdout
    too_small = run_main("train_sft_trl.py", *args, "--plan_gpu_gb", "1", check=False)
    assert too_small.returncode != 0 and "DOES NOT FIT" in too_small.stdout
    assert "FSDP" in too_small.stderr and "Qwen3-4B-Instruct-2507" in too_small.stderr
    assert not (tmp_path / "out").exists(), "a plan writes nothing"


def test_a_plan_that_does_not_fit_stops_before_loading(tiny_model, gold_teacher_file, tmp_path):
    result = run_main("train_sft_trl.py", *train_args(tiny_model, gold_teacher_file, tmp_path / "out", "--plan_gpus", 1,
                                                      "--plan_gpu_gb", 1), check=False)
    assert result.returncode != 0 and "memory plan does not fit" in result.stderr
    assert "--lora_target_modules" in result.stderr and not (tmp_path / "out").exists()


def test_default_output_dir_is_models_run_name():
    import train_sft_trl

    _, training, _ = train_sft_trl.parse_args(["--config", "recipes/cpu.yaml"])
    assert training.output_dir == f"models/{training.run_name}"


def test_abbreviated_flags_are_errors():
    import train_sft_trl

    with pytest.raises((SystemExit, ValueError)):
        train_sft_trl.parse_args(["--config", "recipes/cpu.yaml", "--learning_rat", "1e-4"])


# --- launchers ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_trl_sh_on_cpu_passes_flags_through_and_logs_to_wandb_offline(tiny_model, gold_teacher_file, tmp_path):
    """The CPU launcher passes its flags through to a real run, which (WANDB_MODE=offline, no network, no
    --report_to) logs to wandb on its own: one launch for both."""
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    # 2 steps: the recipe warms up over a tenth of the run, so 1 step would train nothing (and end failed)
    result = run_cli("bash", "train_trl.sh", "--model_name_or_path", tiny_model, "--max_steps", 2, "--output_dir", out,
                     env={"RECIPE": "recipes/cpu.yaml", "DATA": str(gold_teacher_file), "PYTHON": sys.executable,
                          "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
                          "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert "train_trl: recipe recipes/cpu.yaml" in result.stdout
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished"
    assert record["args"]["script"]["dataset_name"] == str(gold_teacher_file)
    assert record["args"]["model"]["model_name_or_path"] == str(tiny_model)
    assert record["args"]["training"]["max_steps"] == 2
    assert record["args"]["training"]["learning_rate"] == pytest.approx(1e-3)  # the recipe's
    assert record["log_history"][-1]["step"] == 2
    assert (out / "adapter_model.safetensors").exists()
    # report_to defaults to wandb once WANDB_MODE is set
    assert record["args"]["training"]["report_to"] == ["wandb"]
    runs = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = runs[0].read_bytes()
    assert b"heldout_fraction" in logged, "WandbConfigCallback adds the data settings to the run config"


@pytest.mark.slow
def test_fast_recipe_settings_give_the_same_losses_as_the_old_ones(tiny_model, gold_teacher_file, tmp_path):
    """The GPU speed-up (token-budget micro-batches, padding-free, no checkpointing) changes how a step is computed,
    not what: the same rows per step give the same loss as micro-batch 8, gradient checkpointing and padding."""
    def losses(name, *extra):
        out = tmp_path / name
        run_main("train_sft_trl.py", *train_args(tiny_model, gold_teacher_file, out, "--max_steps", 3,
                                                 "--global_batch_size", 16, "--logging_steps", 1, *extra))
        record = json.loads((out / "distill_run.json").read_text())
        batch, training = record["counts"]["batch"], record["args"]["training"]
        # the run record holds the arguments that trained, the micro-batch sized from the data included
        assert (training["per_device_train_batch_size"], training["gradient_accumulation_steps"]) == (
            batch["micro_batch"], batch["gradient_accumulation_steps"])
        assert training["model_init_kwargs"]["dtype"] == "float32"
        return [entry["loss"] for entry in record["log_history"] if "loss" in entry], batch

    old, old_batch = losses("old", "--per_device_train_batch_size", 8, "--gradient_checkpointing", "true",
                            "--padding_free", "false", "--max_length", 2048)
    new, new_batch = losses("new", "--micro_batch_tokens", 1000)
    assert (old_batch["micro_batch"], old_batch["gradient_accumulation_steps"]) == (8, 2)
    assert new_batch["micro_batch"] == 16 and new_batch["gradient_accumulation_steps"] == 1
    assert new == pytest.approx(old, rel=1e-4)


def test_messages_field_names_the_turns_column(tmp_path, example_rows):
    """Stage 2 reads a column of another name (--messages_field), from a parquet file too; a row without it is named."""
    from types import SimpleNamespace

    import datasets

    from distill.records import InputError
    from distill.sft_setup import load_rows

    source = write_teacher_file(tmp_path / "teacher.jsonl", example_rows[:3])
    renamed = [{"id": row["id"], "chat": row["messages"]} for row in map(json.loads, source.read_text().splitlines())]
    parquet = tmp_path / "chats.parquet"
    datasets.Dataset.from_list(renamed).to_parquet(str(parquet))
    args = SimpleNamespace(dataset_name=str(parquet), dataset_split="train", messages_field="chat")
    rows = load_rows(args)
    assert [row["messages"] for row in rows] == [row["chat"] for row in renamed]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in renamed[:2] + [{"id": "x"}]) + "\n")
    with pytest.raises(InputError, match=r"chats.jsonl:3: no 'chat' column"):
        load_rows(SimpleNamespace(**{**vars(args), "dataset_name": str(jsonl)}))


def test_query_and_answer_of_a_conversation():
    """The answer is the last assistant turn and the query every turn before it; with --answer_field the column
    answers the conversation's last user turn, earlier answers staying context."""
    from distill.training import query_and_answer

    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}]
    assert query_and_answer({"messages": chat + [{"role": "assistant", "content": "a2"}]}, None) == (chat, "a2")
    assert query_and_answer({"messages": chat, "label": "x"}, "label") == (chat, "x")
    assert query_and_answer({"messages": chat[:1] + [{"role": "assistant", "content": "a"}], "label": "y"},
                            "label") == ("q1", "y")  # a stage-1 text row: its user turn as the text
