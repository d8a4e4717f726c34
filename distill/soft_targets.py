"""Owns the teacher's soft targets (a sidecar line's content, stage 2's KD targets); must not handle their files.

Soft targets: what stage 1 keeps of the teacher's distribution (`--save_logprobs K`) and how stage 2 turns it
into per-token targets for the KD loss (`--distill_loss kd|kd+ce`).

Stage 1 writes `<output>.logprobs.jsonl` beside the chat JSONL, one line per written row, keyed by id:

    {"id", "answer_token_ids": [...], "top_ids": [[K ids] per answer token], "top_logprobs": [[K floats]],
     "label_distribution": {label: p} (label tasks), "vote_shares": {label: share} (--num_samples > 1)}

The answer tokens are the generated tokens of the chosen sample (the first valid sample that gave the row's label)
that spell its final answer after any reasoning; `answer_token_ids` is null when no token span decodes to it. The
log-probabilities are vLLM's raw ones (logprobs_mode raw_logprobs: before temperature and penalties), the K most
likely tokens by rank. With --constrain_labels they come after the label constraint's mask (measured on vLLM 0.32:
tokens the grammar forbids are -inf), so they describe the constrained teacher; tokens with no probability (-inf)
are left out, so a position can hold fewer than K. `label_distribution` reads the top K at the first answer token:
each token's probability goes to the labels its text begins (stripped, any case), split evenly when it begins
several (`e` -> el, en, es), and the result is normalised over the label set. Prefix tokens count because a
constrained teacher need not spell a label in the tokenizer's own tokens: SmolLM2 under the label grammar wrote
`fr` as `f`,`r` where the tokenizer has one `fr` token (measured, 58 of 60 rows), and its top K then held `f`, not
`fr`. A label none of whose prefixes is in the top K gets 0.

Stage 2 uses a label row's `label_distribution` (when it has one) as the target of the answer's first token, on the
student's own first token of each label, and otherwise the top K of every answer token when the student's
tokenization of the answer starts with the teacher's answer tokens; a row with neither keeps plain CE (counted).

The sidecar's file (its path, reading it, keeping it paired with the output on resume) is distill/run_files.py's.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from distill.records import InputError
from distill.run_files import SIDECAR_SUFFIX, read_sidecar, sidecar_path


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) as sorted JSON: KD pairs the teacher's token ids
    with the student's logits, so two tokenizers are interchangeable exactly when this matches."""
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


# ---- stage 1: from a vLLM sample to a sidecar line --------------------------------------------------------------


def answer_span(tokenizer, token_ids: list[int], answer: str, max_trailing: int = 8) -> tuple[int, int] | None:
    """(start, end) of the token span, ending within `max_trailing` tokens of the output's end (the end of turn, a
    closing '**' or '.'), that decodes to `answer` (case and surrounding spaces aside, as the parser reads labels),
    without whitespace-only tokens at either edge: the student's target is the stripped answer followed by its end
    of turn, so a kept stop string such as a trailing newline is not an answer token. None when no span decodes to
    the answer, e.g. when it starts inside a token."""
    wanted = answer.strip().lower()
    for end in range(len(token_ids), max(len(token_ids) - max_trailing, 0) - 1, -1):
        for start in range(end - 1, -1, -1):
            text = tokenizer.decode(token_ids[start:end]).strip().lower()
            if text == wanted:
                return _without_blank_edges(tokenizer, token_ids, start, end)
            if len(text) > len(wanted):
                break
    return None


def _without_blank_edges(tokenizer, token_ids: list[int], start: int, end: int) -> tuple[int, int]:
    def blank(index: int) -> bool:
        return not tokenizer.decode(token_ids[index : index + 1]).strip()

    while end - start > 1 and blank(end - 1):
        end -= 1
    while end - start > 1 and blank(start):
        start += 1
    return start, end


def top_k(position: dict, k: int) -> tuple[list[int], list[float]]:
    """The K most likely tokens of one position, by rank, without those of probability 0 (-inf, masked by the label
    constraint; JSON has no infinity). vLLM adds the sampled token when it is outside the top K: it is left out."""
    ranked = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in position.items()
                    if entry.logprob > -math.inf)[:k]
    return [token_id for _, token_id, _ in ranked], [round(logprob, 4) for _, _, logprob in ranked]


def label_distribution(tokenizer, labels, top_ids: list[int], top_logprobs: list[float]) -> dict | None:
    probabilities = dict.fromkeys(labels, 0.0)
    for token, logprob in zip(top_ids, top_logprobs):
        text = tokenizer.decode([token]).strip().lower()
        begun = [label for label in labels if text and label.lower().startswith(text)]
        for label in begun:
            probabilities[label] += math.exp(logprob) / len(begun)
    total = sum(probabilities.values())
    return {label: round(p / total, 4) for label, p in probabilities.items()} if total else None


