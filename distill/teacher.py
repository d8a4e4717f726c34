"""Owns the teacher's contract (constraint, parsing) and the stream through vLLM; must not choose sampling.

The one teacher path that stage 1 and `evaluate.py --with_prompt` share: render a query with the long prompt,
constrain and parse the answer (sampling parameters are distill/sampling.py's), and stream requests through vLLM so
each query's answer is handed back the moment its last sample finishes.

    teacher = Teacher(tokenizer, prompt, max_model_len, constrain_labels=True)
    params = sampling.sampling_params(llm.get_default_sampling_params(), {"temperature": 0.0}, max_tokens=8192,
                                      structured_outputs=teacher.constraint())
    for outcome in stream(VllmEngine(llm), teacher, rows, params, max_retries=3, max_in_flight=256):
        ...  # outcome.row, outcome.answer (None: rejected, see outcome.reason), outcome.samples, outcome.failures

The stream keeps at most `max_in_flight` requests in the engine, pairs every output with its query by request id
(never by position: completions arrive in any order), redraws a sample that breaks the answer contract at once
(not after a batch), and on `stop()` aborts what is in flight and hands back only queries that really finished.

A query's answer is a label for a label task (the majority of its valid samples' labels), and for a generative
prompt (a `check` instead of labels) the teacher's whole final answer: with num_samples > 1 the first valid
sample's, since votes between free texts mean nothing (stage 1's --keep all writes every valid sample instead).
A query is a row's text or its conversation (distill.render.query_of); its text (a conversation's last user turn)
is what an answer must be on topic to.
"""

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from copy import copy
from dataclasses import dataclass, field

from distill import render
from distill.answers import Parsed, parse_generative, parse_teacher
from distill.checks import non_answer_reason
from distill.prompts import TaskPrompt
from distill.render import query_of
from distill.rules import broken

# ---- the teacher: rendering, constraint, parsing ----------------------------------------------------------------


@dataclass
class Teacher:
    tokenizer: object
    prompt: TaskPrompt
    max_model_len: int
    constrain_labels: bool = False
    keep_rule_failures: bool = False  # an answer that breaks a verifiable rule is kept (its row names the rules)
    # Thinking templates (Qwen3 Thinking-2507) open <think> in the prompt: the output then holds only </think>.
    expects_reasoning: bool = field(init=False)

    def __post_init__(self):
        self.expects_reasoning = render.generates_reasoning(self.tokenizer)

    def render(self, query: str | list[dict]) -> str:
        return render.teacher_text(self.tokenizer, self.prompt, query)

    def token_ids(self, query: str | list[dict]) -> list[int]:
        return render.token_ids(self.tokenizer, self.render(query))

    def encode(self, query: str | list[dict]) -> tuple[list[int], str]:
        """The query's input ids and its input_sha256, from one rendering (the stream admits every query this way)."""
        rendered = self.render(query)
        return render.token_ids(self.tokenizer, rendered), self.sha256_of(rendered)

    def input_sha256(self, query: str | list[dict]) -> str:
        """What the teacher is asked for `query`: the hash of its rendered input and of the prompt file (whose labels,
        check and stop strings the rendering does not all show). Stage 1 stores it in every finished row, and a resume
        refuses a row whose input now hashes otherwise (distill/run_files.py)."""
        return self.sha256_of(self.render(query))

    def sha256_of(self, rendered: str) -> str:
        return hashlib.sha256(f"{self.prompt.sha256}\n{rendered}".encode()).hexdigest()

    def constraint(self):
        """vLLM structured outputs over the label set (after the reasoning, with a reasoning parser), or None."""
        if not self.constrain_labels:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(choice=list(self.prompt.labels))

    def parse(self, text: str, finish_reason: str | None = None, query: str | None = None) -> Parsed:
        """A label, or a generative answer that is an answer to `query`: one that restates the prompt, loops or is
        off topic (distill/checks.py) breaks the contract like a cut one, so it is redrawn and at last rejected. So
        does one that breaks a verifiable rule of the prompt (reason "rule:<the first one's id>"), unless
        keep_rule_failures keeps it with the ids of the rules it breaks."""
        if not self.prompt.is_generative:
            return parse_teacher(text, self.prompt, self.expects_reasoning, self.constrain_labels)
        parsed = parse_generative(text, finish_reason, self.expects_reasoning)
        reason = parsed.answer and query is not None and non_answer_reason(self.prompt, query, parsed.answer)
        if reason or parsed.answer is None:
            return Parsed(None, reason, parsed.reasoning_chars) if reason else parsed
        rules_broken = tuple(broken(self.prompt.rules, parsed.answer))
        if rules_broken and not self.keep_rule_failures:
            return Parsed(None, f"rule:{rules_broken[0]}", parsed.reasoning_chars, rules_broken)
        return Parsed(parsed.answer, "ok", parsed.reasoning_chars, rules_broken)


