"""On-policy prompt distillation (stage 2b): the student samples an answer without the prompt, and a teacher that
reads the prompt scores every sampled token; the loss is TRL's generalized JSD on those tokens (beta 1: reverse KL).

TRL's DistillationTrainer gives the teacher the student's own input. Here the teacher's input is the prompt file's
system prompt, example turns and query template around the same query (a text or a conversation), rendered as stage
1 renders it, followed by the student's sampled answer. Three teachers:
  - self (default): the student's base with its adapter disabled, given the prompt: classic context distillation,
    one model in memory;
  - another model in this process (--teacher_model_name_or_path), whose tokenizer must match the student's;
  - a vLLM server (--teacher_server_url, `vllm serve MODEL --max-logprobs K`), scoring with prompt_logprobs.

An in-process teacher is frozen and every row starts with the same prompt, so the prompt's KV cache is computed once
per run (`PrefixCache`) and a teacher forward costs the query and the answer, not the 2k-token prompt.
"""

import copy
from dataclasses import dataclass, field

import torch

from distill.prompts import BARE_STUDENT, StudentSide, TaskPrompt, render_teacher, student_prompt_ids

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def teacher_text(tokenizer, prompt: TaskPrompt, query: str | list[dict]) -> str:
    """The teacher's input for a query, up to the assistant header. A thinking template that opens <think> in the
    generation prompt (Qwen3 Thinking-2507) gets an empty think block: the teacher scores a final answer, which is
    what the student writes."""
    text = render_teacher(tokenizer, prompt.teacher_messages(query))
    if text.rstrip().endswith(THINK_OPEN):
        text = text.rstrip() + f"\n\n{THINK_CLOSE}\n\n"
    return text


def teacher_ids(tokenizer, prompt: TaskPrompt, query: str | list[dict]) -> list[int]:
    return tokenizer(teacher_text(tokenizer, prompt, query), add_special_tokens=False).input_ids


def shared_prefix(tokenizer, prompt: TaskPrompt, queries: list = ()) -> list[int]:
    """The token ids every teacher input starts with (system prompt and example turns): the common prefix of renders
    of two texts that share nothing and of every conversation among `queries`, less its last token (a merge across
    the boundary could change it). A text query renders like the probes, so only conversations are rendered here:
    one with a system turn of its own (which joins the prompt's) ends the prefix inside the system turn, one whose
    turns go around the query template (an earlier user turn, an assistant turn first) before the template's text."""
    conversations = [query for query in queries if not isinstance(query, str) and (
        len(query) > 1 or query[0]["role"] != "user")]
    renders = [teacher_ids(tokenizer, prompt, query) for query in ["Alpha?", "7 + 5", *conversations]]
    length = 0
    while length < min(map(len, renders)) and len({ids[length] for ids in renders}) == 1:
        length += 1
    return renders[0][: max(length - 1, 0)]


@dataclass
class TeacherInputs:
    """Per row, the teacher's ids after the shared prefix (its query turn), and the prefix they all start with."""

    prefix: list[int]
    suffixes: list[list[int]]

    @classmethod
    def build(cls, tokenizer, prompt: TaskPrompt, queries: list[str], prefix: list[int]) -> "TeacherInputs":
        suffixes = []
        for query in queries:
            ids = teacher_ids(tokenizer, prompt, query)
            if ids[: len(prefix)] != prefix:
                raise ValueError(f"the teacher's input for {query!r} does not start with the prompt's shared tokens; "
                                 f"run with --prompt_cache false")
            suffixes.append(ids[len(prefix):])
        return cls(prefix, suffixes)


@dataclass
class PrefixCache:
    """The KV cache of the shared prefix under one frozen model, computed on first use and copied per batch. Valid
    for the whole run because neither the prefix nor the teacher's weights change (an adapter-disabled student's base
    included: LoRA leaves the base weights untouched)."""

    prefix: list[int]
    cache: object = None
    tokens_computed: int = 0

    def for_batch(self, backbone, batch_size: int):
        from transformers import DynamicCache

        if self.cache is None:
            ids = torch.tensor([self.prefix], device=backbone.device)
            with torch.no_grad():
                self.cache = backbone(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
            self.tokens_computed += len(self.prefix)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch_size)
        return cache


