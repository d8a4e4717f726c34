"""Owns a prompt's rules and their deterministic verifiers; must not call a model (judged rules are judge.py's).

A prompt file's rules, and the deterministic verifiers that check an answer against each of them.

A prompt file's front matter may declare `rules:` (docs/prompt-files.md), each with an id, a one-line text and either
`verify:` (one of VERIFIERS below, with its argument) or `judge:` (a yes/no rubric for evaluate.py --judge_model):

    rules:
      - id: one_sentence
        text: "Answers in one sentence"
        verify: {max_sentences: 1}
      - id: warm_tone
        text: "Sounds warm and polite"
        judge: "Is the reply warm and polite (not curt or rude)? Answer yes or no."

`parse_rules` checks every rule when the prompt file is loaded (a bad one is a RuleError naming its file:line), so a
run stops before any model starts; `verdicts` applies the verifiable rules to answers. Stage 1 rejects a teacher
answer that breaks one (distill/teacher.py); stage 3 reports each rule's pass rate (distill/metrics.py).

A verifier sees the answer only: it cannot tell whether what the answer says is true (a fact, a price, a name).
`ifeval` runs IFEval's own verifier for an instruction id through the if-verifiable package; an id whose verifier needs
data the machine does not have (nltk's punkt tokenizer, which nothing here downloads) is refused at load time.
"""

import functools
import json
import re
from dataclasses import dataclass

RULE_ID = re.compile(r"^[a-z0-9_]+$")
RULE_KEYS = {"id", "text", "verify", "judge", "baseline_follows"}
VERIFIERS = ("regex", "starts_with", "ends_with", "max_words", "min_words", "max_sentences", "forbidden_words",
             "required_words", "forbidden_chars", "lowercase", "language", "json", "bullets", "ifeval")
WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
# A sentence ends at . ! or ? (a run of them) before a space or the end; a few abbreviations do not end one.
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "approx.", "no.")
BULLET = re.compile(r"^\s*[-*] ", re.MULTILINE)
# Code is not prose: an answer that explains code in French keeps English identifiers and keywords, which would
# pull lingua towards English. Fenced blocks go first so their backticks are not read as inline code.
CODE_SPANS = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)


class RuleError(ValueError):
    """A rule that cannot be checked as written: the message names the prompt file's line and what to write."""


@dataclass(frozen=True)
class Rule:
    id: str
    text: str  # what the rule asks, one line, for reports
    verify: dict | None = None  # {kind: argument}, one of VERIFIERS; None for a judged rule
    judge: str | None = None  # a yes/no rubric for evaluate.py --judge_model
    line: int | None = None  # where the prompt file declares it
    baseline_follows: bool = False  # the base model follows it without the prompt (reports mark it, goals skip it)

    @property
    def verifiable(self) -> bool:
        return self.verify is not None

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "verify": self.verify, "judge": self.judge,
                "baseline_follows": self.baseline_follows}


# ---- loading: every rule checked before any model starts ---------------------------------------------------------


def parse_rules(items, lines: list[int], path) -> tuple[Rule, ...]:
    """The rules of a prompt file's `rules:` list; `lines` are the file's line of each item (for errors)."""
    if not isinstance(items, list):
        raise RuleError(f"{path}:{lines[0] if lines else 1}: rules must be a list of {{id, text, verify or judge}}, "
                        f"e.g. '- {{id: short, text: \"At most 30 words\", verify: {{max_words: 30}}}}'")
    rules, seen = [], set()
    for item, line in zip(items, lines):
        rule = parse_rule(item, f"{path}:{line}", line)
        if rule.id in seen:
            raise RuleError(f"{path}:{line}: rule id {rule.id!r} is declared twice; each rule needs its own id")
        seen.add(rule.id)
        rules.append(rule)
    return tuple(rules)