# ---- one query's outcome ----------------------------------------------------------------------------------------


@dataclass
class Sample:
    parsed: Parsed
    text: str
    finish_reason: str | None
    output_tokens: int = 0  # generated, reasoning included: the cost of this sample
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # vLLM's per-token top-K ({token id: Logprob}), when the params asked for them


@dataclass
class Outcome:
    """What became of one query: its valid samples and the ones that broke the contract, and from them its answer
    or the reason it has none."""

    row: dict
    samples: list[Sample] = field(default_factory=list)  # valid samples
    failures: list[Sample] = field(default_factory=list)  # samples that broke the answer contract
    too_long: bool = False
    generative: bool = False  # free text: the first valid sample is the answer, not a vote
    input_sha256: str | None = None  # Teacher.input_sha256 of its query, which stage 1 stores for resume to compare

    @property
    def votes(self) -> Counter:
        return Counter(sample.parsed.answer for sample in self.samples)

    @property
    def answer(self) -> str | None:
        """The label most valid samples gave (a generative task: the first valid answer); None when no sample is
        valid (the query is rejected)."""
        if not self.samples:
            return None
        return self.samples[0].parsed.answer if self.generative else self.votes.most_common(1)[0][0]

    @property
    def reason(self) -> str:
        if self.samples:
            return "ok"
        if self.too_long:
            return "too_long"
        return Counter(sample.parsed.reason for sample in self.failures).most_common(1)[0][0]


@dataclass
class StreamStats:
    """Live and final figures of a stream. The prefix-cache hit rate is read from each output's num_cached_tokens."""

    started: float = field(default_factory=time.monotonic)
    answered: int = 0
    rejected: int = 0
    samples: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # None while the engine reports no cached-token counts
    reject_reasons: Counter = field(default_factory=Counter)

    def add_output(self, output) -> None:
        self.samples += 1
        self.generated_tokens += sum(len(sample.token_ids) for sample in output.outputs)
        self.prompt_tokens += len(output.prompt_token_ids or ())
        if output.num_cached_tokens is not None:
            self.cached_tokens = (self.cached_tokens or 0) + output.num_cached_tokens

    def add_outcome(self, outcome: Outcome) -> None:
        self.count(None if outcome.answer is not None else outcome.reason)

    def count(self, reject_reason: str | None) -> None:
        """One finished query: answered, or rejected for `reject_reason`."""
        if reject_reason is None:
            self.answered += 1
        else:
            self.rejected += 1
            self.reject_reasons[reject_reason] += 1

    def summary(self) -> dict:
        seconds = max(time.monotonic() - self.started, 1e-9)
        return {
            "finished": self.answered + self.rejected,
            "labelled": self.answered,  # the run record's name for queries answered, labels or not
            "rejected": self.rejected,
            "reject_reasons": dict(self.reject_reasons),
            "samples": self.samples,
            "seconds": round(seconds, 2),
            "queries_per_second": round((self.answered + self.rejected) / seconds, 3),
            "generated_tokens_per_second": round(self.generated_tokens / seconds, 1),
            "prefix_cache_hit_rate": (round(self.cached_tokens / self.prompt_tokens, 4)
                                      if self.cached_tokens is not None and self.prompt_tokens else None),
        }


class StopRequest:
    """The first Ctrl-C or SIGTERM asks a stream to stop cleanly (what finished is on disk, the run record says
    interrupted); a second one gets the default action and ends the process at once."""

    def __init__(self, program: str):
        import signal

        self.program, self.signal = program, None
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self.handle)

    def handle(self, number, frame):
        import signal
        import sys

        self.signal = number
        signal.signal(number, signal.SIG_DFL)
        print(f"\n{self.program}: {signal.Signals(number).name}: nothing new is sent; stopping", file=sys.stderr)

    def requested(self) -> bool:
        return self.signal is not None


# ---- the engine loop --------------------------------------------------------------------------------------------