@dataclass
class TeacherSpend:
    """Teacher tokens spent in training: forwarded through an in-process teacher, or sent to a server."""

    forwarded: int = 0
    prefix: int = 0
    steps: int = 0
    per_step: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"tokens": self.forwarded + self.prefix, "query_and_answer_tokens": self.forwarded,
                "prompt_prefix_tokens": self.prefix, "teacher_forwards": self.steps}


def teacher_hidden_states(backbone, suffixes: list[list[int]], completion_ids: torch.Tensor,
                          completion_mask: torch.Tensor, prefix: list[int], prefix_cache: PrefixCache | None):
    """The teacher's last hidden states at the positions that predict each completion token: (B, C, H), aligned
    with completion_ids. Each row is [prefix] + its suffix + its completion, right-padded (so positions stay those
    of an unpadded row); with a cache the prefix is not forwarded again."""
    rows = []
    for suffix, ids, mask in zip(suffixes, completion_ids.tolist(), completion_mask.tolist()):
        rows.append(([] if prefix_cache else prefix) + suffix + [i for i, keep in zip(ids, mask) if keep])
    width = max(len(row) for row in rows)
    device = completion_ids.device
    input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    attention = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, device=device)
        attention[i, : len(row)] = 1
    kwargs = {"use_cache": prefix_cache is not None}
    if prefix_cache is not None:
        kwargs["past_key_values"] = prefix_cache.for_batch(backbone, len(rows))
        attention = torch.cat([torch.ones(len(rows), len(prefix), dtype=torch.long, device=device), attention], dim=1)
    hidden = backbone(input_ids=input_ids, attention_mask=attention, **kwargs).last_hidden_state
    # The hidden state at position p predicts token p + 1: completion token j of row i is predicted at
    # (its start) + j - 1, where its start is after the (uncached) prefix and the suffix.
    offset = 0 if prefix_cache else len(prefix)
    starts = torch.tensor([offset + len(suffix) - 1 for suffix in suffixes], device=device)
    positions = (starts[:, None] + torch.arange(completion_ids.size(1), device=device)[None, :]).clamp(
        max=hidden.size(1) - 1)
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))


# ---- the trainers: TRL's, with the teacher reading the prompt ---------------------------------------------------


class PromptedTeacherMixin:
    """What every teacher needs from a batch: its own input for each row's query. Set by `setup_teacher`."""

    task_prompt: TaskPrompt
    teacher_prefix: list[int]
    spend: TeacherSpend

    def setup_teacher(self, task_prompt: TaskPrompt, teacher_tokenizer, prefix: list[int], cache: bool):
        """prefix: the prompt's tokens every row's teacher input starts with, kept apart from each row's own
        (shared_prefix over the run's queries; [] for none); cache: compute their KV cache once (an in-process
        teacher)."""
        self.task_prompt, self.teacher_tokenizer = task_prompt, teacher_tokenizer
        self.teacher_prefix = prefix
        self.prefix_cache = PrefixCache(self.teacher_prefix) if cache else None
        self.spend = TeacherSpend()

    # Overrides DistillationTrainer._generate_and_score_completions, which builds the batch from the student's
    # samples: the batch also carries each row's teacher input (its "query" column rendered with the prompt),
    # tokenized here because the rows arrive only now.
    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        teacher = TeacherInputs.build(self.teacher_tokenizer, self.task_prompt, [row["query"] for row in inputs],
                                      self.teacher_prefix)
        width = max(len(suffix) for suffix in teacher.suffixes)
        device = batch["completion_ids"].device
        # Left-padded like the student's prompt ids, so TRL's shuffle/split of the batch keeps rows together.
        ids = torch.full((len(inputs), width), self._tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(inputs), width), dtype=torch.long, device=device)
        for i, suffix in enumerate(teacher.suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix, device=device)
            mask[i, width - len(suffix):] = 1
        batch["teacher_suffix_ids"], batch["teacher_suffix_mask"] = ids, mask
        return batch

    def teacher_suffixes(self, inputs) -> list[list[int]]:
        return [[i for i, keep in zip(row, mask) if keep] for row, mask in
                zip(inputs["teacher_suffix_ids"].tolist(), inputs["teacher_suffix_mask"].tolist())]


