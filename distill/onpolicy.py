"""Owns stage 2b's prompted teacher inside TRL's trainers and its runtime checks; must not parse flags or load files.

On-policy prompt distillation (stage 2b): the student samples an answer without the prompt, and a teacher that
reads the prompt scores every sampled token; the loss is TRL's generalized JSD on those tokens (beta 1: reverse KL).

TRL's DistillationTrainer gives the teacher the student's own input. Here the teacher's input is the prompt file's
system prompt, example turns and query template around the same query (a text or a conversation), rendered by
distill/render.py in the teacher's own chat template and in the final-answer state the student writes in, followed by
the student's sampled answer. Three teachers:
  - self (default): the student's base with its adapter disabled, given the prompt: classic context distillation,
    one model in memory;
  - another model in this process (--teacher_model_name_or_path), whose tokenizer must match the student's;
  - a vLLM server (--teacher_server_url; `python -m distill.teacher_server MODEL --max-logprobs 1`, which reads the
    prompt from its prefix cache, or `vllm serve`), scoring with prompt_logprobs.

An in-process teacher is frozen and every row starts with the same prompt, so the prompt's KV cache is computed once
per run (`PrefixCache`) and a teacher forward costs the query and the answer, not the 2k-token prompt. Its forwards run
in eval mode (`frozen_forward`): under gradient checkpointing a training-mode forward drops the cache.

Every run proves that its teacher reads the prompt (PromptNotRead stops it otherwise; the run record keeps the
figures): the prompt's cache must hold every prefix token, and at the first step the teacher's log-probabilities of
the sampled answers with the prompt must differ from the same teacher's without it.
"""

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from distill import render
from distill.prompts import TaskPrompt

# The prompt-reading check at the first step: the teacher's mean log-probability of the sampled answer tokens with the
# prompt must differ from the same teacher's without it by more than this (nats per token, mean absolute difference).
# A teacher that reads no prompt gives the same figure both ways, up to float noise (~1e-6); a prompt that a model
# reads moves its answer tokens by tenths of a nat (docs/on-policy.md has the measured figures).
MIN_PROMPT_EFFECT = 1e-3
PROMPT_CHECK_ROWS = 4


class PromptNotRead(RuntimeError):
    """The teacher does not read its prompt: the run stops rather than train the student towards its unprompted
    base. The message names what was measured and the likely cause."""


def shared_prefix(tokenizer, prompt: TaskPrompt, queries: list = ()) -> list[int]:
    """The token ids every teacher input starts with (system prompt and example turns): the common prefix of renders
    of two texts that share nothing and of every conversation among `queries`, less its last token (a merge across
    the boundary could change it). A text query renders like the probes, so only conversations are rendered here:
    one with a system turn of its own (which joins the prompt's) ends the prefix inside the system turn, one whose
    turns go around the query template (an earlier user turn, an assistant turn first) before the template's text."""
    conversations = [query for query in queries if not isinstance(query, str) and (
        len(query) > 1 or query[0]["role"] != "user")]
    renders = [render.teacher_ids(tokenizer, prompt, query, scoring=True)
               for query in ["Alpha?", "7 + 5", *conversations]]
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
            ids = render.teacher_ids(tokenizer, prompt, query, scoring=True)
            if ids[: len(prefix)] != prefix:
                raise ValueError(f"the teacher's input for {query!r} does not start with the prompt's shared tokens; "
                                 f"run with --prompt_cache false")
            suffixes.append(ids[len(prefix):])
        return cls(prefix, suffixes)


