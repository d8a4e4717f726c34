"""Every shipped recipe as users run it, proven on CPU (issue 27). Each YAML in recipes/ runs here through its stage's
CLI with its own settings (gradient checkpointing, padding-free batches, the loss, the teacher kind, LoRA targets, bf16
through --use_cpu) on a tiny model whose chat template behaves like the recipe's model: Qwen3 Instruct-2507 (no think
block), Thinking-2507 (its generation prompt opens <think>), SmolLM2's (the CPU recipes' own tokenizer and template).
What has to differ on CPU is listed per recipe, with the reason; sizes (steps, batch, answer length) are cut, nothing
else. The README's and docs/' GPU commands run these recipes (test_readme_gpu_commands_run_recipes_with_a_case).

Each case asserts what its stage promises: a stage-2 run finishes with the recipe's settings in force and a trained
adapter whose student input never holds the prompt; a stage-2b run also proves its teacher read the prompt (the cache
held the whole prefix, the first step's log-probabilities moved with the prompt) and that the teacher's input holds the
prompt and ends in its own template's final-answer state, the student's in its own. A recipe file without a case
fails the suite."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLI_ENV, REPO, run_main, write_teacher_file
from tests.test_readme import DOCS
from tests.tiny_model import FINAL_ANSWER_TAIL, build_tiny_qwen3_moe, build_tiny_smollm2, with_template

RECIPES = REPO / "recipes"
# bf16 on a CPU: TrainingArguments refuse bf16 without a GPU unless use_cpu says the run is meant for the CPU.
BF16_ON_CPU = ("--use_cpu", "true")


@dataclass(frozen=True)
class Case:
    stage: str  # the script the recipe configures
    student: str  # the student's template kind (a key of FINAL_ANSWER_TAIL; "moe-" for the MoE architecture)
    teacher: str | None = None  # stage 2b: "self", or "server:<template kind>"
    cpu_flags: tuple = ()  # what differs on CPU beyond sizes
    why: str = ""
    sizes: tuple = ()  # cut for time: steps, batch, answer length


CASES = {
    "cpu.yaml": Case("train_sft_trl.py", "smollm2", why="the CPU recipe itself"),
    "tinker.yaml": Case("train_sft_trl.py", "instruct-2507", cpu_flags=BF16_ON_CPU, why="bf16 on CPU needs --use_cpu"),
    "openai_cookbook.yaml": Case("train_sft_trl.py", "instruct-2507", cpu_flags=BF16_ON_CPU,
                                 why="bf16 on CPU needs --use_cpu", sizes=("--save_strategy", "no")),
    "tinker_30b_fsdp.yaml": Case(
        "train_sft_trl.py", "moe-instruct-2507", cpu_flags=BF16_ON_CPU,
        why="one process: FSDP shards over accelerators only; tests/test_distributed.py runs the 2-process launch "
            "with recipes/accelerate_fsdp.yaml and FSDP2 over gloo"),
    "opd_cpu.yaml": Case("train_opd_trl.py", "smollm2", teacher="self", why="the CPU recipe itself",
                         sizes=("--per_device_train_batch_size", "4", "--max_completion_length", "8")),
    "opd_4b_server.yaml": Case(
        "train_opd_trl.py", "instruct-2507", teacher="server:thinking-2507",
        cpu_flags=(*BF16_ON_CPU, "--use_vllm", "false"),
        why="TRL's colocated vLLM sampling needs a GPU (transformers samples instead); the teacher server is the "
            "same vLLM server code on CPU",
        sizes=("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
               "--max_completion_length", "8")),
}
# Not a TRL recipe: accelerate's launch config. Its run on CPU (2 processes, bf16 mixed precision) is this test.
ACCELERATE_CONFIGS = {"accelerate_fsdp.yaml": "tests/test_distributed.py::"
                                              "test_two_process_launch_saves_one_adapter_with_the_recipe_batch"}


def test_every_recipe_file_has_a_parity_case():
    shipped = {path.name for path in RECIPES.glob("*.yaml")}
    assert shipped == set(CASES) | set(ACCELERATE_CONFIGS), (
        f"recipes without a CPU parity case: {sorted(shipped - set(CASES) - set(ACCELERATE_CONFIGS))}; add one to "
        f"tests/test_recipes.py CASES")
    for name, test in ACCELERATE_CONFIGS.items():
        path, function = test.split("::")
        assert f"def {function}(" in (REPO / path).read_text(), f"{name}: {test} is gone"
    for name, case in CASES.items():
        assert ("beta" in recipe(name)) == (case.stage == "train_opd_trl.py"), f"{name} is not a {case.stage} recipe"
        overridden = {flag.removeprefix("--") for flag in case.cpu_flags[::2]}
        # the CPU may add use_cpu and turn off colocated vLLM; it must not touch what the recipe is about
        assert overridden <= {"use_cpu", "use_vllm"}, f"{name}: the CPU run changes {overridden}"


def test_readme_gpu_commands_run_recipes_with_a_case():
    """The GPU commands of the README (and docs/) name recipes that have a case, directly or through train_trl.sh's
    defaults (tinker.yaml on 1 GPU, tinker_30b_fsdp.yaml on several)."""
    named = {match for text in DOCS.values() for match in re.findall(r"recipes/(\w[\w.-]*\.yaml)", text)} - {"X.yaml"}
    assert named and named <= set(CASES) | set(ACCELERATE_CONFIGS)
    launcher = (REPO / "train_trl.sh").read_text()
    assert "default_recipe=recipes/tinker_30b_fsdp.yaml" in launcher
    assert "default_recipe=recipes/tinker.yaml" in launcher


# ---- the models --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recipe-models")
    built = {"smollm2": build_tiny_smollm2(root / "smollm2"),
             "instruct-2507": with_template(tiny_model, "instruct-2507", root / "instruct-2507", 16384),
             "thinking-2507": with_template(tiny_model, "thinking-2507", root / "thinking-2507", 16384)}
    moe = build_tiny_qwen3_moe(root / "moe", tiny_model)
    built["moe-instruct-2507"] = with_template(moe, "instruct-2507", root / "moe-instruct-2507")
    return built


@pytest.fixture(scope="module")
def stage1_file(example_rows, tmp_path_factory) -> Path:
    """A stage-1 file of the language-ID task (gold labels as the teacher's answers): 500+ train-side rows, enough
    for the recipes' global batch of 128."""
    return write_teacher_file(tmp_path_factory.mktemp("stage1") / "teacher.jsonl", example_rows)


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def check_recipe_settings(record: dict, name: str) -> None:
    """The settings the recipe is about are the ones the run trained with."""
    settings = recipe(name)
    training, model = record["args"]["training"], record["args"]["model"]
    for key in ("gradient_checkpointing", "padding_free", "bf16", "learning_rate", "lr_scheduler_type", "beta",
                "max_grad_norm", "adam_beta2", "warmup_steps", "temperature"):
        if key in settings:
            assert training[key] == settings[key], f"{name}: {key} {training[key]!r} != the recipe's {settings[key]!r}"
    for key in ("dtype", "lora_r", "lora_alpha", "lora_dropout", "use_peft"):
        if key in settings:
            assert model[key] == settings[key], f"{name}: {key}"
    targets = settings.get("lora_target_modules")
    assert model["lora_target_modules"] in (targets, [targets]), f"{name}: LoRA targets"


# ---- stage 2 ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.stage == "train_sft_trl.py"])
def test_a_stage2_recipe_trains_as_users_run_it(name, models, stage1_file, tmp_path):
    from transformers import AutoTokenizer

    case = CASES[name]
    out = tmp_path / "run"
    run_main("train_sft_trl.py", "--config", RECIPES / name, "--model_name_or_path", models[case.student],
             "--dataset_name", stage1_file, "--output_dir", out, "--report_to", "none", "--max_steps", 2,
             *case.cpu_flags, *case.sizes)
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished" and record["saved"]["max_abs_lora_b"] > 0, "the adapter trained"
    check_recipe_settings(record, name)
    if "global_batch_size" in recipe(name):
        assert record["counts"]["batch"]["global_batch"] == recipe(name)["global_batch_size"]
    assert 0 < record["train_metrics"]["train_loss"] < float("inf")
    # the student's input: its own template's final-answer state, never the prompt
    tokenizer = AutoTokenizer.from_pretrained(out)
    probe = json.loads((out / "fingerprint.json").read_text())["probes"][0]
    student_input = tokenizer.decode(probe["input_ids"][: probe["answer_start"]])
    assert student_input.endswith(FINAL_ANSWER_TAIL[case.student.removeprefix("moe-")])
    assert "Language Identification" not in student_input and "Final Answer" not in student_input


# ---- stage 2b ---------------------------------------------------------------------------------------------------


def shared_prefix_of(model: Path, prompt_file: Path) -> list[int]:
    from transformers import AutoTokenizer

    from distill.onpolicy import shared_prefix
    from distill.prompts import load_prompt

    return shared_prefix(AutoTokenizer.from_pretrained(model), load_prompt(prompt_file))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.stage == "train_opd_trl.py"])
