"""Owns a prompt file -> its task, rules and student side; must not render a model input (render.py).

A task prompt file -> its text, label set, answer contract and the student's side; it renders nothing (render.py).

A prompt file is Markdown with YAML front matter declaring the task, so another task needs a new file, not code:

    ---
    labels: [ar, de, ..., ot]
    answer_format: "Final Answer: {label}"       # the teacher's last line
    query_template: "Text to classify:\\n<<<\\n{query}\\n>>>"
    ---
    <the long prompt: the system message>

A generative (free-form) task declares instead how a whole answer is judged, and no labels or answer_format
(query_template is optional, "{query}" by default); distill/checks.py lists the kinds of check:

    ---
    check: {answer_language: fr}
    rules:                                        # optional: more rules, each verified or judged (distill/rules.py)
      - {id: short, text: "At most 30 words", verify: {max_words: 30}}
    ---

The check becomes the task's first rule (id "check"); a file may declare rules without a check. A bad rule fails at
load with the file and the rule's line (docs/prompt-files.md).

Either kind may declare `example_turns`, a list of {user, assistant} pairs the teacher sees as real chat turns
between the system prompt and the query (a small model follows a format from such turns, not from the same examples
written into the system prompt); a generative task may declare `judge_rubric` (what evaluate.py --judge_model asks
besides "does it answer?") and `on_topic` (how strict scoring checks that an answer is about its question:
`question_words`, the default, or `none` for a task whose answers need not share the question's words, e.g. a
translation into another language).

A query is a text or a conversation (records.read_queries: role/content turns, an optional system turn first, ending
in the user turn to answer; earlier assistant turns are context). What each side reads of the file, and how it is
rendered with a query, is distill/render.py's. The front matter may declare the student's own side, which stages 2,
2b and 3 use and the run records store (evaluation refuses a prompt file whose student side is not the adapter's):

    student_system_prompt: "Answer in one short sentence."   # a short system prompt the student keeps
    student_template: "Q: {query}\\nA:"                          # the student's last user turn ("{query}" if unset)
"""

import hashlib
import re
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from distill import checks
from distill.input_checks import yaml_error
from distill.records import InputError
from distill.rules import Rule, RuleError, parse_rules

DEFAULT_PROMPT = Path(__file__).resolve().parent.parent / "prompts" / "language_identification.md"
REQUIRED_KEYS = ("labels", "answer_format", "query_template")
GENERATIVE_EXAMPLE = "check: {answer_language: fr}"


@dataclass(frozen=True)
class StudentSide:
    """What the student keeps of a prompt file (front matter `student_system_prompt`, `student_template`); by
    default nothing: the bare query."""

    system_prompt: str | None = None
    template: str = "{query}"

    def to_dict(self) -> dict:
        return {"system_prompt": self.system_prompt, "template": self.template}

    @classmethod
    def from_dict(cls, data: dict | None) -> "StudentSide":
        """The side a run record stored; a record from before student sides existed (None) stored the bare one."""
        return cls(**data) if data else cls()


BARE_STUDENT = StudentSide()


@dataclass(frozen=True)
class TaskPrompt:
    path: str
    text: str
    labels: tuple[str, ...]
    answer_format: str | None
    query_template: str
    check: dict | None = None  # a generative task's judge (distill/checks.py); None for a label task
    stop: tuple[str, ...] = ()  # a generative task's answer ends at the first of these strings (front matter `stop`)
    example_turns: tuple[tuple[str, str], ...] = ()  # (user, assistant) turns the teacher sees before the query
    judge_rubric: str | None = None  # a generative task's rules, as a judge model is asked to apply them
    on_topic: str = "question_words"  # how strict scoring checks an answer is about its question (distill/checks.py)
    student: StudentSide = BARE_STUDENT  # the student's own system prompt and template
    rules: tuple[Rule, ...] = ()  # a generative task's rules, its check first (distill/rules.py)

    @property
    def is_generative(self) -> bool:
        return self.check is not None or bool(self.rules)

    @property
    def verifiable_rules(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.verifiable)

    def stop_sampling(self) -> dict:
        """SamplingParams fields that end an answer where the task says it ends (kept in the answer), so a
        one-sentence task's answer stops after its sentence instead of running into the token cap."""
        return {"stop": list(self.stop), "include_stop_str_in_output": True} if self.stop else {}

    @property
    def answer_regex(self) -> re.Pattern:
        head, tail = (re.escape(part) for part in self.answer_format.split("{label}"))
        head = re.sub(r"(\\ )+", r"\\s*", head)  # tolerate extra or missing spaces around the label
        return re.compile(rf"^\s*{head}\s*(?P<label>\S+?)\s*{tail}\s*$", re.IGNORECASE)

    @cached_property
    def sha256(self) -> str:
        """The prompt file's bytes, hashed once per load (a stage hashes every query's input with it)."""
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    def echo_sources(self) -> list[str]:
        """The prompt's own words, which an answer restates instead of answering (distill/checks.py's echo): the
        system prompt, the query template around {query}, and the example turns."""
        return [self.text, *self.query_template.split("{query}"),
                *(text for turn in self.example_turns for text in turn)]


