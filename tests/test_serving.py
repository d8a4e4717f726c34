"""How evaluate.py serves the student (distill/serving.py): max_lora_rank from every rank the adapter holds, the
merged copy and its cache, max_model_len from the data, and the split check against the adapter's run record,
which refuses a mismatch from the CLI before any model loads."""

import json
from dataclasses import asdict

import pytest

from distill import serving
from tests.conftest import EXAMPLE_DATA, run_main, write_teacher_file

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def saved_adapter_config(tmp_path, **lora_settings) -> dict:
    """adapter_config.json as PEFT itself writes it (rank_pattern and target_parameters included)."""
    from peft import LoraConfig

    LoraConfig(**lora_settings).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("rank, expected", [(1, 1), (8, 8), (12, 16), (32, 32), (33, 64), (200, 256), (300, 320)])
def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts(rank, expected):
    assert serving.max_lora_rank({"r": rank, "rank_pattern": {}}) == expected


def test_max_lora_rank_takes_the_largest_rank_of_a_moe_adapter(tmp_path):
    # the Qwen3-MoE student: attention modules at r32, the fused experts' gate_up_proj at 64 through rank_pattern
    config = saved_adapter_config(tmp_path, r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                  rank_pattern={"mlp.experts.gate_up_proj": 64, "mlp.experts.down_proj": 16})
    assert config["r"] == 32 and config["rank_pattern"]["mlp.experts.gate_up_proj"] == 64
    assert serving.max_lora_rank(config) == 64
    assert serving.max_lora_rank({**config, "rank_pattern": {"q_proj": 8}}) == 32  # r is a rank too
    assert serving.max_lora_rank({**config, "rank_pattern": None}) == 32


def test_max_lora_rank_above_what_vllm_serves_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LoRA rank 1024; vLLM serves ranks up to 512.*--merge_lora"):
        serving.max_lora_rank({"r": 16, "rank_pattern": {"mlp.experts.gate_up_proj": 1024}})


def test_max_model_len_is_longest_prompt_plus_max_tokens_within_the_model(tmp_path):
    from transformers import Qwen3Config

    Qwen3Config(max_position_embeddings=1000).save_pretrained(tmp_path)
    prompts = [[1] * 5, [1] * 120, [1] * 30]
    assert serving.max_model_len(prompts, 16, str(tmp_path)) == 136
    assert serving.max_model_len(prompts, 880, str(tmp_path)) == 1000
    assert serving.max_model_len(prompts, 8192, str(tmp_path)) == 1000  # capped at max_position_embeddings


def write_run_record(model_dir, heldout_fraction=0.2, split_seed=0):
    """distill_run.json as train_sft_trl.py writes it: its own DistillArguments under args.script."""
    from distill.records import RunRecord
    from train_sft_trl import RUN_RECORD, DistillArguments

    script = asdict(DistillArguments(heldout_fraction=heldout_fraction, split_seed=split_seed))
    RunRecord("train_sft_trl", {"script": script, "model": {}, "training": {}}).write(
        model_dir / RUN_RECORD, status="finished", counts={})


def fake_adapter(tmp_path, base_model="no/such-base-model"):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": base_model}))
    return adapter


def test_check_split_refuses_a_mismatch_and_names_both_settings(tmp_path):
    adapter = fake_adapter(tmp_path)
    write_run_record(adapter, heldout_fraction=0.2, split_seed=0)
    assert serving.check_split(adapter, "heldout", 0.2, 0).scored_rows_trained_on is False
    with pytest.raises(ValueError, match=r"heldout_fraction 0\.2, split_seed 0.*heldout_fraction 0\.3, split_seed 0"
                                         r".*pass --heldout_fraction 0\.2 --split_seed 0"):
        serving.check_split(adapter, "heldout", 0.3, 0)
    with pytest.raises(ValueError, match=r"split_seed 0, but .* split_seed 7"):
        serving.check_split(adapter, "train", 0.2, 7)


def test_check_split_on_trained_rows_is_allowed_and_says_so(tmp_path):
    adapter = fake_adapter(tmp_path)
    write_run_record(adapter)
    for split in ("train", "all"):
        check = serving.check_split(adapter, split, 0.2, 0)
        assert check.scored_rows_trained_on is True
        assert any("rows this model trained on" in note and "not a held-out score" in note for note in check.notes)
    # the whole file is scored whatever the split settings: nothing to refuse
    assert serving.check_split(adapter, "all", 0.5, 3).scored_rows_trained_on is True


def test_check_split_without_a_record_warns_for_an_adapter_only(tmp_path):
    adapter = fake_adapter(tmp_path)
    check = serving.check_split(adapter, "heldout", 0.2, 0)
    assert check.scored_rows_trained_on is None and check.record is None
    assert len(check.notes) == 1 and "distill_run.json is missing" in check.notes[0]
    assert serving.check_split(tmp_path, "heldout", 0.2, 0).notes == []  # a base model has no record to miss