def sidecar_line(outcome, tokenizer, k: int, labels=None, sample=None, row_id: str | None = None) -> dict:
    """The sidecar line of an answered query (a distill.teacher.Outcome; see the module docstring); `labels` for a
    label task. With --keep all each written row has its own `sample` and `row_id`."""
    sample = sample or next(s for s in outcome.samples if s.parsed.answer == outcome.answer)
    answer = sample.parsed.answer
    span = answer_span(tokenizer, sample.token_ids, answer)
    line = {"id": row_id or outcome.row["id"], "answer_token_ids": None, "top_ids": [], "top_logprobs": []}
    if span:
        positions = [top_k(position, k) for position in sample.logprobs[span[0]:span[1]]]
        line.update(answer_token_ids=sample.token_ids[span[0]:span[1]], top_ids=[ids for ids, _ in positions],
                    top_logprobs=[values for _, values in positions])
    if labels and span:
        line["label_distribution"] = label_distribution(tokenizer, labels, *positions[0])
    if labels and len(outcome.samples) > 1:
        line["vote_shares"] = {label: count / len(outcome.samples) for label, count in outcome.votes.items()}
    return line


# ---- stage 2: from a sidecar line (or vote shares) to per-token targets ------------------------------------------


def logprob_targets(line: dict | None, completion_ids: list[int]) -> tuple[list, list] | None:
    """The teacher's top-K per answer token, if the student's completion starts with exactly the teacher's answer
    tokens; None (the row keeps plain CE) otherwise."""
    if not line or not line["answer_token_ids"]:
        return None
    teacher_ids = line["answer_token_ids"]
    if completion_ids[: len(teacher_ids)] != teacher_ids:
        return None
    return line["top_ids"], line["top_logprobs"]


def first_token_targets(weights: dict, tokenizer, completion_ids: list[int]) -> tuple[list, list] | None:
    """One target position, the answer's first token: each label's first token (in the student's tokenizer, so any
    tokenizer works) weighted by the label's share (votes, or the teacher's label distribution); labels that share a
    first token add up, labels of weight 0 are left out. None when the completion starts with none of them (e.g.
    --answer_field names another column)."""
    total = sum(weights.values())
    shares = {}
    for label, weight in weights.items():
        if weight <= 0:
            continue
        token = tokenizer(label, add_special_tokens=False).input_ids[0]
        shares[token] = shares.get(token, 0.0) + weight / total
    if completion_ids[0] not in shares:
        return None
    return [list(shares)], [[math.log(share) for share in shares.values()]]


@dataclass
class TeacherTargets:
    """Where stage 2's soft targets come from: the sidecar's top-K ("logprobs") or the rows' votes ("vote_shares")."""

    source: str
    sidecar: dict[str, dict]
    teacher_model: str | None = None
    teacher_tokenizer_sha256: str | None = None
    record_path: Path | None = None


def find_targets(dataset_name: str, rows: list[dict]) -> TeacherTargets:
    """The sidecar of a local stage-1 file, else vote shares when some row had more than one vote; else an
    InputError naming --save_logprobs. Reads files only: called before any model loads."""
    sidecar = sidecar_path(dataset_name)
    if Path(dataset_name).exists() and sidecar.exists():
        record_path = sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX) + ".run.json")
        record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
        return TeacherTargets("logprobs", read_sidecar(sidecar), record.get("args", {}).get("model"),
                              record.get("teacher_tokenizer_sha256"), record_path)
    if any(sum(row.get("teacher", {}).get("votes", {}).values()) > 1 for row in rows):
        return TeacherTargets("vote_shares", {})
    raise InputError(f"{dataset_name}: --distill_loss kd needs the teacher's log-probabilities ({sidecar.name}, "
                     "written by create_data.py --save_logprobs K) or vote shares (create_data.py --num_samples > 1); "
                     "this file has neither. Re-run stage 1 with --save_logprobs 20, or train with --distill_loss ce")


def check_tokenizer(targets: TeacherTargets, student_tokenizer, student_name: str) -> None:
    """Top-K ids index the teacher's vocabulary: KD from them needs the very same one. Vote shares need nothing."""
    if targets.source != "logprobs":
        return
    if targets.teacher_tokenizer_sha256 is None:
        raise InputError(f"{targets.record_path}: no teacher_tokenizer_sha256, so the student's tokenizer cannot be "
                         "checked against the teacher's; re-run stage 1 with --save_logprobs")
    student_hash = tokenizer_hash(student_tokenizer)
    if student_hash != targets.teacher_tokenizer_sha256:
        raise InputError(f"--distill_loss kd: the student {student_name} has another tokenizer than the teacher "
                         f"{targets.teacher_model} (vocabulary sha256 {student_hash[:12]} vs "
                         f"{targets.teacher_tokenizer_sha256[:12]}), so the teacher's top-K token ids mean other "
                         "tokens to it. Use a student with the teacher's tokenizer, vote shares (stage 1 with "
                         "--num_samples > 1, no sidecar), or --distill_loss ce")


def row_targets(targets: TeacherTargets, row: dict, tokenizer, example: dict) -> dict:
    """The target columns of one tokenized row (distill.training.TARGET_COLUMNS); teacher_start -1: plain CE."""
    start = example["completion_mask"].index(1)
    completion = example["input_ids"][start:]
    if targets.source == "logprobs":
        line = targets.sidecar.get(row["id"])
        distribution = line and line.get("label_distribution")
        found = first_token_targets(distribution, tokenizer, completion) if distribution else None
        found = found or logprob_targets(line, completion)
    else:
        votes = row.get("teacher", {}).get("votes")
        found = first_token_targets(votes, tokenizer, completion) if votes else None
    top_ids, top_logprobs = found or ([], [])
    return {"teacher_start": start if found else -1, "teacher_top_ids": top_ids, "teacher_top_logprobs": top_logprobs}


# ---- stage 3 / benches: how far a student is from the teacher on held-out answers -------------------------------
