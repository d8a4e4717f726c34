"""Owns writing queries with the model itself (stage 0): requests, parsing, targets; must not write files.

Writing queries for a task prompt with the model itself (Snell et al.): what one request asks, how the answer is
read as one query, which topic or label each request targets, and the loop that streams requests through the one
teacher path (`distill.teacher.stream`) until every target has its queries or the attempt budget is spent.

A request is a single user message: a short instruction, the task prompt quoted (first, so vLLM's prefix cache
computes it once for every request), then what varies per request: the target (a topic, or the label the task's
answer should be) and up to `diversity` examples.

`diversity` = K examples per request, drawn afresh for every request (seeded by the engine seed and the request's
number) from the seed examples, or, without any, from the queries kept so far; the request asks for a message
unlike them. K = 0 shows none. Targets rotate request by request over the topics (or labels) that still miss
queries, so a run that stops early has spread its queries over the targets instead of filling the first one.
"""

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice

from distill.answers import Parsed, split_reasoning
from distill.dedup import NearDuplicateIndex
from distill.prompts import TaskPrompt
from distill.render import chat_ids, chat_text, generates_reasoning

INSTRUCTION = ("Below, between <<< and >>>, are the instructions an AI assistant follows. Write one new message "
               "that a user might send to this assistant: the kind of message these instructions are meant for.")
CLOSING = "Reply with the message only, on one line, without quotes or explanation."
MIN_CHARS, MAX_CHARS = 8, 300
DEFAULT_DIVERSITY = 3