def in_process_trainer_class():
    from trl import DistillationTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    class PromptedDistillationTrainer(PromptedTeacherMixin, DistillationTrainer):
        """A teacher in this process: the student's own base (adapter disabled) or another model."""

        # Overrides DistillationTrainer._compute_loss, whose teacher reads the student's input ids: ours reads its
        # own (prompt, example turns, query) before the same completion. The student side and the loss (TRL's chunked
        # generalized JSD over the lm_head) are TRL's.
        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
            student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask,
                                                         completion_ids.size(1))
            teacher = self.teacher_model if self.teacher_model is not None else unwrapped_student
            suffixes = self.teacher_suffixes(inputs)
            with torch.no_grad(), self.teacher_context(unwrapped_student):
                backbone = backbone_of(self.accelerator.unwrap_model(teacher))
                before = self.prefix_cache.tokens_computed if self.prefix_cache else 0
                teacher_hidden = teacher_hidden_states(backbone, suffixes, completion_ids, completion_mask,
                                                       self.teacher_prefix, self.prefix_cache)
            self.spend.prefix += (self.prefix_cache.tokens_computed - before) if self.prefix_cache else 0
            self.spend.forwarded += sum(map(len, suffixes)) + int(completion_mask.sum()) + (
                0 if self.prefix_cache else len(self.teacher_prefix) * len(suffixes))
            self.spend.steps += 1
            student_head = unwrapped_student.get_output_embeddings()
            teacher_head = self.accelerator.unwrap_model(teacher).get_output_embeddings()
            loss, entropy_sum, n_valid = _chunked_divergence_loss(
                student_hidden, teacher_hidden.to(student_hidden.dtype), student_head.weight,
                teacher_head.weight.to(student_head.weight.device), completion_mask, self.beta,
                num_items_in_batch=num_items_in_batch, temperature=self.temperature)
            return loss, entropy_sum.detach(), n_valid

        def teacher_context(self, unwrapped_student):
            """The self-teacher is the student's base: its adapter is off while it scores."""
            import contextlib

            if self.teacher_model is None:
                return unwrapped_student.disable_adapter()
            return contextlib.nullcontext()

    return PromptedDistillationTrainer


