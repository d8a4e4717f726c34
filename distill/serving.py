"""Owns how evaluation serves the model it scores (LoRA or merged) and what it checks first; must not score.

How evaluate.py serves the model it scores, what it checks about it before the engine starts, and the served
model's answers.

A full model is served as is. A LoRA adapter is served through vLLM's LoRA support on GPU, with max_lora_rank
taken from every rank the adapter holds; on CPU (where vLLM's LoRA path is >10x slower), or on GPU with
--merge_lora, it is merged once into <adapter>/merged and served as a plain model. max_model_len defaults to what
the data needs, not the model's full context (262k for Qwen3-2507, whose KV cache would not fit beside a 30B
model). An adapter's run record says which split it trained on; scoring on another split's rows is refused, and so
is a prompt file whose student side (student_system_prompt, student_template) is not the one the record stores.
An adapter with fused MoE expert LoRA (PEFT target_parameters) is served on GPU in vLLM's 3D MoE LoRA layout
(enable_mixed_moe_lora_format, is_3d_lora_weight), which vLLM 0.32 asks for; whichever path serves, evaluate.py's
fingerprint check (distill/fingerprint.py) proves it reproduces the trained student, and `mismatch_advice` says what
to do when it does not.

`generate` asks the served model for every row's answer, greedy: the student through plain vLLM generation, a
teacher given the prompt (--with_prompt) through stage 1's teacher path, then a few rows one at a time for latency.
"""

import hashlib
import json
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from distill.prompts import StudentSide
from distill.records import TRAIN_RUN_RECORD

MERGE_KEY = "merge_key.json"


@dataclass
class Serving:
    description: str  # goes into the report: which path ran
    engine_overrides: dict  # LLM(...) arguments that replace the CLI's
    lora_path: str | None = None  # set when vLLM applies the adapter itself
    config_source: str = ""  # where the served model's config.json is (for max_position_embeddings)
    fused_expert_lora: bool = False  # the adapter holds fused MoE expert tensors (PEFT target_parameters)
    mismatch_advice: str = ""  # the likely cause and fix when the served model fails the fingerprint check

    def lora_request(self):
        if self.lora_path is None:
            return None
        from vllm.lora.request import LoRARequest

        # PEFT's target_parameters store a layer's experts as two fused 3D tensors; vLLM 0.32 loads those only when
        # the request says so (and the engine has enable_mixed_moe_lora_format), else it refuses the adapter.
        return LoRARequest("student", 1, self.lora_path, is_3d_lora_weight=self.fused_expert_lora)


def is_adapter(model_path: Path) -> bool:
    return (model_path / "adapter_config.json").exists()


def serve(model_path: Path, base_model: str | None, merge_lora: bool, gpu: bool) -> Serving:
    """The serving path for model_path; merges the adapter (or reuses the cached merge) when that path is chosen."""
    if not is_adapter(model_path):
        return Serving("full model", {"model": str(model_path)}, config_source=str(model_path),
                       mismatch_advice=f"{model_path} is not the model training fingerprinted: were its weights "
                                       f"changed after training?")
    adapter_config = json.loads((model_path / "adapter_config.json").read_text())
    base_model = base_model or adapter_config["base_model_name_or_path"]
    if gpu and not merge_lora:
        rank = max_lora_rank(adapter_config)
        fused = bool(adapter_config.get("target_parameters"))
        return Serving(f"vLLM LoRA adapter on the base model (max_lora_rank {rank}"
                       f"{', fused MoE experts in the 3D layout' if fused else ''})",
                       {"model": base_model, "enable_lora": True, "max_lora_rank": rank,
                        **({"enable_mixed_moe_lora_format": True} if fused else {})},
                       lora_path=str(model_path), config_source=base_model, fused_expert_lora=fused,
                       mismatch_advice=f"vLLM's LoRA support did not reproduce the adapter on {base_model} (it is "
                                       f"reported to drop or mis-load LoRA on fused MoE experts; or the base differs "
                                       f"from training's): pass --merge_lora to serve it merged into its base")
    dtype = "bfloat16" if gpu else "float32"
    why = "--merge_lora" if gpu else "CPU: vLLM's LoRA path is >10x slower"
    merged = merged_copy(model_path, base_model, dtype)
    return Serving(f"adapter merged into the base, {dtype} ({why})", {"model": str(merged)},
                   config_source=str(merged),
                   mismatch_advice=f"the adapter merged into {base_model} ({merged}) is not the trained student: "
                                   f"is {base_model} the base it trained on (--base_model)? Delete {merged} to "
                                   f"rebuild the merge")


