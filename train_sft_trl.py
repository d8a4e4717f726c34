"""Stage 2: LoRA-SFT the student on (query -> teacher answer), without the prompt. Loss on the answer only.

    python train_sft_trl.py --config recipes/tinker.yaml                       # Qwen3-4B-Instruct-2507, 1 GPU
    NUM_GPUS=8 ./train_trl.sh                                                  # Qwen3-30B-A3B student, FSDP on 8
    python train_sft_trl.py --config recipes/tinker_30b_fsdp.yaml --plan_only --plan_gpus 8   # memory plan only
    python train_sft_trl.py --config recipes/cpu.yaml --dataset_name data/teacher.jsonl   # the CPU demo recipe
    python train_sft_trl.py --config recipes/cpu.yaml --answer_field label    # same rows, gold labels

Every SFTConfig / TrainingArguments flag and every ModelConfig flag of TRL is a flag here (--learning_rate,
--lora_r, --lora_target_parameters, ...); `--config X.yaml` sets defaults that flags override; unknown keys are
errors. LoRA r32 / alpha32 (tinker-cookbook's) on all linear layers is the default, with an MoE router left frozen
(`--train_router` opts in); `--use_peft false` trains the full model.

`--global_batch_size` fixes the rows per optimizer step at any GPU count: gradient accumulation is derived from it,
the world size and the micro-batch, which `--micro_batch_tokens` can size from the data's mean row length. Before any
weight loads, a memory plan (distill/plan.py) is printed and stored; a plan that does not fit the GPUs stops the run.
Under accelerate/FSDP only rank 0 writes files, and a run is `finished` only once its adapter is on disk and loads.

`--distill_loss kd` (or `kd+ce`, mixed by --kd_alpha) trains on the teacher's soft targets instead of only its
answer: forward KL from the teacher's renormalised top-K log-probabilities (stage 1's --save_logprobs sidecar) to
the student, at temperature --kd_temperature, on the answer tokens; the end-of-turn token keeps CE. It needs the
teacher's tokenizer (checked by hash, refused otherwise). A file without a sidecar whose rows have votes
(--num_samples > 1) gives vote-share soft labels on the answer's first token instead, for any tokenizer.

    python train_sft_trl.py --config recipes/cpu.yaml --dataset_name data/teacher.jsonl --distill_loss kd

A conversation's row (stage 1 on a `messages` input) trains on its last assistant turn, the teacher's answer; the
turns before it are the student's prompt. The student's prompt carries the prompt file's student side
(`student_system_prompt`, `student_template`), read from the stage-1 run record beside --dataset_name and stored in
distill_run.json, where evaluate.py checks its prompt file against it.

Rows whose group (or id) falls on the held-out side of the split that evaluate.py uses never reach the trainer.
The output dir (default models/<run name>) gets the adapter, the tokenizer, distill_run.json (resolved config,
command line, git revision, rows used and dropped, train metrics) and fingerprint.json: the trained model's
log-probabilities of the first --fingerprint_probes training rows' answers and of its own greedy answers to them,
which evaluate.py checks the served model against (distill/fingerprint.py).
"""

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill import fingerprint, sft_setup
from distill.checkpoint import save_adapter
from distill.defaults import STUDENT_MODEL, StudentRunArguments, wandb_enabled
from distill.engine import on_gpu
from distill.records import TRAIN_RUN_RECORD as RUN_RECORD
from distill.records import InputError, RunRecord
from distill.trainer_setup import (
    WandbConfigCallback,
    finish_record,
    lora_config,
    parse_recipe,
    plan_memory,
    stop_or_clear,
)


@dataclass
class DistillArguments(StudentRunArguments):
    dataset_name: str = field(default="data/teacher.jsonl", metadata={
        "help": "stage-1 chat JSONL (local path), or a .parquet/.arrow file, a dataset dir or a hub dataset of that "
                "schema"})
    dataset_split: str = field(default="train", metadata={"help": "split to load from a dataset dir or hub dataset"})
    messages_field: str = field(default="messages", metadata={
        "help": "the column of role/content turns ending in the assistant's answer (stage 1 writes `messages`)"})
    answer_field: str | None = field(default=None, metadata={
        "help": "train on this column instead of the assistant turn, e.g. `label` for the gold labels"})
    global_batch_size: int | None = field(default=None, metadata={
        "help": "rows per optimizer step summed over all processes; sets gradient_accumulation_steps"})
    micro_batch_tokens: int | None = field(default=None, metadata={
        "help": "size each process's micro-batch as the most rows (a divisor of its share of the global batch) whose "
                "mean-length total stays within this many tokens; needs --global_batch_size"})
    distill_loss: str = field(default="ce", metadata={
        "help": "ce: cross-entropy on the teacher's answer; kd: KL from the teacher's top-K log-probabilities "
                "(or vote shares) on answer tokens; kd+ce: kd_alpha * KD * T^2 + (1 - kd_alpha) * CE",
        "choices": ["ce", "kd", "kd+ce"]})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student in KD"})
    kd_alpha: float = field(default=0.5, metadata={"help": "weight of the KD term in --distill_loss kd+ce"})


