"""Owns saving the trained adapter and proving it usable; must not decide a run's status (trainer_setup.py does).

Saving the trained adapter from one process or many, and proving it is usable before a run says `finished`.

Under FSDP every LoRA tensor is sharded across processes; transformers' `Trainer.save_model` writes nothing unless
the FSDP state dict type is FULL_STATE_DICT, and then it gathers the whole frozen base (~60 GB for the 30B student)
onto rank 0 just to keep the adapter. We gather only the trainable tensors (a collective every rank joins) and let
rank 0 alone write them.
"""

import math
from pathlib import Path


def trainable_state_dict(model) -> dict:
    """name -> full CPU tensor of every trainable parameter. Collective under FSDP: every rank must call it."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            tensor = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            state[name] = tensor.detach().to("cpu")
    return state


def save_gathered(model, output_dir: str, is_main_process: bool) -> int:
    """Gathers the trainable tensors of a sharded model (every rank) and saves them with save_pretrained (rank 0);
    for a PeftModel that is the adapter config and weights. Returns the number of tensors."""
    state = trainable_state_dict(model)
    if is_main_process:
        model.save_pretrained(output_dir, state_dict=state)
    return len(state)


def save_adapter(trainer, output_dir: str) -> int:
    """Writes the adapter (or, with --use_peft false, the model) to output_dir from rank 0 only; returns the number
    of trainable tensors saved. Every rank must call it."""
    accelerator = trainer.accelerator
    if trainer.is_fsdp_enabled:
        count = save_gathered(accelerator.unwrap_model(trainer.model), output_dir, accelerator.is_main_process)
    else:
        trainer.save_model(output_dir)  # writes from the main process only
        count = sum(1 for parameter in trainer.model.parameters() if parameter.requires_grad)
    accelerator.wait_for_everyone()
    return count


def check_adapter(output_dir: str | Path, expected_tensors: int) -> tuple[dict, dict]:
    """Raises RuntimeError unless output_dir holds an adapter config and weights that load, with one finite tensor
    per trainable parameter. Returns a summary for the run record, and the weights (name -> tensor) it loaded, so
    untrained_reason reads them without loading the file again."""
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    config_path, weights_path = output_dir / "adapter_config.json", output_dir / "adapter_model.safetensors"
    missing = [path.name for path in (config_path, weights_path) if not path.exists()]
    if missing:
        raise RuntimeError(f"{output_dir}: no {' or '.join(missing)} after saving")
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(output_dir))
    weights = load_file(weights_path)
    if len(weights) != expected_tensors:
        raise RuntimeError(f"{weights_path}: {len(weights)} tensors, but the model trained {expected_tensors}")
    broken = [name for name, tensor in weights.items() if not tensor.isfinite().all()]
    if broken:
        raise RuntimeError(f"{weights_path}: non-finite values in {', '.join(broken[:3])}")
    summary = {"adapter_tensors": len(weights), "adapter_parameters": sum(t.numel() for t in weights.values()),
               "peft_type": str(config.peft_type), "adapter_bytes": weights_path.stat().st_size,
               "max_abs_lora_b": max((t.abs().max().item() for n, t in weights.items() if "lora_B" in n),
                                     default=math.nan)}
    return summary, weights


def untrained_reason(weights: dict | None, state, init_adapter: str | None = None) -> str | None:
    """Why a run that ended trained nothing, or None: it took no optimizer step (fewer rows than one batch), every
    logged step had learning rate 0, or its saved adapter (`weights`, name -> tensor as check_adapter loaded them;
    None for a full model, whose weights are not compared) is still what it started from: every LoRA B zero (PEFT's
    initialisation, under which the adapter adds nothing) or, warm-started, --init_adapter's tensors. `state` is the
    Trainer's (global_step, log_history)."""
    import torch
    from safetensors.torch import load_file

    if state.global_step == 0:
        return ("it took 0 optimizer steps: the training rows do not fill one batch (rows per device x gradient "
                "accumulation x processes, or TRL's generation batch on-policy); give more rows or a smaller batch")
    rates = [entry["learning_rate"] for entry in state.log_history if "learning_rate" in entry]
    warm_up = ("every logged step's learning rate was 0" if rates and not any(rates) else
               "as a learning rate of 0 in every step does") + (
        ": a warm-up as long as the run; lower --warmup_steps / --warmup_ratio or train longer")
    if weights is None:
        return warm_up if rates and not any(rates) else None
    if init_adapter:
        initial = load_file(Path(init_adapter) / "adapter_model.safetensors")
        shared = weights.keys() & initial.keys()
        if shared and all(torch.equal(weights[name], initial[name]) for name in shared):
            return f"the adapter equals --init_adapter {init_adapter}'s, tensor for tensor ({warm_up})"
        return None
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    if lora_b and not any(tensor.any() for tensor in lora_b):
        return f"every LoRA B tensor is still 0, so the adapter changes nothing ({warm_up})"
    return None
