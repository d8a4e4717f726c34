"""Owns the trained student's fingerprint, written at training and checked at serving; must not train or score.

The trained student's fingerprint: what evaluate.py proves about the model it serves before it scores anything.

At the end of training (stages 2 and 2b) the trained model, still in memory, writes <output_dir>/fingerprint.json
(docs/fingerprint.md). Its probes are --fingerprint_probes (default 8) training queries, each with the student's own
greedy answer (up to GREEDY_TOKENS tokens, cut after the end-of-turn token), and in stage 2 each also with its
training answer. On-policy training changes exactly what the student answers, so a dropped adapter moves its own
greedy answers most. For each probe the file keeps the rendered token ids (prompt + answer), the student's
log-probability of every answer token with the adapter and without it (its base), and their means. A noise floor is
measured on the same model: each probe's mean answer log-probability computed in fp32 and in bf16 (see `record`);
the tolerance is FLOOR_MULTIPLE x the largest such difference + MIN_TOLERANCE. Under FSDP every rank runs the same
forwards (each is a collective) and rank 0 writes.

evaluate.py then (1) refuses a fingerprint whose adapter moves no probe's mean beyond the tolerance (a dropped
adapter would pass: "inconclusive") unless --allow_inconclusive; (2) renders each probe's query through its own
path, with the tokenizer it serves with: the ids must equal the recorded prompt, else the template or tokenizer
changed since training (the first differing token is named); (3) checks that the engine stops on the end-of-turn token
training ended answers with; (4) asks the serving engine for the same answer tokens' log-probabilities (vLLM
prompt_logprobs) through the path it will score with (vLLM's LoRA support or a merged copy): every probe's mean must
stay within the tolerance of training's. A dropped, half-loaded or mis-loaded adapter (vLLM on fused MoE experts), a
different base, a stale merge all show up here, before any row is scored.
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

FINGERPRINT = "fingerprint.json"
VERSION = 2  # 1 (before 2026-12-07): the largest per-token difference against a fixed dtype tolerance, no floor
GREEDY_TOKENS = 32  # the student's own answer to a probe query: enough tokens for its effect to add up, few forwards
# tolerance = FLOOR_MULTIPLE x noise floor + MIN_TOLERANCE, in nats of a probe's mean answer log-probability.
# The floor is fp32 against bf16 in one implementation; training against serving stacks two implementations'
# roundings (and a bf16 merge of the adapter), hence the multiple: vLLM's CPU engine in bf16 came 0.3 to 1.6 floors
# from fp32 training (SmolLM2-135M, floor 0.060; the tiny test models, 0.0012 to 0.0018; in fp32, 5e-7 to 6e-6).
# The minimum covers a floor measured near zero. Figures: docs/fingerprint.md (2026-12-07, CPU).
FLOOR_MULTIPLE = 4.0
MIN_TOLERANCE = 0.01


class FingerprintMismatch(ValueError):
    """The served model is not the one training fingerprinted; the message names the cause and the fix."""


# ---- training: record --------------------------------------------------------------------------------------------


def probes(tokenizer, rows: list[tuple], student=None) -> list[dict]:
    """(id, query, answer) rows -> probes: the query (a text or a conversation), its training answer, and the ids
    training's tokenizing gives them (distill.training: the student's prompt, with its own side, the answer, the end
    of turn). `record` adds the student's own greedy answer to each query."""
    from distill.prompts import BARE_STUDENT
    from distill.render import student_example

    made = []
    for row_id, query, answer in rows:
        example = student_example(tokenizer, query, answer, student or BARE_STUDENT)
        made.append({"id": row_id, "query": query, "answer": answer, "source": "training",
                     "input_ids": example["input_ids"], "answer_start": example["completion_mask"].index(1),
                     "end_of_turn": example["input_ids"][-1]})
    return made


def query_probes(tokenizer, rows: list[dict], k: int, student=None) -> list[dict]:
    """Probe prompts for on-policy training, which has queries but no reference answers: the first k queries (a
    conversation's at its last user turn) without an answer; `record` gives each the student's own greedy answer."""
    from distill.render import query_of

    made = probes(tokenizer, [(row.get("id"), query_of(row), "") for row in rows[:k]], student)
    return [{**p, "answer": None, "source": None, "input_ids": p["input_ids"][: p["answer_start"]]} for p in made]