def parse_args(argv=None):
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((DistillArguments, SFTConfig, ModelConfig), allow_abbrev=False)
    gpu = on_gpu()
    parser.set_defaults(
        model_name_or_path=STUDENT_MODEL,
        use_peft=True, lora_r=32, lora_alpha=32, lora_target_modules=["all-linear"],
        # PEFT 0.21 turns all-linear on a transformers-5 MoE into fused expert parameters, which refuse dropout.
        lora_dropout=0.0,
        # Explicit dtype: bf16 on GPU; fp32 on CPU, where bf16 fails in SFTConfig and runs ~10x slower.
        dtype="bfloat16" if gpu else "float32", bf16=gpu,
        completion_only_loss=True,  # our rows are pre-tokenized with a completion mask: keep it in force
        report_to="wandb" if wandb_enabled() else "none",
        logging_steps=1, save_strategy="no",
        output_dir="",  # TrainingArguments turns None into ./trainer_output; "" lets us default to models/<run name>
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plan_only" in argv and not gpu:
        argv += ["--bf16", "false"]  # a plan needs no GPU, but TrainingArguments refuses a bf16 recipe without one
    script_args, training_args, model_args = parse_recipe(parser, argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    if script_args.micro_batch_tokens and not script_args.global_batch_size:
        parser.error("--micro_batch_tokens sizes micro-batches within --global_batch_size; set both")
    if script_args.distill_loss != "ce":
        if script_args.kd_temperature <= 0 or not 0 <= script_args.kd_alpha <= 1:
            parser.error("--kd_temperature must be > 0 and --kd_alpha in [0, 1]")
        if training_args.packing or training_args.truncation_mode != "keep_start":
            parser.error(f"--distill_loss {script_args.distill_loss} places the teacher's targets by token position: "
                         "it needs --packing false and --truncation_mode keep_start")
    if script_args.global_batch_size and not script_args.micro_batch_tokens:
        from distill.training import derive_batch

        try:
            training_args.gradient_accumulation_steps = derive_batch(
                script_args.global_batch_size, world_size, training_args.per_device_train_batch_size)
        except ValueError as error:
            parser.error(str(error))
    batch = script_args.global_batch_size or (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size)
    short_name = Path(model_args.model_name_or_path.rstrip("/")).name
    rank = f"r{model_args.lora_r}" if model_args.use_peft else "full"
    gold = "-gold" if script_args.answer_field else ""
    default_name = f"{short_name}-{rank}-lr{training_args.learning_rate:g}-bs{batch}{gold}"
    training_args.run_name = training_args.run_name or default_name
    training_args.output_dir = training_args.output_dir or f"models/{training_args.run_name}"
    if training_args.resume_from_checkpoint in ("true", "True", "last"):
        training_args.resume_from_checkpoint = True  # the last checkpoint in output_dir
    training_args.model_init_kwargs = {  # how SFTTrainer loads the model from its name
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": training_args.trust_remote_code,
        "revision": model_args.model_revision,
    }
    return script_args, training_args, model_args


def main(argv=None):
    from accelerate import PartialState

    script_args, training_args, model_args = parse_args(argv)
    processes = PartialState()  # one per GPU under accelerate launch; only the main one writes files
    # Resolved once: dropping the router builds the model on the meta device, which the plan and trainer share.
    peft_config = lora_config(model_args, script_args.train_router, training_args.trust_remote_code)
    plan, on_gpus, config_source = plan_memory(script_args, training_args, model_args, peft_config)
    if processes.is_main_process and (on_gpus or script_args.plan_only):
        argv = list(sys.argv[1:] if argv is None else argv)
        recipe = argv[argv.index("--config") + 1] if "--config" in argv else "no --config"
        print(f"memory plan for {model_args.model_name_or_path} ({recipe}); config: {config_source}")
        print(plan.format())
    elif processes.is_main_process:
        print("memory plan: CPU run, no GPU to plan for")
    stop_or_clear(plan, on_gpus, script_args, training_args, processes)

    try:
        data = sft_setup.prepare(script_args, training_args, model_args)
    except InputError as error:
        sys.exit(f"error: {error}")
    # From here on nothing changes the arguments: the record says what trains.
    config = {"script": asdict(script_args), "model": asdict(model_args), "training": training_args.to_dict()}
    record = RunRecord("train_sft_trl", config)
    record_path = Path(training_args.output_dir) / RUN_RECORD
    trainer = sft_setup.build_trainer(script_args, training_args, model_args, data, peft_config)
    counts = data.counts
    report = {"counts": counts, "memory_plan": plan.to_dict(), "split": {
        "heldout_fraction": script_args.heldout_fraction, "split_seed": script_args.split_seed}, **data.student}
    batch = counts["batch"]
    if processes.is_main_process:
        print(f"train: {counts['rows_used']} rows ({counts['heldout_rows_dropped']} held-out rows dropped) of "
              f"{script_args.dataset_name}; model {model_args.model_name_or_path} ({model_args.dtype}), "
              f"{f'LoRA r{model_args.lora_r} alpha{model_args.lora_alpha}' if model_args.use_peft else 'full'}; "
              f"batch {batch['global_batch']} = {batch['micro_batch']} rows x {batch['gradient_accumulation_steps']} "
              f"steps x {batch['world_size']} processes; run {training_args.run_name} -> {training_args.output_dir}")
        if "distillation" in counts:
            kd = counts["distillation"]
            print(f"train: --distill_loss {kd['loss']} from {kd['source']} (T {kd['temperature']}, alpha "
                  f"{kd['alpha']}): {kd['rows_distilled']} rows distilled, {kd['rows_ce_fallback']} on CE "
                  f"(their answer "
                  "tokens differ from the teacher's, or they have no targets)")
        record.mark_running(record_path, **report)
    if "wandb" in trainer.args.report_to:
        trainer.add_callback(WandbConfigCallback(config))
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    saved_tensors = save_adapter(trainer, training_args.output_dir)
    # Every rank: the trained model, still in memory, scores the probes (a collective under FSDP); rank 0 writes.
    report["fingerprint"] = fingerprint.record_trained(trainer, data.probes, training_args.output_dir)
    if processes.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        finish_record(record, record_path, report, result, trainer, model_args, saved_tensors)
    trainer.end()  # also ends the process group under a launcher: no collective may follow


if __name__ == "__main__":
    main()
