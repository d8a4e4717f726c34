"""How a free-form (generative) answer is judged: the `check` a prompt file declares instead of a label set.

A check is a mapping with exactly one kind:

    check: {answer_language: fr}     # lingua detects the answer's language; it must be this ISO 639-1 code
    check: {regex: "^Réponse :"}      # re.search of this pattern in the answer must succeed

`validate` is called when the prompt file is loaded, so a bad check stops a run before any model starts;
`passes` judges one answer, `passes_each` many at once (lingua detects a batch in parallel).
"""

import functools
import re

KINDS = ("answer_language", "regex")

# Code is not prose: an answer that explains code in French keeps English identifiers and keywords, which would
# pull lingua towards English. Fenced blocks go first so their backticks are not read as inline code.
CODE_SPANS = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)


def validate(check) -> dict:
    """The check itself if it is well formed, else a ValueError saying what to write instead."""
    if not isinstance(check, dict) or len(check) != 1:
        raise ValueError(f"check must be a mapping with exactly one of {', '.join(KINDS)}, "
                         f"e.g. 'check: {{answer_language: fr}}', not {check!r}")
    (kind, value), = check.items()
    if kind == "answer_language":
        _language(value)
    elif kind == "regex":
        _pattern(value)
    else:
        raise ValueError(f"unknown check kind {kind!r}: the kinds allowed are {', '.join(KINDS)}")
    return check


def describe(check: dict) -> str:
    (kind, value), = check.items()
    if kind == "answer_language":
        return f"answer in language '{value}' (lingua)"
    return f"answer matches regex /{value}/"


def passes(check: dict, answer: str) -> bool:
    return passes_each(check, [answer])[0]


def passes_each(check: dict, answers: list[str]) -> list[bool]:
    (kind, value), = check.items()
    if kind == "answer_language":
        return [code == str(value).lower() for code in detected_languages(answers)]
    pattern = _pattern(value)
    return [pattern.search(answer) is not None for answer in answers]


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


def _language(code) -> str:
    from lingua import IsoCode639_1

    try:
        IsoCode639_1.from_str(str(code))
    except ValueError:
        raise ValueError(f"answer_language {code!r} is not an ISO 639-1 code lingua knows (e.g. fr, en, de)") from None
    return str(code).lower()


def _pattern(pattern) -> re.Pattern:
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