def load_prompt(path: str | Path = DEFAULT_PROMPT) -> TaskPrompt:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--prompt_file {path}: no such file; the prompts are in prompts/")
    raw = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is not content
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", raw, re.DOTALL)
    if not match:
        raise ValueError(f"{path}: expected YAML front matter between '---' lines at the top")
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:  # PyYAML counts lines from the front matter, which starts on line 2
        raise ValueError(f"{yaml_error(path, error, first_line=2)} in the front matter; fix that line") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}:2: the front matter must be YAML keys (labels:, check:, ...), not a "
                         f"{type(meta).__name__}")
    text = match.group(2).strip()
    generative = "check" in meta or "rules" in meta
    if "labels" in meta and generative:
        raise ValueError(f"{path}: front matter has 'labels' and 'check' or 'rules'; keep 'labels' (with "
                         f"answer_format) for a label task, or 'check' and/or 'rules' for a generative task")
    if generative:
        return _generative_task(path, meta, text, front_matter_lines(match.group(1)))
    if "labels" not in meta:
        raise ValueError(f"{path}: front matter needs 'labels' (a label task, with answer_format and "
                         f"query_template) or 'check' (a generative task, e.g. '{GENERATIVE_EXAMPLE}')")
    return _label_task(path, meta, text)


def front_matter_lines(front_matter: str) -> dict:
    """The file's line of each top-level key ({key: line}) and of each item of `rules` ({"rules": [lines]}), so an
    error names where to look: line 1 of the file is the opening '---'."""
    root = yaml.compose(front_matter)
    lines = {}
    for key, value in (root.value if isinstance(root, yaml.MappingNode) else []):
        lines[key.value] = key.start_mark.line + 2
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            lines["rule_items"] = [item.start_mark.line + 2 for item in value.value]
    return lines


def _example_turns(path: Path, meta: dict) -> tuple[tuple[str, str], ...]:
    turns = meta.get("example_turns", [])
    well_formed = isinstance(turns, list) and all(
        isinstance(turn, dict) and set(turn) == {"user", "assistant"}
        and all(isinstance(value, str) and value.strip() for value in turn.values()) for turn in turns)
    if not well_formed:
        raise ValueError(f"{path}: example_turns must be a list of {{user: ..., assistant: ...}} pairs of non-empty "
                         f"strings, e.g. example_turns: [{{user: \"Why is the sky blue?\", assistant: \"...\"}}]")
    return tuple((turn["user"], turn["assistant"]) for turn in turns)


def _student_side(path: Path, meta: dict) -> StudentSide:
    system_prompt = meta.get("student_system_prompt")
    template = meta.get("student_template", "{query}")
    if system_prompt is not None and not (isinstance(system_prompt, str) and system_prompt.strip()):
        raise ValueError(f"{path}: student_system_prompt must be a non-empty string (or leave it out)")
    try:  # exactly the field {query}: a template without it would hide the query from the student
        template_ok = isinstance(template, str) and {name for _, name, _, _ in string.Formatter().parse(template)
                                                      if name is not None} == {"query"}
    except ValueError:
        template_ok = False
    if not template_ok:
        raise ValueError(f"{path}: student_template must be a string with '{{query}}' and no other braces, e.g. "
                         f"student_template: \"Q: {{query}}\\nA:\"")
    return StudentSide(system_prompt, template)


def _label_task(path: Path, meta: dict, text: str) -> TaskPrompt:
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: front matter lacks {', '.join(missing)}")
    if "{label}" not in meta["answer_format"] or "{query}" not in meta["query_template"]:
        raise ValueError(f"{path}: answer_format needs '{{label}}' and query_template needs '{{query}}'")
    labels = tuple(str(label).lower() for label in meta["labels"])
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"{path}: labels must be a non-empty list without duplicates")
    return TaskPrompt(str(path), text, labels, meta["answer_format"], meta["query_template"],
                      example_turns=_example_turns(path, meta), student=_student_side(path, meta))


def _rules(path: Path, meta: dict, lines: dict, check: dict | None) -> tuple[Rule, ...]:
    """The check (the rule "check") and the declared rules, each checked (a RuleError names its file:line)."""
    declared = parse_rules(meta["rules"], lines.get("rule_items", [lines.get("rules", 1)]), path) \
        if "rules" in meta else ()
    first = (checks.as_rule(check, lines.get("check")),) if check else ()
    for rule in declared:
        if first and rule.id == "check":
            raise RuleError(f"{path}:{rule.line}: rule id 'check' is the front matter's check; name this rule "
                                  f"otherwise")
    if not first + declared:
        raise ValueError(f"{path}:{lines.get('rules', 1)}: rules is empty; declare at least one rule or a check")
    return first + declared


def _generative_task(path: Path, meta: dict, text: str, lines: dict) -> TaskPrompt:
    if "answer_format" in meta:
        raise ValueError(f"{path}: answer_format belongs to label tasks; remove it, a generative task's whole "
                         f"answer is judged by its check")
    query_template = meta.get("query_template", "{query}")
    if "{query}" not in query_template:
        raise ValueError(f"{path}: query_template needs '{{query}}' (or leave it out: '{{query}}' is the default)")
    try:
        check = checks.validate(meta["check"]) if "check" in meta else None
    except ValueError as error:
        raise ValueError(f"{path}:{lines['check']}: {error}") from None
    task_rules = _rules(path, meta, lines, check)
    stop = meta.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(item, str) and item for item in stop):
        raise ValueError(f"{path}: stop must be a list of non-empty strings, e.g. stop: [\". \", \"\\n\"]")
    on_topic = meta.get("on_topic", "question_words")
    if on_topic not in checks.ON_TOPIC_KINDS:
        raise ValueError(f"{path}: on_topic must be one of {', '.join(checks.ON_TOPIC_KINDS)}, not {on_topic!r}")
    rubric = meta.get("judge_rubric")
    if rubric is not None and not (isinstance(rubric, str) and rubric.strip()):
        raise ValueError(f"{path}: judge_rubric must be a non-empty string")
    return TaskPrompt(str(path), text, (), None, query_template, check, tuple(stop), _example_turns(path, meta),
                      rubric, on_topic, _student_side(path, meta), task_rules)