def answer_logprobs(model, input_ids: list[int], answer_start: int, device) -> list[float]:
    """log p(token | everything before it) for every token from answer_start on: one forward, no grad."""
    import torch

    ids = torch.tensor([input_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, answer_start - 1: -1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, answer_start:, None])[:, 0].tolist()


def greedy_answers(model, prompts: list[list[int]], end_of_turn: int, device) -> list[list[int]]:
    """The model's greedy answer to each prompt, all in one batch (left-padded, with the attention mask and the
    positions HF's generate would give): GREEDY_TOKENS forwards (the prompts, then one token a step on the KV cache),
    each answer then cut after its first end-of-turn token. No step is skipped once every answer has ended, so every
    rank runs the same number of forwards, as FSDP needs (each forward is a collective)."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[end_of_turn] * (width - len(p)) + p for p in prompts], device=device)  # pads: masked
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache, steps = None, []
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            # output_router_logits: an MoE whose config asks for them (TRL turns them on for the aux loss) would
            # compute that loss against a mask of every cached token for the new token's router logits, and fail;
            # a dense model ignores the argument
            output = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, output_router_logits=False)
            cache, ids = output.past_key_values, output.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(ids)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    answers = torch.cat(steps, dim=1).tolist()
    return [answer[: answer.index(end_of_turn) + 1] if end_of_turn in answer else answer for answer in answers]


def float32_linears():
    """A context in which every F.linear (each weight matmul: attention and MLP projections, LoRA, the LM head)
    computes in fp32 with autocast off, whatever dtype the weights are in: the fp32 side of the noise floor for a
    model trained in bf16 weights or under bf16 autocast, without an fp32 copy of the model (one weight is upcast
    at a time). A TorchFunctionMode, PyTorch's hook for changing how its functions compute within a context.
    Attention scores and fused MoE experts (not F.linear) compute as training does."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Float32Linears(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not torch.nn.functional.linear:
                return func(*args, **kwargs)
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            with torch.autocast(x.device.type, enabled=False):
                return func(x.float(), weight.float(), None if bias is None else bias.float())

    return Float32Linears()


