"""Stage 2: LoRA-SFT the student on (query -> teacher answer), without the prompt. Loss on the answer only.

    python train_sft_trl.py --config recipes/tinker.yaml                       # Qwen3-30B-A3B-Instruct-2507 student
    python train_sft_trl.py --config recipes/cpu.yaml --dataset_name data/teacher.jsonl   # the CPU demo recipe
    python train_sft_trl.py --config recipes/cpu.yaml --answer_field label    # same rows, gold labels

Every SFTConfig / TrainingArguments flag and every ModelConfig flag of TRL is a flag here (--learning_rate,
--lora_r, --lora_target_parameters, ...); `--config X.yaml` sets defaults that flags override; unknown keys are
errors. LoRA r32 / alpha16 on all linear layers is the default; `--use_peft false` trains the full model.

Rows whose group (or id) falls on the held-out side of the split that evaluate.py uses never reach the trainer.
The output dir (default models/<run name>) gets the adapter, the tokenizer and distill_run.json (resolved config,
command line, git revision, rows used and dropped, train metrics).
"""

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from distill.engine import on_gpu
from distill.records import InputError, RunRecord, read_jsonl

DEFAULT_STUDENT = "Qwen/Qwen3-30B-A3B-Instruct-2507"
RUN_RECORD = "distill_run.json"


@dataclass
class DistillArguments:
    dataset_name: str = field(default="data/teacher.jsonl",
                              metadata={"help": "stage-1 chat JSONL (local path) or a hub dataset of that schema"})
    dataset_split: str = field(default="train", metadata={"help": "split to load from a hub dataset"})
    answer_field: str | None = field(default=None, metadata={
        "help": "train on this column instead of the assistant turn, e.g. `label` for the gold labels"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "share of groups kept out for evaluation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the group split (evaluate.py must use the same)"})
    max_train_rows: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in --output_dir"})


def parse_args(argv=None):
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((DistillArguments, SFTConfig, ModelConfig), allow_abbrev=False)
    gpu = on_gpu()
    parser.set_defaults(
        model_name_or_path=DEFAULT_STUDENT,
        use_peft=True, lora_r=32, lora_alpha=16, lora_target_modules=["all-linear"],
        # PEFT 0.21 turns all-linear on a transformers-5 MoE into fused expert parameters, which refuse dropout.
        lora_dropout=0.0,
        # Explicit dtype: bf16 on GPU; fp32 on CPU, where bf16 fails in SFTConfig and runs ~10x slower.
        dtype="bfloat16" if gpu else "float32", bf16=gpu,
        completion_only_loss=True,  # our rows are pre-tokenized with a completion mask: keep it in force
        report_to="wandb" if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "none",
        logging_steps=1, save_strategy="no",
        output_dir="",  # TrainingArguments turns None into ./trainer_output; "" lets us default to models/<run name>
    )
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    short_name = Path(model_args.model_name_or_path.rstrip("/")).name
    rank = f"r{model_args.lora_r}" if model_args.use_peft else "full"
    gold = "-gold" if script_args.answer_field else ""
    default_name = f"{short_name}-{rank}-lr{training_args.learning_rate:g}-bs{batch}{gold}"
    training_args.run_name = training_args.run_name or default_name
    training_args.output_dir = training_args.output_dir or f"models/{training_args.run_name}"
    if training_args.resume_from_checkpoint in ("true", "True", "last"):
        training_args.resume_from_checkpoint = True  # the last checkpoint in output_dir
    return script_args, training_args, model_args


def load_rows(script_args) -> list[dict]:
    if Path(script_args.dataset_name).exists():
        return read_jsonl(script_args.dataset_name)
    import datasets

    return list(datasets.load_dataset(script_args.dataset_name, split=script_args.dataset_split))


def build_trainer(script_args, training_args, model_args):
    """The SFTTrainer over the train side of the split, and the row counts for the run record."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer, get_peft_config

    from distill.training import query_and_answer, tokenize, training_rows

    rows = load_rows(script_args)
    train, dropped = training_rows(rows, script_args.heldout_fraction, script_args.split_seed)
    if script_args.max_train_rows:
        train = train[: script_args.max_train_rows]
    if not train:
        raise InputError(f"{script_args.dataset_name}: no training rows left after the held-out split")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                              trust_remote_code=training_args.trust_remote_code)
    examples = []
    for number, row in enumerate(train, start=1):
        try:
            examples.append(tokenize(tokenizer, *query_and_answer(row, script_args.answer_field)))
        except (KeyError, StopIteration, TypeError) as error:
            raise InputError(f"{script_args.dataset_name}: row {row.get('id', number)} lacks a user turn or "
                             f"its answer ({error!r})") from None
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": training_args.trust_remote_code,
        "revision": model_args.model_revision,
    }
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    counts = {"rows_in_file": len(rows), "heldout_rows_dropped": dropped, "rows_used": len(train),
              "answer_source": script_args.answer_field or "assistant turn (teacher)"}
    return trainer, counts


def check_output_dir(script_args, training_args):
    out = Path(training_args.output_dir)
    if (out / RUN_RECORD).exists() and not training_args.resume_from_checkpoint:
        finished = json.loads((out / RUN_RECORD).read_text()).get("status") == "finished"
        if finished and not script_args.overwrite:
            sys.exit(f"error: {out} holds a finished run; pass --overwrite to replace it or --output_dir elsewhere")
        if finished:
            shutil.rmtree(out)


def main(argv=None):
    script_args, training_args, model_args = parse_args(argv)
    check_output_dir(script_args, training_args)
    config = {"script": asdict(script_args), "model": asdict(model_args), "training": training_args.to_dict()}
    record = RunRecord("train_sft_trl", config)
    try:
        trainer, counts = build_trainer(script_args, training_args, model_args)
    except InputError as error:
        sys.exit(f"error: {error}")
    print(f"train: {counts['rows_used']} rows ({counts['heldout_rows_dropped']} held-out rows dropped) of "
          f"{script_args.dataset_name}; model {model_args.model_name_or_path} ({model_args.dtype}), "
          f"{'LoRA r%d alpha%d' % (model_args.lora_r, model_args.lora_alpha) if model_args.use_peft else 'full'}, "
          f"run {training_args.run_name} -> {training_args.output_dir}")
    if "wandb" in trainer.args.report_to:
        trainer.add_callback(WandbConfigCallback(config))
    record.finish(Path(training_args.output_dir) / RUN_RECORD, status="running", counts=counts)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.processing_class.save_pretrained(training_args.output_dir)
    record.finish(Path(training_args.output_dir) / RUN_RECORD, status="finished", counts=counts,
                  train_metrics=result.metrics, log_history=trainer.state.log_history)
    trainer.end()
    print(f"train: done, loss {result.metrics.get('train_loss'):.4f}, "
          f"{result.metrics.get('train_runtime'):.1f} s -> {training_args.output_dir}")


class WandbConfigCallback(TrainerCallback):
    """TRL logs the trainer's args to wandb; this adds the data and LoRA settings so the run page has them all."""

    def __init__(self, config):
        self.config = config

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is not None:
            wandb.config.update({"distill": self.config["script"], "model_config": self.config["model"]},
                                allow_val_change=True)


if __name__ == "__main__":
    main()
