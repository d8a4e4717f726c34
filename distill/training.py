"""Owns stage 2's tokenized rows, batch arithmetic and the KD loss; must not read files or parse flags.

Stage-1 chat JSONL -> token ids with a completion mask: the loss covers the answer and the end-of-turn token,
nothing of the user's text or the template around it. A conversation's row trains on its last assistant turn (the
teacher's new answer); the turns before it, earlier assistant turns included, are the student's prompt, rendered
with the student's own side of the prompt file (stored in the stage-1 run record beside the file).

We tokenize (distill.render.student_example) rather than let TRL apply the chat template, for two reasons measured
on our models: SmolLM2's template has no generation markers (TRL's assistant_only_loss raises), and the student's
prompt must be rendered as evaluation renders it, default system prompt and empty think block included.
"""

import json

from distill.prompts import BARE_STUDENT, StudentSide
from distill.records import output_paths
from distill.splits import select


def query_and_answer(row: dict, answer_field: str | None) -> tuple[str | list[dict], str]:
    """The student's query and the target. The query is the turns before the last assistant turn (all of them
    when there is none), a lone user turn as its text (a text query's row); the target is that assistant turn, or
    another column (e.g. the gold `label`)."""
    messages = row["messages"]
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), len(messages))
    if answer_field and messages and messages[-1]["role"] == "user":  # the column answers the last user turn
        last = len(messages)
    turns = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the turns before the answer must end in a user turn")
    answer = row[answer_field] if answer_field else messages[last]["content"]
    return (turns[0]["content"] if len(turns) == 1 else turns), str(answer)


def stage1_student_side(dataset: str) -> StudentSide:
    """The student side of the prompt file stage 1 ran with, from its run record beside `dataset`; the bare query
    for rows without one (a hub dataset, a file written by hand, a run from before student sides)."""
    record = output_paths(dataset)[2]
    return StudentSide.from_dict(json.loads(record.read_text()).get("student")) if record.exists() else BARE_STUDENT


def training_rows(rows: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], int]:
    """The rows on the train side of the shared split, and how many held-out rows were dropped."""
    kept = select(rows, "train", heldout_fraction, seed)
    return kept, len(rows) - len(kept)


def derive_batch(global_batch: int, world_size: int, micro_batch: int) -> int:
    """Gradient accumulation steps that make micro_batch x steps x world_size == global_batch, or a ValueError
    naming what does not divide. The recipe's batch is a property of the optimisation, not of the GPU count."""
    rows_per_rank, left = divmod(global_batch, world_size)
    if left:
        raise ValueError(f"--global_batch_size {global_batch} does not split evenly over {world_size} processes")
    if rows_per_rank % micro_batch:
        raise ValueError(f"--per_device_train_batch_size {micro_batch} does not divide the {rows_per_rank} rows each "
                         f"of {world_size} processes takes per step (--global_batch_size {global_batch})")
    return rows_per_rank // micro_batch


def micro_batch_for_tokens(rows_per_rank: int, mean_row_tokens: float, token_budget: int) -> int:
    """The largest divisor of rows_per_rank whose expected padding-free micro-batch (rows x mean length) stays
    within the token budget; 1 if even one row exceeds it. Divisors keep the global batch exact."""
    fitting = [rows for rows in range(1, rows_per_rank + 1)
               if rows_per_rank % rows == 0 and rows * mean_row_tokens <= token_budget]
    return max(fitting, default=1)


# ---- knowledge distillation from the teacher's soft targets (--distill_loss kd | kd+ce) --------------------------

TARGET_COLUMNS = ("teacher_start", "teacher_top_ids", "teacher_top_logprobs")
# Log-probability of a padding slot in a target row: exp() of it is exactly 0 in float32, and unlike -inf it keeps
# p * log p finite (0 * -inf is NaN).
NO_MASS = -1e4