def scored_in(model, probe_rows: list[dict], precision: str, device) -> list[list[float]]:
    """Every probe's answer log-probabilities with its forward computed in fp32 ("float32": float32_linears) or in
    bf16 ("bfloat16": torch.autocast, as accelerate's bf16 mixed precision runs it)."""
    import torch

    context = (float32_linears() if precision == "float32"
               else torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
    with context:
        return [answer_logprobs(model, p["input_ids"], p["answer_start"], device) for p in probe_rows]


def greedy_probes(model, probe_rows: list[dict], device, tokenizer=None) -> list[dict]:
    """Each probe's prompt with the model's own greedy answer (decoded by `tokenizer`, for people reading the file;
    "ended": it stopped at the end of turn, not at GREEDY_TOKENS)."""
    prompts = [p["input_ids"][: p["answer_start"]] for p in probe_rows]
    answers = greedy_answers(model, prompts, probe_rows[0]["end_of_turn"], device)
    return [{**p, "answer": tokenizer.decode(answer, skip_special_tokens=True) if tokenizer else None,
             "source": "greedy", "ended": answer[-1] == p["end_of_turn"], "input_ids": prompt + answer}
            for p, prompt, answer in zip(probe_rows, prompts, answers)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def tolerance_for(noise_floor: float) -> float:
    return FLOOR_MULTIPLE * noise_floor + MIN_TOLERANCE


def record(model, probe_rows: list[dict], output_dir: str, device, is_main_process: bool,
           compute_dtype: str | None = None, peft_model=None, tokenizer=None) -> dict | None:
    """Answers each probe's query greedily with `model`, scores every probe, measures the noise floor and writes
    FINGERPRINT into output_dir (main process only); returns a summary for the run record (None with no probes).
    Every process must call it: under FSDP each forward is a collective, which gathers the sharded parameters layer
    by layer. Probes with a training answer are kept beside the greedy ones.

    The probes' recorded log-probabilities are the model's as training computes them: in its parameters' dtype, or
    compute_dtype under mixed precision. The noise floor is the largest difference of a probe's mean answer
    log-probability between fp32 and bf16, the same model, the same ids: the recorded scores are one side, the
    other is scored again (recorded in fp32: under bf16 autocast; in bf16 or fp16: with float32_linears).
    peft_model (the PeftModel inside `model`): the probes are scored once more with the adapter disabled, so
    evaluation can tell whether the adapter moves them beyond the tolerance, i.e. whether the check could tell a
    dropped adapter at all. tokenizer: decodes the greedy answers."""
    if not probe_rows:
        return None
    dtype = compute_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    other = "bfloat16" if dtype == "float32" else "float32"  # the noise floor's other side
    was_training = model.training
    model.eval()  # no dropout: the served model scores deterministically
    try:
        kept = [p for p in probe_rows if p["answer"] is not None] + greedy_probes(model, probe_rows, device, tokenizer)
        scored = [{**p, "logprobs": answer_logprobs(model, p["input_ids"], p["answer_start"], device)} for p in kept]
        for p, logprobs in zip(scored, scored_in(model, kept, other, device)):
            p[f"{other}_mean"] = mean(logprobs)
        if peft_model is not None:
            with peft_model.disable_adapter():
                for p in scored:
                    p["base_logprobs"] = answer_logprobs(model, p["input_ids"], p["answer_start"], device)
                    p["base_mean"] = mean(p["base_logprobs"])
    finally:
        model.train(was_training)
    for p in scored:
        p["mean"] = mean(p["logprobs"])
    noise_floor = max(abs(p["mean"] - p[f"{other}_mean"]) for p in scored)
    fingerprint = {"version": VERSION, "dtype": dtype, "greedy_tokens": GREEDY_TOKENS, "noise_floor": noise_floor,
                   "noise_floor_method": f"the largest |mean answer log-probability as trained ({dtype}) - in "
                                         f"{other} ({other}_mean)| over the probes",
                   "tolerance": tolerance_for(noise_floor),
                   "tolerance_rule": f"{FLOOR_MULTIPLE:g} x noise_floor + {MIN_TOLERANCE:g}", "probes": scored}
    if is_main_process:
        (Path(output_dir) / FINGERPRINT).write_text(json.dumps(fingerprint, ensure_ascii=False, indent=1))
        if conclusive(fingerprint) is False:
            print(f"fingerprint: warning: {within_tolerance(fingerprint)}: evaluate.py cannot tell it from its base "
                  f"and refuses it unless --allow_inconclusive (train longer or at a higher learning rate)",
                  file=sys.stderr)
    return {"file": FINGERPRINT, "probes": len(scored), "greedy_probes": len(probe_rows), "dtype": dtype,
            "answer_tokens": sum(len(p["logprobs"]) for p in scored), "noise_floor": noise_floor,
            "tolerance": fingerprint["tolerance"], "adapter_effect": adapter_effect(fingerprint),
            "conclusive": conclusive(fingerprint)}


def record_trained(trainer, probe_rows: list[dict], output_dir: str) -> dict | None:
    """`record` for a Trainer at the end of training; model_wrapped is the FSDP (or DDP) wrapper when there is one.
    Under accelerate's mixed precision (recipes/accelerate_fsdp.yaml: bf16) the forward runs in autocast, which
    accelerate wraps around the model's own forward: the fingerprint is scored, and labelled, in that precision."""
    from peft import PeftModel

    accelerator = trainer.accelerator
    compute_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(str(accelerator.mixed_precision))
    unwrapped = accelerator.unwrap_model(trainer.model_wrapped)
    return record(trainer.model_wrapped, probe_rows, output_dir, accelerator.device, accelerator.is_main_process,
                  compute_dtype, unwrapped if isinstance(unwrapped, PeftModel) else None, trainer.processing_class)


# ---- evaluation: check -------------------------------------------------------------------------------------------


def load(model_path: Path) -> dict | None:
    """The model's fingerprint.json, None if it has none; FingerprintMismatch if it predates the noise floor."""
    path = Path(model_path) / FINGERPRINT
    if not path.exists():
        return None
    fingerprint = json.loads(path.read_text(encoding="utf-8"))
    if fingerprint.get("version", 1) < VERSION:
        raise FingerprintMismatch(
            f"fingerprint: {path} was written before version {VERSION} (per-probe means against a noise floor "
            f"measured at training, the student's own greedy answers as probes): train the adapter again, or pass "
            f"--skip_fingerprint")
    return fingerprint


@dataclass
class FingerprintCheck:
    """What the check found; goes into the results JSON. The differences are per probe: |mean answer log-probability
    served - trained| (and with the adapter - without it), in nats."""

    status: str  # passed | skipped (--skip_fingerprint) | absent (no fingerprint.json)
    probes: int = 0
    answer_tokens: int = 0
    max_abs_diff: float | None = None  # the largest probe's difference, served vs trained
    mean_abs_diff: float | None = None  # over the probes
    tolerance: float | None = None  # from training's noise floor: FLOOR_MULTIPLE x noise_floor + MIN_TOLERANCE
    noise_floor: float | None = None
    trained_dtype: str | None = None
    served_dtype: str | None = None
    adapter_effect: float | None = None  # how far the adapter moves a probe's mean from its base (the largest)
    conclusive: bool | None = None  # adapter_effect beyond the tolerance: a dropped adapter would have failed
    allow_inconclusive: bool = False  # --allow_inconclusive: an inconclusive check let the run score anyway
    per_probe_abs_diff: list[float] = field(default_factory=list)


def adapter_effect(fingerprint: dict) -> float | None:
    """The largest |mean with the adapter - mean of its base| over the probes; None without base scores (a model
    trained without an adapter has no base to fall back to)."""
    if not all("base_mean" in p for p in fingerprint["probes"]):
        return None
    return max(abs(p["mean"] - p["base_mean"]) for p in fingerprint["probes"])


def conclusive(fingerprint: dict) -> bool | None:
    """Whether the adapter moves some probe beyond the tolerance (a served model without it would fail the check);
    None where there is no base to compare."""
    effect = adapter_effect(fingerprint)
    return None if effect is None else effect > fingerprint["tolerance"]


def within_tolerance(fingerprint: dict) -> str:
    """What an inconclusive fingerprint's adapter moves, for its warning or error."""
    return (f"the adapter moves its probes' mean answer log-probability by at most {adapter_effect(fingerprint):.3g}, "
            f"within the tolerance {fingerprint['tolerance']:.3g}")


def check_conclusive(fingerprint: dict, allow_inconclusive: bool) -> None:
    """Raises FingerprintMismatch when the adapter moves no probe beyond the tolerance (a dropped adapter would pass
    the check), unless allow_inconclusive, which warns instead."""
    if conclusive(fingerprint) is not False:
        return
    message = (f"fingerprint: inconclusive: {within_tolerance(fingerprint)} (noise floor "
               f"{fingerprint['noise_floor']:.3g}): served without its adapter, the model would pass the check")
    if not allow_inconclusive:
        raise FingerprintMismatch(f"{message}. Train longer or at a higher learning rate, or pass "
                                  f"--allow_inconclusive to score anyway (the results JSON records it)")
    print(f"evaluate: warning: {message}; scoring anyway (--allow_inconclusive)", file=sys.stderr)


def check_ids(fingerprint: dict, rendered_prompts: list[list[int]], tokenizer) -> None:
    """Raises FingerprintMismatch, naming the first token that differs, unless every probe's prompt as evaluation
    renders it is the prompt training rendered."""
    for p, rendered in zip(fingerprint["probes"], rendered_prompts):
        trained = p["input_ids"][: p["answer_start"]]
        if rendered == trained:
            continue
        at = next((i for i, (a, b) in enumerate(zip(trained, rendered)) if a != b), min(len(trained), len(rendered)))

        def token(ids, at=at):
            return f"{ids[at]} {tokenizer.decode([ids[at]])!r}" if at < len(ids) else "(end of prompt)"

        raise FingerprintMismatch(
            f"fingerprint: probe {p['id']!r}: the prompt evaluation renders differs from the one training rendered "
            f"at token {at} of {len(trained)}: training {token(trained)}, evaluation {token(rendered)}, in "
            f"{tokenizer.decode(trained[max(0, at - 8): at + 4])!r}. The chat template or tokenizer changed since "
            f"training: evaluate with the adapter's own tokenizer (drop --tokenizer, or restore its chat template)")


def served_stop_ids(llm) -> set[int]:
    """The token ids the vLLM engine ends a generation on: its tokenizer's EOS and the model's generation_config
    eos_token_id(s), as vLLM's SamplingParams.update_from_generation_config combines them."""
    stop = {llm.get_tokenizer().eos_token_id}
    configured = llm.model_config.try_get_generation_config().get("eos_token_id")
    stop |= {configured} if isinstance(configured, int) else set(configured or [])
    return stop - {None}


def check_stop(fingerprint: dict, stop_ids: set[int], tokenizer) -> None:
    """Raises FingerprintMismatch unless the engine stops on the end-of-turn token training ended every answer with
    (else the student never stops: every answer runs into --max_tokens)."""
    ends = {p["end_of_turn"] for p in fingerprint["probes"]}
    missing = sorted(ends - stop_ids)
    if missing:
        raise FingerprintMismatch(
            f"fingerprint: training ended every answer with {missing[0]} {tokenizer.decode(missing[:1])!r}, but the "
            f"served model stops only on {sorted(stop_ids)} {[tokenizer.decode([i]) for i in sorted(stop_ids)]}: its "
            f"answers would run to --max_tokens. The served tokenizer or generation_config's eos_token_id differs "
            f"from training's: serve with the adapter's tokenizer (--tokenizer <adapter>) or fix eos_token_id")


def served_logprobs(llm, fingerprint: dict, lora_request) -> list[list[float]]:
    """The served model's log-probability of each probe's answer tokens, from vLLM's prompt_logprobs (which skip
    the prefix cache, so every position is computed)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    requests = [TokensPrompt(prompt_token_ids=p["input_ids"]) for p in fingerprint["probes"]]
    if lora_request is None:
        outputs = llm.generate(requests, params, use_tqdm=False)
    else:
        # One request at a time: vLLM 0.32 maps LoRA to the logits by request, not by prompt token, so prompt
        # logprobs of a batch of LoRA requests fail (einsum size mismatch on CPU; vllm issues #16668, #29955).
        outputs = [llm.generate([request], params, lora_request=lora_request, use_tqdm=False)[0]
                   for request in requests]
    return [[position[token].logprob for position, token in zip(output.prompt_logprobs[p["answer_start"]:],
                                                                 p["input_ids"][p["answer_start"]:])]
            for output, p in zip(outputs, fingerprint["probes"])]


def compare(fingerprint: dict, served: list[list[float]], served_dtype: str, mismatch_advice: str,
            allow_inconclusive: bool = False) -> FingerprintCheck:
    """Each probe's mean answer log-probability served against training's; raises FingerprintMismatch (with
    `mismatch_advice`, the serving path's likely cause and fix) when any is beyond the tolerance."""
    probes = fingerprint["probes"]
    diffs = [abs(p["mean"] - mean(lps)) for p, lps in zip(probes, served)]
    limit = fingerprint["tolerance"]
    check = FingerprintCheck("passed", len(diffs), sum(map(len, served)), max(diffs), mean(diffs), limit,
                             fingerprint["noise_floor"], fingerprint["dtype"], served_dtype,
                             adapter_effect(fingerprint), conclusive(fingerprint), allow_inconclusive, diffs)
    if not all(map(math.isfinite, diffs)) or check.max_abs_diff > limit:  # max() skips a NaN that is not first
        worst = max(range(len(diffs)), key=lambda i: diffs[i] if math.isfinite(diffs[i]) else math.inf)
        raise FingerprintMismatch(
            f"fingerprint: the served model is not the trained student: its mean answer log-probability differs "
            f"from training's by up to {check.max_abs_diff:.4g} (mean {check.mean_abs_diff:.4g}) over "
            f"{len(diffs)} probes, worst probe {probes[worst]['id']!r} ({probes[worst]['source']} answer); "
            f"tolerance {limit:.3g} ({FLOOR_MULTIPLE:g} x the noise floor {check.noise_floor:.3g} + "
            f"{MIN_TOLERANCE:g}; {fingerprint['dtype']} trained, {served_dtype} served). {mismatch_advice}")
    return check


def show(check: FingerprintCheck) -> None:
    """The passed check's figures on stdout."""
    print(f"evaluate: fingerprint passed: {check.probes} probes, {check.answer_tokens} answer tokens, mean answer "
          f"log-probability within {check.max_abs_diff:.3g} of training's (mean {check.mean_abs_diff:.3g}), "
          f"tolerance {check.tolerance:.3g} (noise floor {check.noise_floor:.3g}; {check.trained_dtype} trained, "
          f"{check.served_dtype} served)"
          + (f"; the adapter moves them by up to {check.adapter_effect:.3g}" if check.conclusive is not None else ""))