def max_lora_rank(adapter_config: dict) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every rank in the adapter.

    PEFT keeps per-module ranks, target_parameters (fused MoE experts) included, in rank_pattern; vLLM refuses an
    adapter whose largest rank exceeds max_lora_rank, and accepts only the values of its MaxLoRARanks.
    """
    from vllm.config.lora import MaxLoRARanks

    largest = max([adapter_config["r"], *(adapter_config.get("rank_pattern") or {}).values()])
    supported = sorted(typing.get_args(MaxLoRARanks))
    fitting = [rank for rank in supported if rank >= largest]
    if not fitting:
        raise ValueError(f"the adapter has LoRA rank {largest}; vLLM serves ranks up to {supported[-1]}: "
                         f"pass --merge_lora to serve it merged into its base")
    return fitting[0]


def merge_key(adapter_dir: Path, base_model: str, dtype: str) -> dict:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter_dir / name).read_bytes())
    return {"adapter_sha256": digest.hexdigest(), "base_model": base_model, "dtype": dtype}


def merged_copy(adapter_dir: Path, base_model: str, dtype: str) -> Path:
    """The adapter merged into its base in `dtype`, cached in <adapter>/merged and rebuilt when the adapter, the
    base or the dtype changes. Written to a temporary dir and renamed, so a killed merge leaves no half copy."""
    merged = adapter_dir / "merged"
    key = merge_key(adapter_dir, base_model, dtype)
    if (merged / MERGE_KEY).exists() and json.loads((merged / MERGE_KEY).read_text()) == key:
        return merged
    started = time.time()
    tmp = Path(tempfile.mkdtemp(dir=adapter_dir, prefix="merged.tmp-"))
    try:
        write_merged(adapter_dir, base_model, dtype, tmp)
        (tmp / MERGE_KEY).write_text(json.dumps(key, indent=1))
        replace_dir(tmp, merged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"evaluate: merged the adapter into {merged} ({dtype}, {time.time() - started:.1f} s)")
    return merged


def write_merged(adapter_dir: Path, base_model: str, dtype: str, output_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_cuda = torch.cuda.is_available()
    # On GPU the merge runs there (minutes on CPU for a 30B model); the memory is released before vLLM starts.
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype),
                                                device_map="auto" if on_cuda else None)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    del base, model
    if on_cuda:
        torch.cuda.empty_cache()


def replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an old `target` is moved aside first, so a reader never sees a half-written dir."""
    old = target.with_name(f"{target.name}.old-{new.name}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def max_model_len(prompt_ids: list[list[int]], max_tokens: int, config_source: str,
                  trust_remote_code: bool = False) -> int:
    """The context the data needs: the longest prompt plus the tokens to generate, within the model's positions."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_source, trust_remote_code=trust_remote_code).get_text_config()
    return min(max(map(len, prompt_ids)) + max_tokens, config.max_position_embeddings)


@dataclass
class SplitCheck:
    """What the model's run record says about the rows scored; goes into the results JSON."""

    record: str | None = None
    trained_heldout_fraction: float | None = None
    trained_split_seed: int | None = None
    scored_rows_trained_on: bool | None = None  # None: no record, cannot tell
    notes: list[str] = field(default_factory=list)


def check_split(model_path: Path, split: str, heldout_fraction: float, split_seed: int) -> SplitCheck:
    """Refuses (ValueError) an evaluation whose split differs from the one the model trained with.

    --split train or all on a trained model is allowed, and the check says those rows were trained on.
    """
    record_path = model_path / TRAIN_RUN_RECORD
    if not record_path.exists():
        check = SplitCheck()
        if is_adapter(model_path):
            check.notes.append(f"warning: {record_path} is missing: cannot check that the {split} split matches "
                               f"the one the adapter trained with")
        return check
    script = json.loads(record_path.read_text())["args"]["script"]
    check = SplitCheck(str(record_path), script["heldout_fraction"], script["split_seed"])
    if split != "all" and (heldout_fraction, split_seed) != (check.trained_heldout_fraction, check.trained_split_seed):
        raise ValueError(
            f"{record_path}: the model trained with heldout_fraction {check.trained_heldout_fraction}, split_seed "
            f"{check.trained_split_seed}, but this evaluation splits with heldout_fraction {heldout_fraction}, "
            f"split_seed {split_seed}, so its {split} rows are not the ones training set aside; pass "
            f"--heldout_fraction {check.trained_heldout_fraction} --split_seed {check.trained_split_seed}")
    check.scored_rows_trained_on = split != "heldout"
    if check.scored_rows_trained_on:
        check.notes.append(f"note: the {split} split includes rows this model trained on "
                           f"(the train side of its split): the score is not a held-out score")
    return check