def kd_loss(logits, labels, target_ids, target_logprobs, target_mask, temperature: float, alpha: float,
                      num_items_in_batch=None):
    """Per answer token with a teacher target: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE; every other
    token with a label (the end of turn, rows without targets) keeps CE; prompt tokens (label -100) add nothing.
    The sum is divided by the labelled tokens (or the Trainer's `num_items_in_batch`), as TRL's CE is.

    The teacher's top-K log-probabilities at a position are renormalised over those K tokens, p = softmax(lp / T):
    the mass outside the top K is dropped, not spread over the rest of the vocabulary. With the teacher's mass on K
    ids only, KL(p || q) over the full vocabulary is sum_k p_k (log p_k - log q_k), q = softmax(student logits / T)
    over the student's whole vocabulary. Targets are indexed by the token they describe: position t of the targets
    goes with the logits at t - 1, as labels do.
    """
    import torch
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    target_ids, target_logprobs, target_mask = target_ids[:, 1:], target_logprobs[:, 1:], target_mask[:, 1:]
    labelled = labels != -100
    cross_entropy = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~labelled, 0), reduction="none")
    kl = kl_from_top_k(logits, target_ids, target_logprobs, temperature)
    distilled = target_mask & labelled
    per_token = torch.where(distilled, alpha * temperature**2 * kl + (1 - alpha) * cross_entropy, cross_entropy)
    count = labelled.sum() if num_items_in_batch is None else num_items_in_batch
    return (per_token * labelled).sum() / torch.as_tensor(count).clamp(min=1)


def kl_from_top_k(student_logits, target_ids, target_logprobs, temperature: float = 1.0):
    """KL(teacher || student) per position, [..., vocab] logits against [..., K] teacher ids and log-probabilities:
    the teacher renormalised over its top K at temperature T (padding slots of NO_MASS get exactly 0), the student
    softmax(logits / T) over its whole vocabulary. Training (kd_loss) and the held-out measure
    (bench/measures.py heldout_kl) share it, so the bench measures the quantity KD minimises."""
    import torch.nn.functional as F

    teacher_log_p = F.log_softmax(target_logprobs.float() / temperature, dim=-1)
    student_log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, target_ids)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(-1)


class TeacherTargetCollator:
    """Wraps TRL's collator: the batch it builds (padded or padding-free), plus the teacher's targets laid out like
    input_ids: `teacher_top_ids`/`teacher_top_logprobs` [batch, length, K] and `teacher_target_mask` [batch, length].
    A row's targets start at its `teacher_start` (the first completion token); -1 means none (plain CE)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        import torch

        batch = self.collator(examples)
        shape = batch["input_ids"].shape
        k = max((len(ids) for example in examples for ids in example["teacher_top_ids"]), default=1)
        ids = torch.zeros(*shape, k, dtype=torch.long)
        logprobs = torch.full((*shape, k), NO_MASS)
        mask = torch.zeros(shape, dtype=torch.bool)
        offset = 0
        for row, example in enumerate(examples):
            batch_row = 0 if self.collator.padding_free else row
            positions = range(example["teacher_start"], len(example["input_ids"]))
            for position, top_ids, top_logprobs in zip(positions, example["teacher_top_ids"],
                                                       example["teacher_top_logprobs"]):
                ids[batch_row, offset + position, : len(top_ids)] = torch.tensor(top_ids)
                logprobs[batch_row, offset + position, : len(top_ids)] = torch.tensor(top_logprobs)
                mask[batch_row, offset + position] = True
            offset += len(example["input_ids"]) if self.collator.padding_free else 0
        return {**batch, "teacher_top_ids": ids, "teacher_top_logprobs": logprobs, "teacher_target_mask": mask}


def kd_trainer(temperature: float, alpha: float, **trainer_kwargs):
    """An SFTTrainer whose loss is `kd_loss`; the dataset carries TARGET_COLUMNS beside input_ids and
    completion_mask. TRL's compute_loss_func hook is deprecated in TRL 1.16 (its warning says to subclass), hence a
    subclass; it is built here so that importing this module does not import TRL."""
    from trl import SFTTrainer

    class KDTrainer(SFTTrainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.data_collator = TeacherTargetCollator(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, *TARGET_COLUMNS]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = [inputs.pop(key) for key in ("teacher_top_ids", "teacher_top_logprobs", "teacher_target_mask")]
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            loss = kd_loss(outputs.logits, labels, *targets, temperature, alpha, num_items_in_batch)
            # As TRL's compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return KDTrainer(**trainer_kwargs)