@contextlib.contextmanager
def frozen_forward(model):
    """`model` in eval mode for a teacher forward, each module's own mode restored after. Two reasons, both measured:
    transformers' GradientCheckpointingLayer sets past_key_values=None when `gradient_checkpointing and training`
    (TRL's DistillationConfig turns checkpointing on by default), so a self-teacher in the student's training mode
    silently read no cached prompt; and dropout must not touch the teacher's distribution."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@dataclass
class PrefixCache:
    """The KV cache of the shared prefix under one frozen model, computed on first use and copied per batch. Valid
    for the whole run because neither the prefix nor the teacher's weights change (an adapter-disabled student's base
    included: LoRA leaves the base weights untouched)."""

    prefix: list[int]
    cache: object = None
    tokens_computed: int = 0
    cached_length: int | None = None  # what the cache holds once computed: the run record keeps it

    def check(self) -> None:
        """The computed cache must hold every prefix token, else the teacher would read its query without the prompt
        (and at positions from 0); PromptNotRead otherwise."""
        self.cached_length = self.cache.get_seq_length() if self.cache is not None else 0
        if self.cached_length != len(self.prefix):
            raise PromptNotRead(
                f"the teacher's prompt cache holds {self.cached_length} tokens, not the prompt's {len(self.prefix)}: "
                f"the teacher would read each query without its prompt. A forward in training mode under gradient "
                f"checkpointing drops past_key_values (transformers' GradientCheckpointingLayer); the teacher must run "
                f"in eval mode (distill.onpolicy.frozen_forward)")

    def to_dict(self) -> dict:
        return {"prefix_tokens": len(self.prefix), "cached_tokens": self.cached_length,
                "passed": self.cached_length == len(self.prefix)}

    def for_batch(self, backbone, batch_size: int):
        from transformers import DynamicCache

        if self.cache is None:
            ids = torch.tensor([self.prefix], device=backbone.device)
            with torch.no_grad():
                self.cache = backbone(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
            self.tokens_computed += len(self.prefix)
            self.check()
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


def answer_logprobs(log_probs: torch.Tensor, ids: list[int]) -> list[float]:
    """log p of each of `ids` from (len(ids), V) log-probabilities at the positions that predict them."""
    return log_probs.gather(-1, torch.tensor(ids, device=log_probs.device)[:, None])[:, 0].tolist()


def prompt_effect(with_prompt: list[list[float]], without_prompt: list[list[float]]) -> list[float]:
    """The first step's figures from the teacher's log-probabilities of the same answer tokens read with and without
    its prompt (per row): [sum with, sum without, sum of |difference|, tokens, rows], summable over processes."""
    pairs = [(a, b) for row_a, row_b in zip(with_prompt, without_prompt) for a, b in zip(row_a, row_b)]
    return [sum(a for a, _ in pairs), sum(b for _, b in pairs), sum(abs(a - b) for a, b in pairs), len(pairs),
            len(with_prompt)]


def judge_prompt_effect(totals: list[float]) -> dict:
    """prompt_effect's totals (over every process) as the run record's figures; PromptNotRead when the mean absolute
    difference per token is within MIN_PROMPT_EFFECT: the teacher does not read its prompt."""
    with_sum, without_sum, difference, tokens, rows = totals
    tokens = max(tokens, 1)
    figures = {"rows": int(rows), "answer_tokens": int(tokens), "teacher_logprob_with_prompt": with_sum / tokens,
               "teacher_logprob_without_prompt": without_sum / tokens, "mean_abs_difference": difference / tokens,
               "threshold": MIN_PROMPT_EFFECT}
    figures["passed"] = figures["mean_abs_difference"] > MIN_PROMPT_EFFECT
    if not figures["passed"]:
        raise PromptNotRead(
            f"the teacher is not reading its prompt: its log-probabilities of {int(tokens)} sampled answer tokens "
            f"({int(rows)} rows) are the same with the prompt and without it (mean |difference| "
            f"{figures['mean_abs_difference']:.2e} nats per token, threshold {MIN_PROMPT_EFFECT:g}). Check that the "
            f"prompt file has a system prompt or example turns, and that the teacher receives its own input")
    return figures


class PromptedTeacherMixin:
    """What every teacher needs from a batch: its own input for each row's query, and the checks that it reads its
    prompt (in every run: a prefix cache that holds the whole prefix, and a first-step comparison of the teacher's
    answer log-probabilities with and without the prompt). Set by `setup_teacher`."""

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
        self.prompt_check = None  # the first step's prompt_effect figures

    def teacher_checks(self) -> dict:
        """What the run record keeps of the checks that the teacher read its prompt."""
        return {"prefix_cache": self.prefix_cache.to_dict() if self.prefix_cache else None,
                "prompt_effect": self.prompt_check}

    def bare_teacher_ids(self, query) -> list[int]:
        """The teacher's input without its prompt: the query as the bare student reads it, in the teacher's own
        template, in the same (final-answer) state: what the prompt-effect check compares against."""
        return render.chat_ids(self.teacher_tokenizer, render.student_messages(query), answer_next=True)

    # Overrides DistillationTrainer._tokenize_prompts, which applies the chat template to the student's messages
    # itself: they go through distill.render instead, as in stages 2 and 3 (tests/test_render.py), so the student
    # samples from the very ids it is trained and evaluated on. Every generation path (transformers, vLLM) starts here.
    def _tokenize_prompts(self, prompts: list):
        return [render.chat_ids(self._tokenizer, prompt, answer_next=True) for prompt in prompts], None, {}

    # Overrides DistillationTrainer._generate_and_score_completions, which builds the batch from the student's
    # samples: the batch also carries each row's teacher input (its "query" column rendered with the prompt),
    # tokenized here because the rows arrive only now.
    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        queries = [row["query"] for row in inputs]
        teacher = TeacherInputs.build(self.teacher_tokenizer, self.task_prompt, queries, self.teacher_prefix)
        width = max(len(suffix) for suffix in teacher.suffixes)
        device = batch["completion_ids"].device
        # Left-padded like the student's prompt ids, so TRL's shuffle/split of the batch keeps rows together.
        ids = torch.full((len(inputs), width), self._tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(inputs), width), dtype=torch.long, device=device)
        for i, suffix in enumerate(teacher.suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix, device=device)
            mask[i, width - len(suffix):] = 1
        batch["teacher_suffix_ids"], batch["teacher_suffix_mask"] = ids, mask
        if self.prompt_check is None:  # the first batch: its first rows' inputs without the prompt, for the check
            bare = [self.bare_teacher_ids(query) for query in queries]
            width = max(map(len, bare))
            batch["bare_teacher_ids"] = torch.tensor([[self._tokenizer.pad_token_id] * (width - len(row)) + row
                                                      for row in bare], device=device)
            batch["bare_teacher_mask"] = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in bare],
                                                      device=device)
        return batch

    def teacher_suffixes(self, inputs) -> list[list[int]]:
        return [[i for i, keep in zip(row, mask) if keep] for row, mask in
                zip(inputs["teacher_suffix_ids"].tolist(), inputs["teacher_suffix_mask"].tolist())]

    def record_prompt_effect(self, with_prompt, without_prompt, device) -> None:
        """Every process's figures summed (a collective: every process checks at its first step), so all of them stop
        together or none does."""
        totals = torch.tensor(prompt_effect(with_prompt, without_prompt), dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        self.prompt_check = judge_prompt_effect(totals.tolist())

    def bare_inputs(self, inputs) -> list[list[int]] | None:
        if "bare_teacher_ids" not in inputs:
            return None
        return [[i for i, keep in zip(row, mask) if keep] for row, mask in
                zip(inputs["bare_teacher_ids"].tolist(), inputs["bare_teacher_mask"].tolist())][:PROMPT_CHECK_ROWS]


def in_process_trainer_class():
    from trl import DistillationTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    class PromptedDistillationTrainer(PromptedTeacherMixin, DistillationTrainer):
        """A teacher in this process: the student's own base (adapter disabled) or another model."""

        # Overrides DistillationTrainer._compute_loss, whose teacher reads the student's input ids: ours reads its
        # own (prompt, example turns, query) before the same completion, in eval mode (frozen_forward). The student
        # side and the loss (TRL's chunked generalized JSD over the lm_head) are TRL's.
        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
            student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask,
                                                         completion_ids.size(1))
            teacher = self.accelerator.unwrap_model(
                self.teacher_model if self.teacher_model is not None else unwrapped_student)
            suffixes = self.teacher_suffixes(inputs)
            with torch.no_grad(), self.teacher_context(unwrapped_student), frozen_forward(teacher):
                backbone = backbone_of(teacher)
                before = self.prefix_cache.tokens_computed if self.prefix_cache else 0
                teacher_hidden = teacher_hidden_states(backbone, suffixes, completion_ids, completion_mask,
                                                       self.teacher_prefix, self.prefix_cache)
                bare = self.bare_inputs(inputs)
                if bare is not None and self.prompt_check is None:
                    self.check_prompt_effect(teacher, backbone, bare, teacher_hidden, completion_ids, completion_mask)
            self.spend.prefix += (self.prefix_cache.tokens_computed - before) if self.prefix_cache else 0
            self.spend.forwarded += sum(map(len, suffixes)) + int(completion_mask.sum()) + (
                0 if self.prefix_cache else len(self.teacher_prefix) * len(suffixes))
            self.spend.steps += 1
            student_head = unwrapped_student.get_output_embeddings()
            teacher_head = teacher.get_output_embeddings()
            loss, entropy_sum, n_valid = _chunked_divergence_loss(
                student_hidden, teacher_hidden.to(student_hidden.dtype), student_head.weight,
                teacher_head.weight.to(student_head.weight.device), completion_mask, self.beta,
                num_items_in_batch=num_items_in_batch, temperature=self.temperature)
            return loss, entropy_sum.detach(), n_valid

        def check_prompt_effect(self, teacher, backbone, bare, teacher_hidden, completion_ids, completion_mask):
            """The first step's check on its first rows: the teacher's log-probabilities of their sampled answers as
            training computed them (with the prompt) against a plain forward of the same answers after the bare
            query. Every process takes part (under FSDP each forward is a collective) and decides on the figures
            summed over all of them, so all stop together."""
            head = teacher.get_output_embeddings()
            with_prompt, without_prompt = [], []
            for i, bare_ids in enumerate(bare):
                answer = [t for t, keep in zip(completion_ids[i].tolist(), completion_mask[i].tolist()) if keep]
                log_t = torch.log_softmax(head(teacher_hidden[i, : len(answer)]).float(), -1)
                with_prompt.append(answer_logprobs(log_t, answer))
                ids = torch.tensor([bare_ids + answer], device=completion_ids.device)
                hidden = backbone(input_ids=ids).last_hidden_state[0, len(bare_ids) - 1: -1]
                without_prompt.append(answer_logprobs(torch.log_softmax(head(hidden).float(), -1), answer))
            self.record_prompt_effect(with_prompt, without_prompt, completion_ids.device)

        def teacher_context(self, unwrapped_student):
            """The self-teacher is the student's base: its adapter is off while it scores."""
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
            self.teacher_client = self.teacher_client_class(base_url=self.args.teacher_model_server_url,
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
            bare = self.bare_inputs(inputs)
            if bare is not None and self.prompt_check is None:
                self.check_server_prompt_effect(suffixes, bare, completion_ids, completion_mask)
            # TRL's loss reads the student's positions from `aligned_prompt_length` (the batch's shortest unpadded
            # prompt), while its completions start at the padded prompt width: TRL places each teacher completion at
            # (its start - aligned_prompt_length), so the start we pass must leave the same gap. Passing the
            # teacher's own width put the teacher's log-probs over the student's prompt whenever the batch's queries
            # differed in length (no gradient at all, or the wrong tokens paired).
            gap = inputs["prompt_ids"].size(1) - aligned_prompt_length
            return super()._get_teacher_token_logprobs_from_server(teacher_inputs, width - gap)

        def check_server_prompt_effect(self, suffixes, bare, completion_ids, completion_mask):
            """The first step's check on its first rows, asked of the server: the same answers after the teacher's
            input and after the bare query, scored in one request (the student's tokens, read as prompt_logprobs)."""
            answers = [[t for t, keep in zip(ids, mask) if keep][:] for ids, mask in
                       zip(completion_ids.tolist()[: len(bare)], completion_mask.tolist()[: len(bare)])]
            prompts = [self.teacher_prefix + suffix for suffix in suffixes[: len(bare)]] + bare
            result = self.teacher_client.get_sequence_logprobs(
                sequences=[prompt + answer for prompt, answer in zip(prompts, answers + answers)],
                prompt_lengths=[len(prompt) for prompt in prompts], top_logprobs=1)
            scored = [[position[0] for position in row] for row in result["actual_logprobs"]]
            self.record_prompt_effect(scored[: len(bare)], scored[len(bare):], completion_ids.device)

    return PromptedServerDistillationTrainer


def backbone_of(model):
    """The decoder stack under the LM head, as TRL's _get_last_hidden_state reaches it (through a PEFT wrapper)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model