def test_cli_refuses_a_split_mismatch_before_any_model_loads(tmp_path):
    # the adapter's base does not exist: a check that ran after the merge or the engine would fail differently
    adapter = fake_adapter(tmp_path)
    write_run_record(adapter, heldout_fraction=0.2, split_seed=0)
    result = run_main("evaluate.py", "--model_path", adapter, "--test_file", EXAMPLE_DATA, "--heldout_fraction",
                      "0.25", "--split_seed", "3", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "trained with heldout_fraction 0.2, split_seed 0" in result.stderr
    assert "heldout_fraction 0.25, split_seed 3" in result.stderr
    assert "pass --heldout_fraction 0.2 --split_seed 0" in result.stderr
    assert "no/such-base-model" not in result.stderr + result.stdout and not (adapter / "merged").exists()


def make_adapter(tiny_model, adapter_dir, seed):
    """A PEFT adapter on the tiny model with random (nonzero) lora_B, saved like train_sft_trl.py saves one;
    returns q_proj's weight delta in layer 0, which the merge must add to the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    delta = model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default").detach().clone()
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter_dir)
    return delta


def merged_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(adapter_dir / "merged" / "model.safetensors")


def test_merged_copy_is_base_plus_adapter_and_cached_by_adapter_and_dtype(tiny_model, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    base = load_file(tiny_model / "model.safetensors")
    adapter = tmp_path / "adapter"
    delta = make_adapter(tiny_model, adapter, seed=1)
    assert delta.abs().max() > 1e-3

    merged = serving.merged_copy(adapter, str(tiny_model), "float32")
    assert merged == adapter / "merged" and "merged the adapter" in capsys.readouterr().out
    first = merged_weights(adapter)
    assert first[Q_PROJ].dtype == torch.float32
    assert not torch.equal(first[Q_PROJ], base[Q_PROJ])
    torch.testing.assert_close(first[Q_PROJ], base[Q_PROJ] + delta)
    assert torch.equal(first["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert (merged / "tokenizer.json").exists()

    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    serving.merged_copy(adapter, str(tiny_model), "float32")  # same adapter, same dtype: the cache
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp and not capsys.readouterr().out

    serving.merged_copy(adapter, str(tiny_model), "bfloat16")  # the GPU dtype: rebuilt
    assert "merged the adapter" in capsys.readouterr().out
    half = merged_weights(adapter)
    assert half[Q_PROJ].dtype == torch.bfloat16
    torch.testing.assert_close(half[Q_PROJ].float(), first[Q_PROJ], atol=0.02, rtol=0.02)
    assert json.loads((merged / serving.MERGE_KEY).read_text())["dtype"] == "bfloat16"

    new_delta = make_adapter(tiny_model, adapter, seed=2)  # retrained in place: rebuilt from the new weights
    serving.merged_copy(adapter, str(tiny_model), "bfloat16")
    assert "merged the adapter" in capsys.readouterr().out
    torch.testing.assert_close(merged_weights(adapter)[Q_PROJ].float(), base[Q_PROJ] + new_delta,
                               atol=0.02, rtol=0.02)
    assert not torch.allclose(new_delta, delta)
    assert sorted(path.name for path in adapter.glob("merged*")) == ["merged"]  # no temporary dir left behind


def stop_at_the_engine(monkeypatch):
    """Runs evaluate.main in-process up to the vLLM engine and returns the arguments it would have started it with."""
    from distill import engine

    started = {}

    def build_llm(args, **overrides):
        started.update(overrides, cli_max_model_len=args.max_model_len)
        raise SystemExit("stopped before the engine")

    monkeypatch.setattr(engine, "configure_env", lambda: None)  # keep the CPU env defaults out of pytest's process
    monkeypatch.setattr(engine, "build_llm", build_llm)
    return started


def test_main_sets_max_model_len_from_the_prompts_and_refuses_a_foreign_teacher_file(
        tiny_model, tmp_path, example_rows, monkeypatch):
    from transformers import AutoTokenizer

    import evaluate
    from distill.render import student_ids
    from distill.splits import select

    train_rows = select(example_rows, "train")
    teacher_file = write_teacher_file(tmp_path / "teacher-train.jsonl", train_rows)
    started = stop_at_the_engine(monkeypatch)
    command = ["--model_path", str(tiny_model), "--test_file", str(EXAMPLE_DATA), "--max_samples", "20",
               "--max_tokens", "7"]
    with pytest.raises(SystemExit, match=f"{teacher_file} answers 0 of the 20 rows scored"):
        evaluate.main([*command, "--teacher_file", str(teacher_file)])
    assert started == {}, "refused before the engine"
    with pytest.raises(SystemExit, match="stopped before the engine"):
        evaluate.main(command)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    scored = select(example_rows, "heldout")[:20]
    longest = max(len(student_ids(tokenizer, row["text"]))
                  for row in scored)
    assert started == {"model": str(tiny_model), "max_model_len": longest + 7, "cli_max_model_len": None}


def test_main_keeps_a_given_max_model_len_and_takes_a_matching_teacher_file(
        tiny_model, tmp_path, example_rows, monkeypatch, capsys):
    import evaluate

    teacher_file = write_teacher_file(tmp_path / "teacher.jsonl", example_rows)
    started = stop_at_the_engine(monkeypatch)
    with pytest.raises(SystemExit, match="stopped before the engine"):
        evaluate.main(["--model_path", str(tiny_model), "--test_file", str(EXAMPLE_DATA), "--max_samples", "5",
                       "--max-model-len", "512", "--teacher_file", str(teacher_file)])
    assert "--teacher_file" not in capsys.readouterr().err
    assert started == {"model": str(tiny_model), "cli_max_model_len": 512}  # no override: the CLI's value stands
