"""Stage 2b: on-policy prompt distillation. The student answers the training queries without the prompt; a teacher
that reads the prompt grades every token the student sampled; LoRA learns to lower TRL's generalized JSD between the
two on those tokens (--beta 1, the default: reverse KL, the student's own mistakes are the ones it pays for).

    # the CPU demo: the embedded model is its own teacher (adapter off, prompt on), warm-started from the SFT student
    python train_opd_trl.py --config recipes/opd_cpu.yaml --prompt_file prompts/in_short.md \
        --dataset_name example-data/general_questions.jsonl --init_adapter models/demo-in_short
    # 8 x H100: the Qwen3-30B-A3B-Thinking teacher on a vLLM server (TP 4), the Qwen3-4B student on the other GPUs
    python -m distill.teacher_server Qwen/Qwen3-30B-A3B-Thinking-2507 --tensor-parallel-size 4 --max-logprobs 1 &
    python train_opd_trl.py --config recipes/opd_4b_server.yaml --teacher_server_url http://127.0.0.1:8000

Teachers: the student's own base with the adapter disabled (the default; one model in memory), another model in this
process (--teacher_model_name_or_path; its tokenizer must be the student's, checked before any weights load), or a
vLLM server (--teacher_server_url; `python -m distill.teacher_server MODEL --max-logprobs 1` scores with prompt_logprobs
and reads the prompt from its prefix cache, `vllm serve` recomputes it per request; reachability is checked first; the
teacher's input is rendered with its own tokenizer and chat template, --teacher_tokenizer_name_or_path or the model the
server serves). The teacher sees the prompt file's system prompt, example turns and query template
(distill/render.py), in the final-answer state the student writes in (a thinking teacher gets an empty think block, a
hybrid Qwen3 one enable_thinking=False: it scores a final answer, not the start of a thought). An in-process teacher
computes the prompt's KV cache once per run (--prompt_cache) and runs in eval mode, so TRL's default gradient
checkpointing cannot drop it. Every run proves its teacher reads the prompt (distill/onpolicy.py): the cache must hold
the whole prefix and, at the first step, the teacher's log-probabilities of the sampled answers must differ with and
without the prompt; else it stops, and distill_run.json's teacher_checks keeps the figures. Refused before weights
load: the self-teacher without LoRA (--use_peft false: no adapter to disable) and --use_liger_kernel (fused kernels
bypass the prompted teacher).

The queries: a stage-1 JSONL (its user turns; the teacher's answers there are ignored, and the run says so) or any
query input create_data.py reads, conversations included (the student sees a conversation's turns, with the prompt
file's student side: `student_system_prompt`, `student_template`; the teacher, the prompt file's system prompt and
example turns before them). Held-out groups never train. --init_adapter warm-starts from a stage-2 adapter.
Every DistillationConfig flag of TRL (--beta, --max_completion_length, --temperature, --use_vllm, --vllm_mode, ...)
and every ModelConfig flag is a flag here; --config X.yaml sets defaults that flags override. The output dir gets the
adapter, tokenizer, distill_run.json (config, command line, git revision, teacher, losses, teacher tokens spent) and
fingerprint.json (--fingerprint_probes training queries, each with the trained model's own greedy answer, scored by
it: distill/fingerprint.py), and evaluate.py scores it unchanged.
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.defaults import STUDENT_MODEL, StudentRunArguments, wandb_enabled
from distill.engine import on_gpu
from distill.opd_setup import probe_server_in
from distill.prompts import DEFAULT_PROMPT
from distill.records import TRAIN_RUN_RECORD as RUN_RECORD
from distill.records import InputError, RunRecord


@dataclass
class OnPolicyArguments(StudentRunArguments):
    dataset_name: str = field(default="data/teacher.jsonl", metadata={
        "help": "queries: a stage-1 JSONL (its user turns; the teacher's answers are ignored), or queries as "
                "create_data.py reads them (.txt/.jsonl/.csv/.parquet/.arrow, a dataset dir or name; texts or "
                "conversations)"})
    text_field: str = field(default="text", metadata={"help": "query column of a query file"})
    messages_field: str = field(default="messages", metadata={
        "help": "conversation column of a query file (role/content turns ending in a user turn)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a dataset dir or hub dataset"})
    prompt_file: str = field(default=str(DEFAULT_PROMPT), metadata={"help": "the prompt the teacher reads"})
    teacher_server_url: str | None = field(default=None, metadata={
        "help": "a vLLM server of the teacher (python -m distill.teacher_server MODEL --max-logprobs 1), e.g. "
                "http://127.0.0.1:8000"})
    teacher_tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "a server teacher's tokenizer and chat template (a local dir offline; unset: the model the server "
                "says it serves); its vocabulary must be the student's"})
    init_adapter: str | None = field(default=None, metadata={
        "help": "warm start: a stage-2 adapter dir (its LoRA weights and config), else LoRA starts from the base"})
    prompt_cache: bool = field(default=True, metadata={
        "help": "an in-process teacher computes the prompt's KV cache once per run, not once per row"})


def parse_args(argv=None):
    from trl import DistillationConfig, ModelConfig, TrlParser

    from distill.trainer_setup import parse_recipe

    parser = TrlParser((OnPolicyArguments, DistillationConfig, ModelConfig), allow_abbrev=False)
    gpu = on_gpu()
    parser.set_defaults(
        model_name_or_path=STUDENT_MODEL,
        use_peft=True, lora_r=32, lora_alpha=32, lora_target_modules=["all-linear"], lora_dropout=0.0,
        dtype="bfloat16" if gpu else "float32", bf16=gpu,
        beta=1.0,  # reverse KL: the student is graded on what it samples
        learning_rate=1e-4,  # tinker-cookbook's LoRA rate (TRL's 1e-6 is for full fine-tuning)
        max_completion_length=256, chat_template_kwargs={"enable_thinking": False},
        report_to="wandb" if wandb_enabled() else "none", log_completions=wandb_enabled(),
        logging_steps=1, save_strategy="no", output_dir="",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plan_only" in argv and not gpu:
        argv += ["--bf16", "false"]
    script_args, training_args, model_args = parse_recipe(parser, argv)
    if script_args.teacher_server_url and training_args.teacher_model_name_or_path:
        parser.error("--teacher_server_url and --teacher_model_name_or_path name two teachers; keep one")
    if script_args.teacher_server_url and training_args.beta not in (0.0, 1.0):
        parser.error("a server teacher returns top-K log-probabilities only: use --beta 1 (reverse KL on the sampled "
                     "token) or --beta 0 (forward KL on the teacher's top-K)")
    teacher = teacher_name(script_args, training_args)
    short_name = Path(model_args.model_name_or_path.rstrip("/")).name
    warm = "-warm" if script_args.init_adapter else ""
    training_args.run_name = training_args.run_name or (
        f"{short_name}-opd-{teacher.split(':')[0]}-r{model_args.lora_r}-lr{training_args.learning_rate:g}{warm}")
    training_args.output_dir = training_args.output_dir or f"models/{training_args.run_name}"
    training_args.model_init_kwargs = None  # opd_setup loads the student itself: TRL gets a model, not its name
    return script_args, training_args, model_args


def teacher_name(script_args, training_args) -> str:
    if script_args.teacher_server_url:
        return f"server:{script_args.teacher_server_url}"
    if training_args.teacher_model_name_or_path:
        return f"model:{training_args.teacher_model_name_or_path}"
    return "self:the student's base, adapter disabled"


def main(argv=None):
    try:  # an unreachable teacher server fails in seconds, before TRL and torch are even imported
        probe_server_in(sys.argv[1:] if argv is None else argv)
    except InputError as error:
        sys.exit(f"error: {error}")
    from accelerate import PartialState

    from distill import fingerprint, opd_setup
    from distill.checkpoint import save_adapter
    from distill.onpolicy import PromptNotRead
    from distill.trainer_setup import WandbConfigCallback, finish_record, lora_config, plan_memory, stop_or_clear

    script_args, training_args, model_args = parse_args(argv)
    processes = PartialState()
    try:  # bad input fails here, before any weights load
        prompt = opd_setup.task_prompt(script_args.prompt_file)
        opd_setup.check_settings(script_args, training_args, model_args)
        opd_setup.check_warm_start(script_args.init_adapter, prompt)
        queries, source_note = opd_setup.training_queries(script_args)
        tokenizers = opd_setup.check_teacher(script_args, training_args, model_args)
    except (InputError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    peft_config = None if script_args.init_adapter else lora_config(
        model_args, script_args.train_router, training_args.trust_remote_code)
    plan, on_gpus, _ = plan_memory(script_args, training_args, model_args,
                                peft_config or opd_setup.adapter_config(script_args.init_adapter),
                                teacher_config=opd_setup.teacher_config(script_args, training_args))
    if processes.is_main_process:
        print(plan.format() if on_gpus or script_args.plan_only else "memory plan: CPU run, no GPU to plan for")
    stop_or_clear(plan, on_gpus, script_args, training_args, processes)

    config = {"script": asdict(script_args), "model": asdict(model_args), "training": training_args.to_dict()}
    record = RunRecord("train_opd_trl", config)
    record_path = Path(training_args.output_dir) / RUN_RECORD
    trainer = opd_setup.build_trainer(script_args, training_args, model_args, peft_config, prompt, queries.rows,
                                      tokenizers)
    report = {"counts": {**queries.counts, "query_source": source_note}, "memory_plan": plan.to_dict(),
              "teacher": teacher_name(script_args, training_args), "prompt_file": script_args.prompt_file,
              "prompt_sha256": prompt.sha256, "init_adapter": script_args.init_adapter,
              **opd_setup.student_record(prompt, queries.rows, tokenizers),
              "split": {"heldout_fraction": script_args.heldout_fraction, "split_seed": script_args.split_seed}}
    if processes.is_main_process:
        print(f"train_opd: {len(queries.rows)} training queries ({queries.counts['heldout_rows_dropped']} held-out "
              f"dropped; {source_note}); student {model_args.model_name_or_path}"
              f"{' from ' + script_args.init_adapter if script_args.init_adapter else ''}; teacher "
              f"{report['teacher']} reading {script_args.prompt_file}; beta {training_args.beta} -> "
              f"{training_args.output_dir}")
        record.mark_running(record_path, **report)
    if "wandb" in trainer.args.report_to:
        trainer.add_callback(WandbConfigCallback(config))
    try:
        result = trainer.train()
    except PromptNotRead as error:  # the teacher would have pulled the student back to its unprompted base
        if processes.is_main_process:
            record.write(record_path, status="failed", error=str(error), teacher_checks=trainer.teacher_checks(),
                          **report)
        sys.exit(f"error: {error}")
    report["teacher_checks"] = trainer.teacher_checks()
    saved_tensors = save_adapter(trainer, training_args.output_dir)
    report["fingerprint"] = fingerprint.record_trained(  # every rank
        trainer, fingerprint.query_probes(tokenizers.student, queries.rows, script_args.fingerprint_probes,
                                          prompt.student), training_args.output_dir)
    report["teacher_spend"] = trainer.spend.to_dict()
    if processes.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        finish_record(record, record_path, report, result, trainer, model_args, saved_tensors)
    trainer.end()


if __name__ == "__main__":
    main()
