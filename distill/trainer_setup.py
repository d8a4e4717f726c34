"""Owns what stages 2 and 2b share (recipe, LoRA, output dir, plan, the record's end); must not build data.

What the two student-training stages share (train_sft_trl.py, train_opd_trl.py): parsing a recipe and the flags,
the LoRA config with an MoE router kept out, the output-dir policy, the memory plan, the run record's last word and
the wandb config."""

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from transformers import TrainerCallback

from distill import input_checks
from distill.records import TRAIN_RUN_RECORD as RUN_RECORD
from distill.records import InputError

H100_GIB = 80.0


def parse_recipe(parser, argv: list[str]) -> tuple:
    """TRL's parse_args_and_config (a --config YAML, then the flags), with what its errors do not say: the recipe's
    file and line and the valid keys, and a --lora_r or --model_name_or_path that cannot train. No traceback."""
    try:
        input_checks.check_recipe(parser, argv)
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
        if model_args.use_peft and model_args.lora_r < 1:
            raise InputError(f"--lora_r {model_args.lora_r}: a LoRA rank is 1 or more (the recipes use 32); "
                             f"--use_peft false trains the whole model instead")
        if not script_args.plan_only:  # a plan needs no weights: the recipes' students have stored shapes
            input_checks.check_model("--model_name_or_path", model_args.model_name_or_path)
    except ValueError as error:  # InputError, or a dataclass of TRL's or ours refusing a value
        sys.exit(f"error: {error}")
    return script_args, training_args, model_args


def lora_config(model_args, train_router: bool, trust_remote_code: bool = False):
    """TRL's LoRA config from the flags, with an MoE router kept out unless --train_router: LoRA on the router
    shifts which experts every token reaches, and tinker-cookbook leaves it out too."""
    from trl import get_peft_config

    from distill.plan import load_config, without_router

    config = get_peft_config(model_args)
    if config is None or train_router:
        return config
    return without_router(config, load_config(model_args.model_name_or_path, trust_remote_code)[0])


def check_output_dir(script_args, training_args):
    """Clears a finished run only with --overwrite. Called on the main process alone, before the others go on."""
    out = Path(training_args.output_dir)
    try:
        input_checks.check_writable("--output_dir", out)
    except InputError as error:
        sys.exit(f"error: {error}")
    if (out / RUN_RECORD).exists() and not training_args.resume_from_checkpoint:
        finished = json.loads((out / RUN_RECORD).read_text()).get("status") == "finished"
        if finished and not script_args.overwrite:
            sys.exit(f"error: {out} holds a finished run; pass --overwrite to replace it or --output_dir elsewhere")
        if finished:
            shutil.rmtree(out)


def stop_or_clear(plan, on_gpus: bool, script_args, training_args, processes) -> None:
    """After the plan is printed: --plan_only exits (0 if it fits), a plan that does not fit the GPUs stops the run
    unless --ignore_memory_plan, and the main process applies the output-dir policy before the others go on."""
    if script_args.plan_only:
        sys.exit(0 if plan.fits else plan.advice())
    if on_gpus and not plan.fits and not script_args.ignore_memory_plan:
        sys.exit(f"error: the memory plan does not fit.\n{plan.advice()}\n(--ignore_memory_plan trains anyway)")
    if processes.is_main_process:
        check_output_dir(script_args, training_args)
    processes.wait_for_everyone()


def plan_memory(script_args, training_args, model_args, peft_config, teacher_config=None):
    """The memory plan for the GPUs this run will use (or --plan_gpus), from the model's config on the meta device,
    and whether there is a GPU to hold it to (a CPU run without --plan_gpus/--plan_gpu_gb has none). An in-process
    teacher of another model (`teacher_config`, on-policy distillation) adds its frozen weights, in the student's
    weight dtype; the self-teacher shares the student's base and adds none. Also returns where the config came from
    (a stored one for the recipes' students when there is no hub)."""
    from distill.plan import load_config, memory_plan

    config, source = load_config(model_args.model_name_or_path, training_args.trust_remote_code)
    if script_args.plan_gpus:
        gpus, sharded = script_args.plan_gpus, script_args.plan_gpus > 1
    else:
        gpus = training_args.world_size
        sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    gpu_gib = script_args.plan_gpu_gb or visible_gpu_gib()
    plan = memory_plan(config, peft_config, weight_dtype=model_args.dtype or "float32", num_gpus=gpus,
                       gpu_gib=gpu_gib or H100_GIB, sharded=sharded)
    if teacher_config is not None:
        teacher = memory_plan(teacher_config, None, weight_dtype=model_args.dtype or "float32")
        plan = replace(plan, teacher_bytes=teacher.frozen_bytes)
    return plan, bool(gpu_gib or script_args.plan_gpus), source


def visible_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def finish_record(record, record_path, report, result, trainer, model_args, saved_tensors):
    """`finished` only when the saved adapter is on disk, loads and was trained (an optimizer step changed it from
    where it started: LoRA B off zero, or off --init_adapter's tensors, whose path stage 2b's `report` holds);
    otherwise the record says `failed` and why, and the process exits non-zero."""
    import torch

    from distill.checkpoint import check_adapter, untrained_reason

    out = record_path.parent
    history = {"train_metrics": result.metrics, "log_history": trainer.state.log_history}
    if torch.cuda.is_available():
        history["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # this process's GPU
    try:
        saved, weights = check_adapter(out, saved_tensors) if model_args.use_peft else ({"model_files": sorted(
            path.name for path in out.glob("*.safetensors"))}, None)
    except RuntimeError as error:
        record.write(record_path, status="failed", error=str(error), **report, **history)
        sys.exit(f"error: training ran but the adapter is not usable: {error}")
    untrained = untrained_reason(weights, trainer.state, report.get("init_adapter"))
    if untrained:
        record.write(record_path, status="failed", error=untrained, saved=saved, **report, **history)
        sys.exit(f"error: the run trained nothing: {untrained}. {out}/{RUN_RECORD} says failed")
    record.write(record_path, status="finished", saved=saved, **report, **history)
    print(f"train: done, loss {result.metrics.get('train_loss'):.4f}, "
          f"{result.metrics.get('train_runtime'):.1f} s -> {out} ({saved})")


class WandbConfigCallback(TrainerCallback):
    """TRL logs the trainer's args to wandb; this adds the data and LoRA settings so the run page has them all."""

    def __init__(self, config):
        self.config = config

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is not None:
            wandb.config.update({"distill": self.config["script"], "model_config": self.config["model"]},
                                allow_val_change=True)