def check_student(model_path: Path, student: StudentSide) -> None:
    """Refuses (ValueError) a prompt file whose student side (student_system_prompt, student_template) is not the one
    the model trained with: its run record stores it (a record from before student sides: the bare query)."""
    record_path = model_path / TRAIN_RUN_RECORD
    if not record_path.exists():
        return
    trained = StudentSide.from_dict(json.loads(record_path.read_text()).get("student"))
    if trained != student:
        raise ValueError(f"{record_path}: the model trained with the student side {trained.to_dict()}, but the prompt "
                         f"file gives the student {student.to_dict()}: its student_system_prompt / student_template "
                         f"must be the ones the model trained with")


# ---- the served model's answers ------------------------------------------------------------------------------


@dataclass
class Generation:
    raw: list[str]  # every row's output as the model wrote it
    answers: list[str | None]  # labels (None: unparsed), or generative answers (None: broke the contract)
    output_tokens: list[int]
    reasons: list[str]  # "ok", or why the output broke the answer contract (a generative task's cut / empty / ...)
    seconds: float
    latencies: list[float]
    sampling: dict


def generate(llm, tokenizer, rows, prompt_ids, prompt, args, lora_request) -> Generation:
    """Greedy answers for every row, then a few rows one at a time for latency. Greedy (temperature 0) is
    evaluation's one override of the model's sampling defaults. With --with_prompt the rows go through stage 1's
    teacher path (distill.teacher: same rendering, constraint and parsing, no redraws), so a query gets the label
    (or generative answer) create_data.py gives it at --temperature 0."""
    from distill.sampling import effective_sampling, sampling_params
    from distill.teacher import Teacher, VllmEngine

    teacher = None
    if args.with_prompt:
        # keep_rule_failures: an evaluation scores every rule on every answer; stage 1 is what rejects
        teacher = Teacher(tokenizer, prompt, llm.model_config.max_model_len, args.constrain_labels,
                          keep_rule_failures=True)
    # The task's stop strings hold for every model scored on it (base, teacher, student), so answers compare alike.
    params = sampling_params(llm.get_default_sampling_params(), {"temperature": 0.0}, max_tokens=args.max_tokens,
                             structured_outputs=teacher.constraint() if teacher else None, **prompt.stop_sampling())
    if teacher:
        answer, items = teacher_answers(VllmEngine(llm, lora_request), teacher, params), rows
    else:
        answer, items = student_answers(llm, params, lora_request, prompt), prompt_ids
    started = time.time()
    outputs, answers, output_tokens, reasons = answer(items)
    seconds = time.time() - started
    latencies = []
    for item in items[: args.latency_requests]:
        started = time.time()
        answer([item])
        latencies.append(time.time() - started)
    return Generation(outputs, answers, output_tokens, reasons, seconds, latencies, effective_sampling(params))


def teacher_answers(vllm_engine, teacher, params):
    """The teacher given the prompt answers through stage 1's stream, one sample per query, no redraws."""
    from distill.answers import split_reasoning
    from distill.teacher import stream

    def answer(rows):
        """Outcomes stream back in any order; each is put back in its row's place by id."""
        by_id = {o.row["id"]: o for o in stream(vllm_engine, teacher, rows, params,
                                                 max_in_flight=vllm_engine.max_num_seqs)}
        outcomes = [by_id[row["id"]] for row in rows]
        first = [(o.samples + o.failures)[0] if o.samples + o.failures else None for o in outcomes]
        raw = [sample.text if sample else "" for sample in first]
        # The contract alone (no query: echo, loop and topic are judged with the student's answers, in one place).
        reasons = [teacher.parse(sample.text, sample.finish_reason).reason if sample else "empty_answer"
                   for sample in first]
        if teacher.prompt.is_generative:
            # Scored as written within --max_tokens, cut or not, exactly as the student's answers are: stage 1
            # refuses a cut answer as a training target, but a score must measure teacher and student alike.
            answers = [(split_reasoning(text, teacher.expects_reasoning)[0] or "").strip() for text in raw]
        else:
            answers = [o.answer for o in outcomes]
        return raw, answers, [sample.output_tokens if sample else 0 for sample in first], reasons

    return answer


def student_answers(llm, params, lora_request, prompt):
    """The student answers with a bare label, or on a generative task with its whole (stripped) text."""
    from vllm.inputs import TokensPrompt

    from distill.answers import parse_generative, parse_student

    def answer(prompt_ids):
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        completions = [o.outputs[0] for o in llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)]
        outputs = [completion.text for completion in completions]
        if prompt.is_generative:
            answers = [text.strip() for text in outputs]
            reasons = [parse_generative(c.text, c.finish_reason).reason for c in completions]
        else:
            answers = [parse_student(text, prompt.labels) for text in outputs]
            reasons = ["ok" if label else "unparsed" for label in answers]
        return outputs, answers, [len(completion.token_ids) for completion in completions], reasons

    return answer