def server_trainer_class():
    from trl.experimental.server_distillation import ServerDistillationTrainer
    from trl.generation.vllm_client import VLLMClient

    from distill.teacher_server import NOT_SCORED, PROMPT_LOGPROBS_FROM

    class PromptCacheClient(VLLMClient):
        """TRL's teacher client, whose scoring requests also say where their rows' answers start: a teacher started
        with `python -m distill.teacher_server` then reads the prompt before that from its prefix cache (a plain
        `vllm serve` ignores the field and recomputes the prompt, as before)."""

        scored_from: int | None = None

        # Overrides VLLMClient.get_sequence_logprobs, which posts prompt + completion with prompt_logprobs (through
        # _post, below): the same requests, each naming the first position any of its rows scores.
        def get_sequence_logprobs(self, sequences, prompt_lengths, **kwargs):
            self.scored_from = min(prompt_lengths)
            try:
                result = super().get_sequence_logprobs(sequences, prompt_lengths, **kwargs)
            finally:
                self.scored_from = None
            for row, scores in enumerate(result["actual_logprobs"]):
                if [NOT_SCORED] in scores:  # the server's contract broken: never train on a missing score
                    raise RuntimeError(f"the teacher server at {self.base_url} returned no log-probability for "
                                       f"answer token {scores.index([NOT_SCORED])} of row {row}")
            return result

        def _post(self, url, **kwargs):
            if self.scored_from is not None and url.endswith("/v1/completions"):
                kwargs["json"] = {**kwargs["json"], "vllm_xargs": {PROMPT_LOGPROBS_FROM: self.scored_from}}
            return super()._post(url, **kwargs)

    class PromptedServerDistillationTrainer(PromptedTeacherMixin, ServerDistillationTrainer):
        """A teacher on a vLLM server: TRL sends it prompt + completion and reads prompt_logprobs."""

        teacher_client_class = PromptCacheClient

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # TRL's __init__ connected its own VLLMClient; ours is the same client with the answers' start in each
            # request, so that the shared prompt is read from the server's prefix cache, not recomputed per row.
            self.teacher_client = PromptCacheClient(base_url=self.args.teacher_model_server_url,
                                                    connection_timeout=60.0)

        # Overrides ServerDistillationTrainer._get_teacher_token_logprobs_from_server, which sends the student's
        # input ids: the same request goes out with the teacher's input (whole, prompt included: the teacher
        # server reads the shared prompt from its prefix cache) before the student's completion, laid out as TRL
        # aligns it.
        def _get_teacher_token_logprobs_from_server(self, inputs, aligned_prompt_length):
            suffixes = self.teacher_suffixes(inputs)
            prefix = self.teacher_prefix
            width = max(len(prefix) + len(suffix) for suffix in suffixes)
            rows, masks = [], []
            for suffix in suffixes:
                ids = prefix + suffix
                rows.append([self._tokenizer.pad_token_id] * (width - len(ids)) + ids)
                masks.append([0] * (width - len(ids)) + [1] * len(ids))
            device = inputs["completion_ids"].device
            teacher_prompt = torch.tensor(rows, device=device)
            teacher_mask = torch.tensor(masks, device=device)
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            labels = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, -100))
            teacher_inputs = {
                "input_ids": torch.cat([teacher_prompt, completion_ids], dim=1),
                "attention_mask": torch.cat([teacher_mask, completion_mask], dim=1),
                "prompt_attention_mask": teacher_mask,
                "labels": torch.cat([torch.full_like(teacher_prompt, -100), labels], dim=1),
            }
            self.spend.forwarded += int(teacher_mask.sum()) + int(completion_mask.sum())
            self.spend.steps += 1
            # TRL's loss reads the student's positions from `aligned_prompt_length` (the batch's shortest unpadded
            # prompt), while its completions start at the padded prompt width: TRL places each teacher completion at
            # (its start - aligned_prompt_length), so the start we pass must leave the same gap. Passing the
            # teacher's own width put the teacher's log-probs over the student's prompt whenever the batch's queries
            # differed in length (no gradient at all, or the wrong tokens paired).
            gap = inputs["prompt_ids"].size(1) - aligned_prompt_length
            return super()._get_teacher_token_logprobs_from_server(teacher_inputs, width - gap)

    return PromptedServerDistillationTrainer


def backbone_of(model):
    """The decoder stack under the LM head, as TRL's _get_last_hidden_state reaches it (through a PEFT wrapper)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


# ---- measuring: how close a student is to the prompted teacher, and how far it drifted from its base -----------


def answer_ids(tokenizer, answer: str) -> list[int]:
    """An answer as the student writes it: its tokens, then the end-of-turn token."""
    return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def student_hidden_states(backbone, tokenizer, queries: list, completions: list[list[int]],
                          side: StudentSide = BARE_STUDENT):
    """The student's hidden states (no prompt; its own side of the prompt file) predicting each completion token,
    (B, C, H), right-padded."""
    prompts = student_prompt_ids(tokenizer, queries, side)
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
            rows = student_prompt_ids(tokenizer, texts[start: start + batch_size], side)
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id or 0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            log_b = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits, -1)
            log_s = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits, -1)
            total += (log_b.exp() * (log_b - log_s)).sum(-1)[mask.bool()].sum().item()
            tokens += mask.sum().item()
    return {"kl_base_to_student": total / tokens, "tokens": int(tokens), "texts": len(texts)}