# Decoration a model puts around a single message: list markers, a "Question:" label, Markdown bold, quotes.
LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+\s*[.):]|#+)\s+")
LABEL_PREFIX = re.compile(r"^(?:user(?:\s+message)?|message|question|query|q)\s*\d*\s*[:：]\s*", re.IGNORECASE)
QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`", "„": "“"}


# ---- reading the model's answer as one query --------------------------------------------------------------------


def clean_line(line: str) -> str:
    """One line without the decoration around the message: list markers, a label, bold, enclosing quotes."""
    text = " ".join(line.split())
    text = LIST_MARKER.sub("", text)
    text = text.replace("**", "")  # Markdown bold, around the whole message or a "**Question:**" label
    text = LABEL_PREFIX.sub("", text).strip()
    while len(text) >= 2 and QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def parse_query(output: str, finish_reason: str | None, expects_reasoning: bool = False,
                min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> Parsed:
    """The first line of the answer (after any reasoning) that is a message, not an announcement of one ("Here is a
    question:"), cleaned; or why there is none. A line the engine cut at max_tokens is refused: it may be half a
    message. Parsed.answer holds the query: the writer's answer is a query."""
    final, reasoning_chars = split_reasoning(output, expects_reasoning)
    if final is None:
        return Parsed(None, "cut_at_max_tokens" if finish_reason == "length" else "unclosed_reasoning",
                      reasoning_chars)
    lines = final.splitlines()
    for number, line in enumerate(lines):
        query = clean_line(line)
        if not query or query.endswith((":", "：")):
            continue
        if finish_reason == "length" and number == len(lines) - 1 and not final.endswith("\n"):
            return Parsed(None, "cut_at_max_tokens", reasoning_chars)
        if len(query) < min_chars:
            return Parsed(None, "too_short", reasoning_chars)
        if len(query) > max_chars:
            return Parsed(None, "too_long", reasoning_chars)
        return Parsed(query, "ok", reasoning_chars)
    return Parsed(None, "cut_at_max_tokens" if finish_reason == "length" else "empty", reasoning_chars)


@dataclass
class QueryWriter:
    """The Teacher interface that `distill.teacher.stream` uses (encode, parse, prompt, max_model_len), for
    requests that ask for a query instead of an answer. A request row's "text" is only its varying part; the
    instruction and the task prompt are added here, so rejects files do not repeat the prompt."""

    tokenizer: object
    prompt: TaskPrompt  # stream reads prompt.is_generative; with one sample per request it changes nothing
    max_model_len: int
    min_chars: int = MIN_CHARS
    max_chars: int = MAX_CHARS
    expects_reasoning: bool = field(init=False)

    def __post_init__(self):
        self.expects_reasoning = generates_reasoning(self.tokenizer)

    def messages(self, request: str) -> list[dict]:
        return [{"role": "user", "content": f"{INSTRUCTION}\n\n<<<\n{self.prompt.text}\n>>>\n\n{request}"}]

    def render(self, request: str) -> str:
        return chat_text(self.tokenizer, self.messages(request), answer_next=False)

    def encode(self, request: str) -> tuple[list[int], None]:
        """The request's ids, and no input hash: a written query answers no input row for a resume to compare."""
        return chat_ids(self.tokenizer, self.messages(request), answer_next=False), None

    def one_line_constraint(self):
        """vLLM structured outputs: one line of min_chars to max_chars characters, then the end. Keeps a small model
        from announcing its message or writing several; a thinking model needs a reasoning parser with it."""
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(regex=f"[^\\n]{{{self.min_chars},{self.max_chars}}}")

    def parse(self, text: str, finish_reason: str | None = None, query: str | None = None) -> Parsed:
        # `query` is the request (stream passes it for a teacher's on-topic check); a written query answers none.
        return parse_query(text, finish_reason, self.expects_reasoning, self.min_chars, self.max_chars)


# ---- targets and requests ---------------------------------------------------------------------------------------


def spread(targets: list, total: int) -> dict:
    """`total` queries over the targets as evenly as possible; the first ones take the remainder."""
    share, remainder = divmod(total, len(targets))
    return {target: share + (position < remainder) for position, target in enumerate(targets)}


@dataclass
class Plan:
    """How many queries each target needs, what is kept so far, and the requests that ask for the rest.
    `target_field` is "topic", "label_target" or None (one target, None: no topic)."""

    target_field: str | None
    quotas: dict
    seeds: list[str] = field(default_factory=list)
    diversity: int = DEFAULT_DIVERSITY
    seed: int = 0
    kept: Counter = field(default_factory=Counter)  # target -> queries kept
    kept_texts: list[str] = field(default_factory=list)
    requests_made: int = 0  # over all runs (kept + rejected rows), so a resumed run draws new examples

    def target_of(self, row: dict):
        return row.get(self.target_field) if self.target_field else None

    def missing(self) -> dict:
        return {target: quota - self.kept[target] for target, quota in self.quotas.items()
                if quota > self.kept[target]}

    def requests(self, limit: int) -> list[dict]:
        """Up to `limit` requests, one per missing query, targets taken in turn."""
        missing = self.missing()
        order = [target for round_ in range(max(missing.values(), default=0)) for target in missing
                 if missing[target] > round_]
        rows = []
        for target in islice(order, limit):
            self.requests_made += 1
            row = {"id": f"request-{self.requests_made}", "text": self.request_text(target)}
            if self.target_field:
                row[self.target_field] = target
            rows.append(row)
        return rows

    def request_text(self, target) -> str:
        parts = []
        if self.target_field == "topic":
            parts.append(f"The message is about: {target}.")
        elif self.target_field == "label_target":
            parts.append(f'Following the instructions, the assistant\'s answer to the message must be "{target}".')
        pool = self.seeds or self.kept_texts
        examples = random.Random(f"{self.seed}:{self.requests_made}").sample(pool, min(self.diversity, len(pool)))
        if examples:
            parts.append("Messages it has received before (write a different one):\n"
                         + "\n".join(f"- {example}" for example in examples))
        parts.append(CLOSING)
        return "\n\n".join(parts)

    def keep(self, row: dict) -> None:
        self.kept[self.target_of(row)] += 1
        self.kept_texts.append(row["text"])


def query_id(text: str) -> str:
    return "syn-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def query_row(text: str, request: dict, plan: Plan, origin: dict) -> dict:
    """A stage-1 input row. Its group is its topic, so the train/held-out split keeps a topic on one side (name
    topics like the groups of the evaluation data and the same topics are held out); without a topic, its id."""
    target = plan.target_of(request)
    row = {"id": query_id(text), "text": text}
    if plan.target_field:
        row[plan.target_field] = target
    row["group"] = target if plan.target_field == "topic" else row["id"]
    return {**row, "request": request["id"], "origin": origin}


# ---- the loop ---------------------------------------------------------------------------------------------------


def synthesise(engine, writer: QueryWriter, plan: Plan, index: NearDuplicateIndex, params, append, *, origin: dict,
               max_attempts: int, max_in_flight: int, stop=lambda: False, stats=None,
               on_result=lambda counts: None) -> Counter:
    """Ask until every target has its quota or `max_attempts` requests were made. Each outcome is written the
    moment it is known through `append` (distill.run_files.RunFiles.appender: a kept query as a {"row"}, anything
    else as a {"reject"} with its reason). Returns the outcomes of this run by reason ("kept" for the queries kept)."""
    from distill.teacher import stream

    counts = Counter()
    attempts_left = max_attempts
    while attempts_left > 0 and plan.missing() and not stop():
        # One round asks once for every missing query; rejected and duplicate ones leave gaps the next round fills.
        requests = plan.requests(attempts_left)
        attempts_left -= len(requests)
        for outcome in stream(engine, writer, requests, params, max_in_flight=max_in_flight, stop=stop, stats=stats):
            query = outcome.answer  # the request's answer is the query it wrote
            reason = outcome.reason if query is None else index.add(query)
            target = {plan.target_field: plan.target_of(outcome.row)} if plan.target_field else {}
            if reason is None:
                row = query_row(query, outcome.row, plan, origin)
                plan.keep(row)
                append([{"row": row}])
                reason = "kept"
            else:
                raw = [sample.text for sample in outcome.samples + outcome.failures]
                append([{"reject": {"id": outcome.row["id"], "reason": reason, "text": query, **target, "raw": raw}}])
            counts[reason] += 1
            on_result(counts)
    return counts


# ---- stage 1's check of a label task's synthetic queries ---------------------------------------------------------


def label_target_agreement(rows: list[dict]) -> dict | None:
    """For stage-1 rows of queries written for a label (their `label_target` column): per target label, how many
    the teacher then gave that label, and the share in all. None when no row has a target. A query the teacher
    labels otherwise is kept (the teacher's label is the training target); the share says how well the writer hit
    its targets, and so how far the per-label quotas hold."""
    targeted = [row for row in rows if row.get("label_target") is not None]
    if not targeted:
        return None
    by_label = {}
    for row in targeted:
        entry = by_label.setdefault(row["label_target"], {"queries": 0, "labelled_as_target": 0})
        entry["queries"] += 1
        entry["labelled_as_target"] += row["teacher"]["label"] == row["label_target"]
    hits = sum(entry["labelled_as_target"] for entry in by_label.values())
    return {"queries": len(targeted), "labelled_as_target": hits, "share": round(hits / len(targeted), 4),
            "by_label": dict(sorted(by_label.items()))}
