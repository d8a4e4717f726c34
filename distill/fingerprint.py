"""The trained student's fingerprint: what evaluate.py proves about the model it serves before it scores anything.

At the end of training (stages 2 and 2b) the trained model, still in memory, scores k probe rows of its training set
(--fingerprint_probes, default 8) and writes <output_dir>/fingerprint.json: each probe's query, its rendered token
ids (prompt + answer + end of turn) and the student's log-probability of every answer token. Under FSDP every rank
joins the forwards (the parameters are gathered layer by layer) and rank 0 writes.

evaluate.py then (1) renders each probe's query through its own path, with the tokenizer it serves with: the ids
must equal the recorded prompt, else the template or tokenizer changed since training (the first differing token
is named); (2) checks that the engine stops on the end-of-turn token training ended answers with; (3) asks the
serving engine for the same answer tokens' log-probabilities (vLLM prompt_logprobs) through the path it will score
with (vLLM's LoRA support or a merged copy): the largest difference must stay within a tolerance set by the coarser
of the two dtypes. A dropped or mis-loaded adapter (vLLM on fused MoE experts), a different base, a stale merge all
show up here, before any row is scored.
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

FINGERPRINT = "fingerprint.json"
# Largest |log p_train - log p_served| over the probes' answer tokens that still counts as the same model. fp32:
# HF and vLLM (CPU, fp32) measured 5e-7 apart on the tiny test students, dense and MoE, LoRA and merged, and 3.7e-5
# on SmolLM2-135M; 1e-3 leaves room for other kernels, while the tests' 2-step adapter moves its answer tokens by 0.05.
# bf16: SmolLM2-135M in transformers and in vLLM (CPU, both bf16) measured 0.29 apart at most (mean 0.06) over 128
# answer tokens; a trained adapter moves its answer tokens by nats. 1.0 is a first setting for GPU kernels and deeper
# models, to be measured by make gpu-check. The fingerprint also holds the base's log-probabilities (adapter off):
# an adapter that moves them by less than the tolerance is reported as an inconclusive check.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0, "float16": 1.0}


class FingerprintMismatch(ValueError):
    """The served model is not the one training fingerprinted; the message names the cause and the fix."""


# ---- training: record --------------------------------------------------------------------------------------------


def probes(tokenizer, rows: list[tuple], student=None) -> list[dict]:
    """(id, query, answer) rows -> probes: the query (a text or a conversation), its answer, and the ids training's
    tokenizing gives them (distill.training: the student's prompt, with its own side, the answer, the end of turn)."""
    from distill.prompts import BARE_STUDENT
    from distill.render import student_example

    made = []
    for row_id, query, answer in rows:
        example = student_example(tokenizer, query, answer, student or BARE_STUDENT)
        made.append({"id": row_id, "query": query, "answer": answer, "input_ids": example["input_ids"],
                     "answer_start": example["completion_mask"].index(1)})
    return made


def query_probes(tokenizer, rows: list[dict], k: int, student=None) -> list[dict]:
    """Probes for on-policy training, which has queries but no reference answers: each query's own text (a
    conversation's last user turn) stands in as the answer. Any fixed tokens do, since both sides score the same
    ones; a query's words are ones the adapter has seen in that context."""
    from distill.render import query_of

    return probes(tokenizer, [(row.get("id"), query_of(row), row["text"]) for row in rows[:k]], student)


def answer_logprobs(model, input_ids: list[int], answer_start: int, device) -> list[float]:
    """log p(token | everything before it) for every token from answer_start on: one forward, no grad."""
    import torch

    ids = torch.tensor([input_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, answer_start - 1: -1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, answer_start:, None])[:, 0].tolist()


def record(model, probe_rows: list[dict], output_dir: str, device, is_main_process: bool,
           compute_dtype: str | None = None, peft_model=None) -> dict | None:
    """Scores the probes with `model` and writes FINGERPRINT into output_dir (main process only); returns a summary
    for the run record (None with no probes). Every process must call it: under FSDP each forward is a collective,
    which gathers the sharded parameters layer by layer. compute_dtype: what the forward computes in when that is
    not the parameters' dtype (mixed precision); it sets the tolerance evaluation allows. peft_model (the PeftModel
    inside `model`): the probes are scored once more with the adapter disabled, so evaluation can tell whether the
    adapter moves them by more than the tolerance, i.e. whether the check could tell a dropped adapter at all."""
    if not probe_rows:
        return None
    was_training = model.training
    model.eval()  # no dropout: the served model scores deterministically
    try:
        scored = [{**p, "logprobs": answer_logprobs(model, p["input_ids"], p["answer_start"], device)}
                  for p in probe_rows]
        if peft_model is not None:
            with peft_model.disable_adapter():
                for p in scored:
                    p["base_logprobs"] = answer_logprobs(model, p["input_ids"], p["answer_start"], device)
    finally:
        model.train(was_training)
    dtype = compute_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    if is_main_process:
        fingerprint = {"dtype": dtype, "probes": scored}
        (Path(output_dir) / FINGERPRINT).write_text(json.dumps(fingerprint, ensure_ascii=False, indent=1))
    return {"file": FINGERPRINT, "probes": len(scored), "dtype": dtype,
            "answer_tokens": sum(len(p["logprobs"]) for p in scored)}


def record_trained(trainer, probe_rows: list[dict], output_dir: str) -> dict | None:
    """`record` for a Trainer at the end of training; model_wrapped is the FSDP (or DDP) wrapper when there is one.
    Under accelerate's mixed precision (recipes/accelerate_fsdp.yaml: bf16) the forward runs in autocast, which
    accelerate wraps around the model's own forward: the fingerprint is scored, and labelled, in that precision."""
    from peft import PeftModel

    accelerator = trainer.accelerator
    compute_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(str(accelerator.mixed_precision))
    unwrapped = accelerator.unwrap_model(trainer.model_wrapped)
    return record(trainer.model_wrapped, probe_rows, output_dir, accelerator.device, accelerator.is_main_process,
                  compute_dtype, unwrapped if isinstance(unwrapped, PeftModel) else None)


# ---- evaluation: check -------------------------------------------------------------------------------------------


def load(model_path: Path) -> dict | None:
    path = Path(model_path) / FINGERPRINT
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


@dataclass
class FingerprintCheck:
    """What the check found; goes into the results JSON."""

    status: str  # passed | skipped (--skip_fingerprint) | absent (no fingerprint.json)
    probes: int = 0
    answer_tokens: int = 0
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    tolerance: float | None = None
    trained_dtype: str | None = None
    served_dtype: str | None = None
    adapter_effect: float | None = None  # how far the adapter moves the answer tokens from its base (largest)
    conclusive: bool | None = None  # adapter_effect beyond the tolerance: a dropped adapter would have failed
    per_probe_max_abs_diff: list[float] = field(default_factory=list)


def check_ids(fingerprint: dict, rendered_prompts: list[list[int]], tokenizer) -> None:
    """Raises FingerprintMismatch, naming the first token that differs, unless every probe's prompt as evaluation
    renders it is the prompt training rendered."""
    for p, rendered in zip(fingerprint["probes"], rendered_prompts):
        trained = p["input_ids"][: p["answer_start"]]
        if rendered == trained:
            continue
        at = next((i for i, (a, b) in enumerate(zip(trained, rendered)) if a != b), min(len(trained), len(rendered)))

        def token(ids):
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
    ends = {p["input_ids"][-1] for p in fingerprint["probes"]}
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


def tolerance(trained_dtype: str, served_dtype: str) -> float:
    return max(TOLERANCE[trained_dtype], TOLERANCE[served_dtype])


def compare(fingerprint: dict, served: list[list[float]], served_dtype: str, mismatch_advice: str) -> FingerprintCheck:
    """The largest difference between training's and the served model's answer log-probabilities; raises
    FingerprintMismatch (with `mismatch_advice`, the serving path's likely cause and fix) beyond the tolerance."""
    diffs = [[abs(a - b) for a, b in zip(p["logprobs"], lps)] for p, lps in zip(fingerprint["probes"], served)]
    flat = [d for probe_diffs in diffs for d in probe_diffs]
    limit = tolerance(fingerprint["dtype"], served_dtype)
    check = FingerprintCheck("passed", len(diffs), len(flat), max(flat), sum(flat) / len(flat), limit,
                             fingerprint["dtype"], served_dtype, per_probe_max_abs_diff=[max(d) for d in diffs])
    if all("base_logprobs" in p for p in fingerprint["probes"]):
        check.adapter_effect = max(abs(a - b) for p in fingerprint["probes"]
                                   for a, b in zip(p["logprobs"], p["base_logprobs"]))
        check.conclusive = check.adapter_effect > limit
    if not all(map(math.isfinite, flat)) or check.max_abs_diff > limit:  # max() skips a NaN that is not first
        worst = max(range(len(diffs)), key=lambda i: check.per_probe_max_abs_diff[i])
        raise FingerprintMismatch(
            f"fingerprint: the served model is not the trained student: its answer log-probabilities differ from "
            f"training's by up to {check.max_abs_diff:.4g} (mean {check.mean_abs_diff:.4g}) over {len(flat)} tokens "
            f"of {len(diffs)} probes, worst probe {fingerprint['probes'][worst]['id']!r}; tolerance {limit:g} "
            f"({fingerprint['dtype']} trained, {served_dtype} served). {mismatch_advice}")
    return check


def show(check: FingerprintCheck) -> None:
    """The passed check's figures on stdout; a warning on stderr when they cannot tell the adapter from its base."""
    print(f"evaluate: fingerprint passed: {check.probes} probes, {check.answer_tokens} answer tokens, largest "
          f"log-probability difference {check.max_abs_diff:.3g} (mean {check.mean_abs_diff:.3g}), tolerance "
          f"{check.tolerance:g} ({check.trained_dtype} trained, {check.served_dtype} served)"
          + (f"; the adapter moves them by up to {check.adapter_effect:.3g}" if check.conclusive is not None else ""))
    if check.conclusive is False:
        print(f"evaluate: warning: the adapter moves its probes' answer tokens by at most {check.adapter_effect:.3g}, "
              f"within the tolerance: the check cannot tell this adapter from its base model", file=sys.stderr)
