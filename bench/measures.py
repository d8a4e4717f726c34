"""Measures the benches report and training never uses: how close a student is to its prompted teacher (KL on held-out
answers, full vocabulary or the teacher's top K), and how far it drifted from its base. They read inputs as the
stages do (distill/render.py, distill/onpolicy.py's teacher layout), so a bench measures what the stages train.
"""

import torch

from distill import render
from distill.onpolicy import PrefixCache, TeacherInputs, backbone_of, shared_prefix, teacher_hidden_states
from distill.prompts import BARE_STUDENT, StudentSide, TaskPrompt
from distill.soft_targets import TeacherTargets, row_targets
from distill.training import NO_MASS, kl_from_top_k, query_and_answer

# ---- on-policy: the student against the prompted teacher, and its drift from the base ---------------------------


def answer_ids(tokenizer, answer: str) -> list[int]:
    """An answer as the student writes it: its tokens, then the end-of-turn token."""
    return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def student_hidden_states(backbone, tokenizer, queries: list, completions: list[list[int]],
                          side: StudentSide = BARE_STUDENT):
    """The student's hidden states (no prompt; its own side of the prompt file) predicting each completion token,
    (B, C, H), right-padded."""
    prompts = [render.student_ids(tokenizer, query, side) for query in queries]
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id or 0] * (width - len(row)) for row in rows])
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    hidden = backbone(input_ids=ids, attention_mask=attention).last_hidden_state
    length = max(map(len, completions))
    positions = torch.tensor([[min(len(p) - 1 + j, width - 1) for j in range(length)] for p in prompts])
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))


def kl_to_teacher(student, teacher, tokenizer, prompt: TaskPrompt, queries: list[str], answers: list[str],
                  batch_size: int = 8) -> dict:
    """Per-token reverse KL(student || teacher) and forward KL(teacher || student) on the given answers' tokens (the
    end-of-turn token included), full vocabulary: the student reads the query with its own side of the prompt file
    (`prompt.student`; the bare query by default), the teacher (a frozen model) the prompt, its example turns and the
    query. Means over all scored tokens."""
    prefix = shared_prefix(tokenizer, prompt, queries)
    cache = PrefixCache(prefix)
    reverse = forward = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            batch_queries = queries[start: start + batch_size]
            completions = [answer_ids(tokenizer, a) for a in answers[start: start + batch_size]]
            width = max(map(len, completions))
            completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
            mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions]).bool()
            suffixes = TeacherInputs.build(tokenizer, prompt, batch_queries, prefix).suffixes
            log_t = torch.log_softmax(teacher.lm_head(teacher_hidden_states(
                backbone_of(teacher), suffixes, completion_ids, mask.long(), prefix, cache)), -1)
            log_s = torch.log_softmax(student.lm_head(student_hidden_states(
                backbone_of(student), tokenizer, batch_queries, completions, prompt.student)), -1)
            reverse += (log_s.exp() * (log_s - log_t)).sum(-1)[mask].sum().item()
            forward += (log_t.exp() * (log_t - log_s)).sum(-1)[mask].sum().item()
            tokens += mask.sum().item()
    return {"reverse_kl": reverse / tokens, "forward_kl": forward / tokens, "tokens": int(tokens)}


def drift_from_base(student, base, tokenizer, texts: list[str], batch_size: int = 8,
                    side: StudentSide = BARE_STUDENT) -> dict:
    """Per-token KL(base || student) over every token of unrelated chat inputs (each text as the student reads a
    query: with its own side of the prompt file, the bare [user: text] by default), where the student should still
    behave as the base model does."""
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = [render.student_ids(tokenizer, text, side) for text in texts[start: start + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id or 0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            log_b = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits, -1)
            log_s = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits, -1)
            total += (log_b.exp() * (log_b - log_s)).sum(-1)[mask.bool()].sum().item()
            tokens += mask.sum().item()
    return {"kl_base_to_student": total / tokens, "tokens": int(tokens), "texts": len(texts)}


# ---- KD: the student against the teacher's top-K targets on held-out stage-1 rows ------------------------------


def heldout_kl(model, tokenizer, rows: list[dict], sidecar: dict[str, dict], side: StudentSide = BARE_STUDENT) -> dict:
    """Mean KL(teacher || student) per answer token over stage-1 rows the student never trained on: the student,
    without the prompt (with its own `side` of the prompt file, as stage 2 trains it), reads the query and the
    teacher's answer (teacher forcing), and at each answer token with a
    target its distribution is compared with the teacher's, as stage 2 builds the targets (row_targets: a label
    row's label distribution on its first token, else the top K renormalised; T = 1). Rows without targets are
    counted, not scored.

    Returns {"mean_kl", "tokens", "rows", "rows_without_targets"}; mean_kl is None when no row has targets."""
    targets = TeacherTargets("logprobs", sidecar)
    per_token, without = [], 0
    model.eval()
    for row in rows:
        example = render.student_example(tokenizer, *query_and_answer(row, None), side)
        found = row_targets(targets, row, tokenizer, example)
        start, top_ids = found["teacher_start"], found["teacher_top_ids"]
        if start < 0 or not top_ids:
            without += 1
            continue
        k = max(len(ids) for ids in top_ids)
        ids = torch.tensor([ids + [0] * (k - len(ids)) for ids in top_ids])
        logprobs = torch.tensor([values + [NO_MASS] * (k - len(values)) for values in found["teacher_top_logprobs"]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"][: start + len(top_ids)]])).logits[0]
        # The logits at position t predict token t + 1.
        per_token += kl_from_top_k(logits[start - 1 : start - 1 + len(top_ids)], ids, logprobs).tolist()
    return {"mean_kl": sum(per_token) / len(per_token) if per_token else None, "tokens": len(per_token),
            "rows": len(rows) - without, "rows_without_targets": without}
