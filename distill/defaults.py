"""Owns every default shared by more than one stage, decided once; must not hold a stage's own defaults.

The defaults that more than one stage shares, each decided here once: the teacher and student models, how many tokens an
answer may take, the train / held-out split, and whether a run logs to wandb.
"""

import os
from dataclasses import dataclass, field

TEACHER_MODEL = "Qwen/Qwen3-30B-A3B-Thinking-2507"  # stage 1's teacher, stage 0's query writer
STUDENT_MODEL = "Qwen/Qwen3-4B-Instruct-2507"  # stage 2's and stage 2b's student

# The split training drops rows by and evaluation scores (distill/splits.py); a run record keeps the values used.
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0

# What an output needs when neither --max_tokens nor the model's generation_config says: a teacher's answer with
# its reasoning (stage 1, evaluate.py --with_prompt, a judge's verdict), a written query (stage 0; a thinking
# writer reasons first), and the student's answer, a label or a sentence or two.
TEACHER_MAX_TOKENS = 8192
QUERY_MAX_TOKENS, REASONING_QUERY_MAX_TOKENS = 256, 4096
STUDENT_MAX_TOKENS = {"label": 16, "generative": 64}


def max_tokens(flag: int | None, model_defaults: dict, needed: int) -> int:
    """The one rule: --max_tokens when set; else the model's own max_new_tokens (`model_defaults`, from
    distill.sampling.model_sampling_defaults) when the run samples with the model's defaults; else what the output
    needs. Greedy evaluation passes no model defaults."""
    return flag or model_defaults.get("max_tokens") or needed


def wandb_enabled() -> bool:
    """wandb logs a run when WANDB_API_KEY or WANDB_MODE is set (WANDB_MODE=offline needs no network)."""
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


@dataclass
class StudentRunArguments:
    """The flags both student stages (train_sft_trl.py, train_opd_trl.py) take: the split, the output-dir policy, the
    router and the memory plan. Each stage's own arguments subclass this."""

    heldout_fraction: float = field(default=HELDOUT_FRACTION,
                                    metadata={"help": "share of groups kept out for evaluation"})
    split_seed: int = field(default=SPLIT_SEED,
                            metadata={"help": "seed of the group split (evaluate.py must use the same)"})
    max_train_rows: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in --output_dir"})
    train_router: bool = field(default=False, metadata={
        "help": "LoRA on an MoE router (mlp.gate) too; frozen by default"})
    plan_only: bool = field(default=False, metadata={
        "help": "print the memory plan and exit without loading weights: 0 if it fits, 1 if not"})
    plan_gpus: int | None = field(default=None, metadata={
        "help": "plan for this many GPUs (FSDP when > 1) instead of the processes of this launch"})
    plan_gpu_gb: float | None = field(default=None, metadata={
        "help": "GiB per GPU to plan for (default: the visible GPU's; 80, an H100, on a machine without one)"})
    ignore_memory_plan: bool = field(default=False, metadata={"help": "train even if the memory plan does not fit"})
    fingerprint_probes: int = field(default=8, metadata={
        "help": "training rows whose queries the trained model answers greedily and scores into "
                "<output_dir>/fingerprint.json, which evaluate.py checks the served model against (0: none)"})

    def __post_init__(self):
        if self.fingerprint_probes < 0:
            raise ValueError(f"--fingerprint_probes {self.fingerprint_probes}: give a number of training rows, "
                             f"0 or more")