class VllmEngine:
    """The three calls `stream` makes, on a `vllm.LLM`: the loop LLM.generate runs itself, but with our request ids
    and requests added while others run. Prompts are rendered as the engine asks (Renderer.render_cmpl)."""

    def __init__(self, llm, lora_request=None):
        from vllm.renderers.inputs.preprocess import parse_model_prompt
        from vllm.sampling_params import RequestOutputKind

        self.llm, self.lora_request = llm, lora_request
        self.parse_model_prompt, self.final_only = parse_model_prompt, RequestOutputKind.FINAL_ONLY
        self.count = 0

    @property
    def max_num_seqs(self) -> int:
        return self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs

    def add_request(self, token_ids: list[int], params) -> str:
        renderer = self.llm.renderer
        prompt = self.parse_model_prompt(self.llm.model_config, {"prompt_token_ids": token_ids})
        (engine_input,) = renderer.render_cmpl([prompt], renderer.default_cmpl_tok_params)
        params.output_kind = self.final_only  # one output per request, when it is done
        self.count += 1
        request_id = f"teacher-{self.count}"
        self.llm.llm_engine.add_request(request_id, engine_input, params, lora_request=self.lora_request)
        return request_id

    def step(self) -> list:
        return self.llm.llm_engine.step()

    def abort_request(self, request_ids: list[str]) -> None:
        self.llm.llm_engine.abort_request(request_ids)


@dataclass
class _Job:
    outcome: Outcome
    token_ids: list[int]
    params: object
    retries_left: int
    pending: int = 0
    abandoned: bool = False  # a redraw was due when the stream stopped: the query is not finished


def stream(engine, teacher: Teacher, rows: Iterable[dict], params, *, num_samples: int = 1, max_retries: int = 0,
           max_in_flight: int = 256, stop: Callable[[], bool] = lambda: False,
           stats: StreamStats | None = None) -> Iterator[Outcome]:
    """Each query's Outcome as soon as it is final: `num_samples` valid samples, or its redraw budget spent.

    At most `max_in_flight` requests are in the engine (a query's first samples go in together, so one query with
    more samples than that still runs). Queries are tokenized when admitted, not up front. After `stop()` turns
    true no request is added, the ones in flight are aborted, and only queries that finished are handed back.
    """
    stats = stats or StreamStats()
    owners: dict[str, _Job] = {}
    rows = iter(rows)
    exhausted = False

    def submit(job: _Job) -> None:
        owners[engine.add_request(job.token_ids, job.params)] = job
        job.pending += 1

    while True:
        while not exhausted and not stop() and (not owners or len(owners) + num_samples <= max_in_flight):
            row = next(rows, None)
            if row is None:
                exhausted = True
                break
            token_ids, input_sha256 = teacher.encode(query_of(row))
            generative = teacher.prompt.is_generative
            if len(token_ids) >= teacher.max_model_len:
                outcome = Outcome(row, too_long=True, generative=generative, input_sha256=input_sha256)
                stats.add_outcome(outcome)
                yield outcome
                continue
            job_params = copy(params)  # the answer budget is what the context has left after this prompt
            job_params.max_tokens = min(params.max_tokens, teacher.max_model_len - len(token_ids))
            job = _Job(Outcome(row, generative=generative, input_sha256=input_sha256), token_ids, job_params,
                       retries_left=max_retries)
            for _ in range(num_samples):
                submit(job)
        if stop() or not owners:
            if owners:
                engine.abort_request(list(owners))
            return
        for output in engine.step():
            if not output.finished:
                continue
            job = owners.pop(output.request_id)  # pairing by id: a KeyError here would be an engine bug
            job.pending -= 1
            stats.add_output(output)
            for completion in output.outputs:
                sample = Sample(teacher.parse(completion.text, completion.finish_reason, job.outcome.row["text"]),
                                completion.text,
                                completion.finish_reason, len(completion.token_ids), list(completion.token_ids),
                                completion.logprobs if params.logprobs else None)
                (job.outcome.samples if sample.parsed.answer else job.outcome.failures).append(sample)
                if sample.parsed.answer is None and job.retries_left and len(job.outcome.samples) < num_samples:
                    if stop():
                        job.abandoned = True
                    else:
                        job.retries_left -= 1
                        submit(job)
            if job.pending == 0 and not job.abandoned:
                stats.add_outcome(job.outcome)
                yield job.outcome
