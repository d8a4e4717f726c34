"""Owns a model's output -> its answer or the reason it has none; must not judge an answer's quality (checks, rules).

A model's output -> its answer (a label task's label, or a generative task's whole final answer), or the reason it
has none.
Strict by design: no answer is ever read out of the reasoning, and an answer that breaks the contract is a counted
failure, never a guess.
"""

from dataclasses import dataclass

from distill.prompts import TaskPrompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Parsed:
    answer: str | None  # a label task's label or a generative task's whole final answer; None: the contract broke
    reason: str  # "ok" or why it failed
    reasoning_chars: int = 0
    broken_rules: tuple[str, ...] = ()  # ids of the prompt's verifiable rules the answer breaks (distill/rules.py)


def split_reasoning(output: str, expects_reasoning: bool) -> tuple[str | None, int]:
    """(final text, reasoning length). The final text is None when the reasoning never closes.

    Qwen3 Thinking-2507's template opens <think> itself, so its outputs hold only the closing tag.
    """
    if THINK_CLOSE in output:
        reasoning, final = output.rsplit(THINK_CLOSE, 1)
        return final, len(reasoning.replace(THINK_OPEN, ""))
    if expects_reasoning or THINK_OPEN in output:
        return None, len(output)
    return output, 0


def parse_teacher(output: str, prompt: TaskPrompt, expects_reasoning: bool = False,
                  constrained: bool = False) -> Parsed:
    """Free-form: the last non-empty line after the reasoning must be the prompt's answer_format.
    Constrained (vLLM structured outputs over the label set): the text after the reasoning is the label itself."""
    final, reasoning_chars = split_reasoning(output, expects_reasoning)
    if final is None:
        return Parsed(None, "unclosed_reasoning", reasoning_chars)
    lines = [line for line in final.splitlines() if line.strip()]
    if not lines:
        return Parsed(None, "empty_answer", reasoning_chars)
    if constrained:
        candidate = final.strip()
    else:
        match = prompt.answer_regex.match(lines[-1])
        if not match:
            return Parsed(None, "no_answer_line", reasoning_chars)
        candidate = match.group("label")
    label = candidate.lower()
    if label not in prompt.labels:
        return Parsed(None, "label_not_in_set", reasoning_chars)
    return Parsed(label, "ok", reasoning_chars)


def parse_generative(output: str, finish_reason: str | None, expects_reasoning: bool = False) -> Parsed:
    """A generative task's answer is the whole text after the reasoning, stripped. It must be complete: an output
    the engine cut at max_tokens is a truncated answer, not a short one, so it is refused even when text is there.
    The cut is named before an open reasoning block, because the fix for both is then the same (more max_tokens);
    unclosed_reasoning is left for a model that stopped by itself while still reasoning."""
    final, reasoning_chars = split_reasoning(output, expects_reasoning)
    if finish_reason == "length":
        return Parsed(None, "cut_at_max_tokens", reasoning_chars)
    if final is None:
        return Parsed(None, "unclosed_reasoning", reasoning_chars)
    if not final.strip():
        return Parsed(None, "empty_answer", reasoning_chars)
    return Parsed(final.strip(), "ok", reasoning_chars)


def parse_student(output: str, labels: tuple[str, ...]) -> str | None:
    """The student was trained to answer with the bare label: anything else is unparsed."""
    label = output.strip().lower()
    return label if label in labels else None
