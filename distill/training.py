"""Stage-1 chat JSONL -> token ids with a completion mask: the loss covers the answer and the end-of-turn token,
nothing of the user's text or the template around it.

We tokenize here rather than let TRL apply the chat template, for two reasons measured on our models: SmolLM2's
template has no generation markers (TRL's assistant_only_loss raises), and the student's prompt must be rendered
by the very function evaluation uses (`prompts.render`), default system prompt and empty think block included.
"""

from distill.prompts import render, student_messages
from distill.splits import select


def query_and_answer(row: dict, answer_field: str | None) -> tuple[str, str]:
    """The user turn and the target: the assistant turn, or another column (e.g. the gold `label`)."""
    messages = row["messages"]
    query = next(m["content"] for m in messages if m["role"] == "user")
    answer = row[answer_field] if answer_field else next(m["content"] for m in messages if m["role"] == "assistant")
    return query, str(answer)


def completion_text(tokenizer, query: str, answer: str) -> tuple[str, str]:
    """(prompt, completion) as the chat template renders them; the completion ends at the end-of-turn token."""
    prompt = render(tokenizer, student_messages(query))
    full = tokenizer.apply_chat_template(
        student_messages(query) + [{"role": "assistant", "content": answer}], tokenize=False, enable_thinking=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer; "
                         f"cannot mask it reliably:\n{prompt!r}\nvs\n{full!r}")
    completion = full[len(prompt):]
    eos = tokenizer.eos_token
    # Keep the end-of-turn token (the student must learn to stop), drop the newline the template prints after it.
    completion = completion[: completion.rindex(eos) + len(eos)] if eos in completion else completion + eos
    return prompt, completion


def tokenize(tokenizer, query: str, answer: str) -> dict:
    prompt, completion = completion_text(tokenizer, query, answer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


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