def test_a_stage2b_recipe_trains_against_a_teacher_that_reads_the_prompt(name, models, stage1_file, tmp_path):
    case = CASES[name]
    out = tmp_path / "run"
    # the docs' commands: in_short on CPU, the language-ID rule book on the 8xH100 layout
    prompt_file = REPO / "prompts" / ("in_short.md" if case.teacher == "self" else "language_identification.md")
    dataset = REPO / "example-data" / "general_questions.jsonl" if case.teacher == "self" else stage1_file
    flags = ["--config", RECIPES / name, "--model_name_or_path", models[case.student], "--prompt_file", prompt_file,
             "--dataset_name", dataset, "--output_dir", out, "--report_to", "none", "--max_steps", 2,
             *case.cpu_flags, *case.sizes]
    if case.teacher == "self":
        teacher_kind = case.student
        run_main("train_opd_trl.py", *flags)
    else:  # the teacher server as the recipe's comment starts it: scoring reads the prompt from its prefix cache
        from distill.teacher_server import prompt_token_counts, serving

        teacher_kind = case.teacher.removeprefix("server:")
        server_flags = [models[teacher_kind], "--max-logprobs", "1", "--max-model-len", "8192", "--dtype", "float32",
                        "--enforce-eager"]
        with serving(server_flags, tmp_path / "server.log", env=CLI_ENV) as url:
            # its tokenizer: the model the server says it serves
            run_main("train_opd_trl.py", *flags, "--teacher_server_url", url)
            received, read_from_cache = prompt_token_counts(url)
        prefix = len(shared_prefix_of(models[teacher_kind], prompt_file))
        # every scoring request but the first step's prompt check (whose bare rows end the shared part early) read
        # the prompt's tokens from the cache: 2 steps of 4 rollouts
        assert read_from_cache >= 2 * 4 * (prefix - 200) and received > read_from_cache, (received, read_from_cache)
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished" and record["saved"]["max_abs_lora_b"] > 0, "the adapter trained"
    check_recipe_settings(record, name)
    checks = record["teacher_checks"]
    assert checks["prompt_effect"]["passed"] and checks["prompt_effect"]["mean_abs_difference"] > 1e-2
    if case.teacher == "self":
        assert checks["prefix_cache"]["passed"] and checks["prefix_cache"]["cached_tokens"] > 1000
    rendering = record["rendering"]
    assert rendering["teacher"]["holds_prompt"] and not rendering["student"]["holds_prompt"]
    assert rendering["teacher"]["input_ends_with"].endswith(FINAL_ANSWER_TAIL[teacher_kind])
    assert rendering["student"]["input_ends_with"].endswith(FINAL_ANSWER_TAIL[case.student])
    # A fresh adapter's loss is the distance to the prompted teacher: over the full vocabulary in process; on the
    # server's top-1 support (plus a tail bucket), where a random model's near-uniform distributions differ little.
    assert record["train_metrics"]["train_loss"] > (1e-3 if case.teacher == "self" else 0)