def parse_rule(item, where: str, line: int | None = None) -> Rule:
    if not isinstance(item, dict):
        raise RuleError(f"{where}: a rule is a mapping {{id, text, verify or judge}}, not {item!r}")
    unknown = set(item) - RULE_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown rule key(s) {', '.join(sorted(unknown))}; a rule has "
                        f"{', '.join(sorted(RULE_KEYS))}")
    rule_id = item.get("id")
    if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
        raise RuleError(f"{where}: rule id must be lowercase letters, digits and underscores, e.g. one_sentence, "
                        f"not {rule_id!r}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip() or "\n" in text.strip():
        raise RuleError(f"{where}: rule {rule_id}: text must be one non-empty line saying what the rule asks")
    if ("verify" in item) == ("judge" in item):
        raise RuleError(f"{where}: rule {rule_id}: give exactly one of verify (a built-in verifier) or judge (a "
                        f"yes/no rubric for --judge_model)")
    follows = item.get("baseline_follows", False)
    if not isinstance(follows, bool):
        raise RuleError(f"{where}: rule {rule_id}: baseline_follows must be true or false")
    judge = item.get("judge")
    if "judge" in item and not (isinstance(judge, str) and judge.strip()):
        raise RuleError(f"{where}: rule {rule_id}: judge must be a non-empty yes/no question for the judge model")
    try:
        verify = check_verify(item["verify"]) if "verify" in item else None
    except ValueError as error:
        raise RuleError(f"{where}: rule {rule_id}: {error}") from None
    return Rule(rule_id, text.strip(), verify, judge, line, follows)


def one_kind(spec, kinds: tuple[str, ...], key: str, example: str) -> tuple[str, object]:
    """(kind, argument) of a {kind: argument} mapping whose kind is one of `kinds` (a rule's `verify`, a check), else
    a ValueError naming `key` and showing `example`."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{key} must be a mapping with exactly one of {', '.join(kinds)}, e.g. {example}, "
                         f"not {spec!r}")
    (kind, value), = spec.items()
    if kind not in kinds:
        raise ValueError(f"unknown {key} kind {kind!r}; the kinds are {', '.join(kinds)}")
    return kind, value


def check_verify(spec) -> dict:
    """The verifier `spec` ({kind: argument}) if well formed, else a ValueError saying what to write instead."""
    kind, value = one_kind(spec, VERIFIERS, "verify", "verify: {max_words: 30}")
    if kind == "regex":
        pattern(value)
    elif kind in ("starts_with", "ends_with", "forbidden_chars"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{kind} takes a non-empty quoted string, not {value!r}")
    elif kind in ("max_words", "min_words", "max_sentences"):
        if not _count(value):
            raise ValueError(f"{kind} takes a whole number >= {0 if kind == 'min_words' else 1}, not {value!r}")
        if kind != "min_words" and value < 1:
            raise ValueError(f"{kind} takes a whole number >= 1, not {value!r}")
    elif kind in ("forbidden_words", "required_words"):
        if not (isinstance(value, list) and value and all(isinstance(w, str) and w.strip() for w in value)):
            raise ValueError(f"{kind} takes a list of words, e.g. [sorry, unfortunately], not {value!r}")
    elif kind in ("lowercase", "json"):
        if value is not True:
            raise ValueError(f"{kind} takes true (verify: {{{kind}: true}}), not {value!r}")
    elif kind == "language":
        _language(value)
    elif kind == "bullets":
        _bullet_range(value)
    else:
        _ifeval_checker(value)
    return spec


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bullet_range(value) -> tuple[int, float]:
    if not (isinstance(value, dict) and value and set(value) <= {"min", "max"} and all(map(_count, value.values()))):
        raise ValueError(f"bullets takes {{min: N, max: M}} (either may be left out) of whole numbers, not {value!r}")
    low, high = value.get("min", 0), value.get("max", float("inf"))
    if low > high:
        raise ValueError(f"bullets: min {low} is above max {high}")
    return low, high


def _language(code) -> str:
    from lingua import IsoCode639_1

    try:
        IsoCode639_1.from_str(str(code))
    except ValueError:
        raise ValueError(f"language {code!r} is not an ISO 639-1 code lingua knows (e.g. fr, en, de)") from None
    return str(code).lower()


def pattern(pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a quoted string, not {pattern!r}")
    return _compiled(pattern)


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    # Compiled once per pattern, however many answers are judged.
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"regex {pattern!r} does not compile: {error}") from None


# ---- IFEval's verifiers, through if-verifiable ---------------------------------------------------------------


def _ifeval_checker(value):
    """IFEval's checker for {id, args}, built once: every argument its instruction takes must be given, since IFEval
    draws a missing one at random (a verifier must be deterministic), and it must run here without downloading."""
    if not (isinstance(value, dict) and set(value) <= {"id", "args"} and isinstance(value.get("id"), str)
            and isinstance(value.get("args", {}), dict)):
        raise ValueError(f"ifeval takes {{id: \"<IFEval instruction id>\", args: {{...}}}}, e.g. "
                         f"{{id: \"punctuation:no_comma\"}}, not {value!r}")
    return _built_checker(value["id"], json.dumps(value.get("args", {}), sort_keys=True))


@functools.cache
def _built_checker(instruction_id: str, args_json: str):
    import langdetect
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect samples at random unless seeded: a verifier must not
    if instruction_id not in INSTRUCTION_DICT:
        raise ValueError(f"ifeval id {instruction_id!r} is not an IFEval instruction; the ids are "
                         f"{', '.join(sorted(INSTRUCTION_DICT))}")
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    args, wanted = json.loads(args_json), checker.get_instruction_args_keys()
    if "prompt_to_repeat" in wanted:
        raise ValueError(f"ifeval id {instruction_id!r} checks the answer against the user's prompt, which a "
                         f"prompt file's rule does not know; it cannot be a rule")
    if set(args) != set(wanted):
        raise ValueError(f"ifeval id {instruction_id!r} takes args {{{', '.join(wanted)}}} (every one: IFEval "
                         f"draws a missing one at random), not {{{', '.join(args)}}}")
    try:
        checker.build_description(**args)
        checker.check_following("A probe answer. It has two sentences.")
    except LookupError:
        raise ValueError(f"ifeval id {instruction_id!r} needs nltk data that is not installed (its punkt tokenizer); "
                         f"use a built-in verifier instead (max_sentences, max_words)") from None
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"ifeval id {instruction_id!r}: bad args {args}: {error}") from None
    return checker


# ---- verifying answers -------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return WORD.findall(text)


def count_sentences(text: str) -> int:
    """Sentences end at . ! or ? before a space or the end (a decimal point does not end one, nor "e.g."); text
    after the last end is one more sentence."""
    text = text.strip()
    ends = [match for match in SENTENCE_END.finditer(text)
            if not text[:match.end()].lower().endswith(ABBREVIATIONS)]
    tail = text[ends[-1].end():] if ends else text
    return len(ends) + bool(WORD.search(tail))


def _whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


def passes_each(verify: dict, answers: list[str]) -> list[bool]:
    """Whether each answer passes the verifier `verify` (a checked spec)."""
    (kind, value), = verify.items()
    if kind == "language":
        return [code == str(value).lower() for code in detected_languages(answers)]
    return [_passes(kind, value, answer) for answer in answers]


def _passes(kind: str, value, answer: str) -> bool:
    if kind == "regex":
        return pattern(value).search(answer) is not None
    if kind == "starts_with":
        return answer.lstrip().startswith(value)
    if kind == "ends_with":
        return answer.rstrip().endswith(value)
    if kind == "max_words":
        return len(words(answer)) <= value
    if kind == "min_words":
        return len(words(answer)) >= value
    if kind == "max_sentences":
        return count_sentences(answer) <= value
    if kind == "forbidden_words":
        return not any(_whole_word(word).search(answer) for word in value)
    if kind == "required_words":
        return all(_whole_word(word).search(answer) for word in value)
    if kind == "forbidden_chars":
        return not any(char in answer for char in value)
    if kind == "lowercase":
        return not any(char.isupper() for char in answer)
    if kind == "json":
        try:
            json.loads(answer)
        except ValueError:
            return False
        return True
    if kind == "bullets":
        low, high = _bullet_range(value)
        return low <= len(BULLET.findall(answer)) <= high
    # IFEval's strict reading: the answer as written, and an empty one fails (if-verifiable's evaluate_instructions)
    return bool(answer.strip()) and bool(_ifeval_checker(value).check_following(answer))


def verdicts(rules, answers: list[str]) -> list[dict[str, bool]]:
    """Per answer, {rule id: passed} for every verifiable rule, in the rules' order."""
    columns = {rule.id: passes_each(rule.verify, answers) for rule in rules if rule.verifiable}
    return [{rule_id: column[i] for rule_id, column in columns.items()} for i in range(len(answers))]


def broken(rules, answer: str) -> list[str]:
    """The ids of the verifiable rules `answer` breaks, in the rules' order."""
    return [rule_id for rule_id, passed in verdicts(rules, [answer])[0].items() if not passed]


def detected_languages(answers: list[str]) -> list[str | None]:
    """ISO 639-1 code lingua detects for each answer's prose (code spans removed); None for nothing detectable."""
    prose = [CODE_SPANS.sub(" ", answer).strip() for answer in answers]
    languages = _detector().detect_languages_in_parallel_of(prose)
    # lingua answers an empty string with None already; the explicit test keeps that a documented failure.
    return [language.iso_code_639_1.name.lower() if language and text else None
            for language, text in zip(languages, prose)]


@functools.cache
def _detector():
    # Built once, on first use: loading every language model takes seconds, and most runs never judge languages.
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


def describe(verify: dict) -> str:
    (kind, value), = verify.items()
    return f"{kind}: {json.dumps(value, ensure_ascii=False)}"
