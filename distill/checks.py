"""Owns strict scoring (the prompt's check, echo, loop, off topic); must not know a rule (rules.py) or a model.

How a free-form (generative) answer is judged: the `check` a prompt file declares instead of a label set.

A check is a mapping with exactly one kind:

    check: {answer_language: fr}     # lingua detects the answer's language; it must be this ISO 639-1 code
    check: {regex: "^Réponse :"}      # re.search of this pattern in the answer must succeed

`validate` is called when the prompt file is loaded, so a bad check stops a run before any model starts;
`passes` judges one answer, `passes_each` many at once (lingua detects a batch in parallel).
"""

import functools
import re
from collections import Counter

from distill import rules
from distill.rules import WORD, detected_languages  # noqa: F401 (detected_languages: the check's languages)

KINDS = ("answer_language", "regex")
# The rule verifier each kind of check is (distill/rules.py): a check is the prompt's first rule, id "check".
AS_VERIFIER = {"answer_language": "language", "regex": "regex"}


def validate(check) -> dict:
    """The check itself if it is well formed, else a ValueError saying what to write instead."""
    rules.one_kind(check, KINDS, "check", "'check: {answer_language: fr}'")
    try:
        rules.check_verify(as_verifier(check))
    except ValueError as error:
        raise ValueError(str(error).replace("language ", "answer_language ", 1)) from None
    return check


def as_verifier(check: dict) -> dict:
    (kind, value), = check.items()
    return {AS_VERIFIER[kind]: value}


def as_rule(check: dict, line: int | None = None) -> rules.Rule:
    """The check as the prompt's rule "check", which stage 1 and stage 3 apply with the other rules."""
    return rules.Rule("check", describe(check), as_verifier(check), line=line)


def describe(check: dict | None) -> str:
    if check is None:
        return "no format check"
    (kind, value), = check.items()
    if kind == "answer_language":
        return f"answer in language '{value}' (lingua)"
    return f"answer matches regex /{value}/"


def passes(check: dict, answer: str) -> bool:
    return passes_each(check, [answer])[0]


def passes_each(check: dict | None, answers: list[str]) -> list[bool]:
    """Whether each answer passes the check (every answer passes a task without one: its rules judge it)."""
    return rules.passes_each(as_verifier(check), answers) if check else [True] * len(answers)


# ---- strict scoring: a passing check is not yet an answer ------------------------------------------------------
#
# An answer in the right language (or format) can still be no answer at all. The 135M teacher under the French
# prompt mostly restated the prompt's rules ("Je réponds toujours en français, en une phrase courte."), looped
# ("la bonne réponse est la bonne réponse ...") or answered another question ("La capital de France est Paris."
# to "What is the capital of Australia?"), and every one of those passed `answer_language: fr`. So a generative
# answer passes strictly only if the prompt's check passes and none of these reasons applies; stage 1 rejects a
# teacher answer for the same reasons (distill/teacher.py), so students never learn them.
#
# The thresholds were chosen on our data (2026-11-30; docs/prompt-files.md): real short answers restate at most a third
# of their word trigrams from the prompt (their shared trigrams are phrases like "is the capital of"), while rule
# restatements reuse 60-100%. A loop writes one 3-word phrase three times or more, repeats a whole clause (8 words or
# more), or writes a span of 3 words or more twice in a row; a comparison's parallel halves ("X is a type of paint made
# from ..., while Y is a type of paint made from ...") repeat up to 7 words and are answers; a format prefix written
# again after itself ("In short: in short: ...") is a loop too. An on-topic answer names at least one content word of
# its question (an acronym counts as named by the words it abbreviates) and adds one of its own, or is a short, direct
# yes/no to a yes/no question or a number to a quantity question ("Should I water cactus plants every day?" -> "In
# short: no.").


NON_ANSWER_REASONS = ("echo", "loop", "off_topic")
ON_TOPIC_KINDS = ("question_words", "none")
ECHO_NGRAM = 3
ECHO_MIN_SHARE = 0.5  # share of an answer's word trigrams found in the prompt from which it is an echo
LOOP_PHRASE, LOOP_PHRASE_COUNT = 3, 3  # a 3-word phrase written 3 times or more is a loop
LOOP_CLAUSE = 8  # ... and so is a span of 8 words written twice
LOOP_TANDEM = 3, 20  # ... and a span of 3 to 20 words written again right after itself
# Function words and the words of a question's form, English and French (the example tasks' languages): they say
# nothing about what a question is about.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing done down during each few for from further get gets got had has have having he
her here hers him his how i if in into is it its itself just let like make makes many me more most much my nor
now of off on once one only or other our out over own please same she should so some such tell than that the
their them then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours there's what's it's i'm
au aux avec ce ces cet cette comment dans de des du elle en est et il ils je la le les leur lui ma mais me mes moi
mon ne nous on ou où par pas plus pour pourquoi quand que quel quelle quelles quels qui quoi sa se ses son sont sur
ta te tes toi ton tu un une vos votre vous est-ce qu'est-ce c'est
""".split())


def words(text: str) -> list[str]:
    return [word.lower().replace("’", "'") for word in WORD.findall(text)]


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def stem(word: str) -> str:
    """A crude stem, enough to match "planets" to "planet" and "painted" to "painting": no plural s, 5 letters."""
    if len(word) > 3 and word.endswith("s"):
        word = word[:-1]
    return word[:5]


def content_stems(text: str) -> set[str]:
    """Stems of the words that carry content, and code spans whole (`==` is content no word matches). "no" and
    "not" answer many a question (do sharks sleep? sharks do not sleep): content words despite being short."""
    spans = {f"`{span.strip().lower()}`" for span in re.findall(r"`([^`\n]+)`", text)}
    return spans | {stem(word) for word in words(text)
                    if word not in STOP_WORDS and (len(word) > 2 or word.isdigit() or word == "no")}


def acronyms(text: str) -> set[str]:
    return {word.lower() for word in WORD.findall(text) if 2 <= len(word) <= 6 and word.isupper() and word.isalpha()}


def initialisms(text: str, length: int) -> set[str]:
    """The initials of every run of `length` consecutive words ("Hypertext Markup Language" -> "hml")."""
    initials = "".join(word[0] for word in words(text))
    return {initials[i:i + length] for i in range(len(initials) - length + 1)}


def echo_share(answer: str, prompt_ngrams: frozenset) -> float:
    """The share of the answer's word trigrams that occur in the prompt (0 for an answer under three words)."""
    grams = set(ngrams(words(answer), ECHO_NGRAM))
    return len(grams & prompt_ngrams) / len(grams) if grams else 0.0


def loops(answer: str) -> bool:
    """The answer writes a 3-word phrase three times or more, a span of 8 words twice, or a span of 3 words or more
    twice in a row ("ce qui est le monde de Mozart, ce qui est le monde de Mozart")."""
    tokens = words(answer)
    phrases = Counter(ngrams(tokens, LOOP_PHRASE))
    clauses = Counter(ngrams(tokens, LOOP_CLAUSE))
    shortest, longest = LOOP_TANDEM
    tandem = any(tokens[i:i + n] == tokens[i + n:i + 2 * n]
                 for n in range(shortest, min(longest, len(tokens) // 2) + 1) for i in range(len(tokens) - 2 * n + 1))
    return (tandem or any(count >= LOOP_PHRASE_COUNT for count in phrases.values())
            or any(count > 1 for count in clauses.values()))


def spells(text: str, acronym: str) -> bool:
    """Some consecutive words of `text` have the acronym's initials, or all but one of them (a mid-word letter:
    "HyperText Markup Language" is HTML)."""
    if acronym in initialisms(text, len(acronym)):
        return True
    shorter = {acronym[:i] + acronym[i + 1:] for i in range(1, len(acronym) - 1)} if len(acronym) > 2 else set()
    return bool(shorter & initialisms(text, len(acronym) - 1))


def on_topic(question: str, answer: str) -> bool:
    """The answer names at least one content word of its question (stemmed), and says something the question did
    not: a restated question is no answer. A question with no content word (e.g. "Why?") leaves only the second."""
    asked, said = content_stems(question), content_stems(answer)
    spelled_out = {acronym for acronym in acronyms(question) if spells(answer, acronym)}
    return bool(said - asked) and (not asked or bool(asked & said) or bool(spelled_out))


@functools.cache
def _prompt_ngrams(sources: tuple[str, ...]) -> frozenset:
    return frozenset(gram for source in sources for gram in ngrams(words(source), ECHO_NGRAM))


def format_prefix(check: dict | None, answer: str) -> str:
    """What the check's regex matched at the answer's start (e.g. "In short: "), or "": a format, not content."""
    if check and "regex" in check:
        match = rules.pattern(check["regex"]).match(answer)
        if match:
            return match.group()
    return ""


def content_of(check: dict | None, answer: str) -> str:
    """The answer without what the check's regex demands at its start (e.g. "In short: "): a format is not content,
    and "In short: the" must not count as restating the prompt's examples."""
    return answer[len(format_prefix(check, answer)):]


def repeats_prefix(prefix: str, content: str) -> bool:
    """The content opens with the format prefix again ("In short: in short: espresso is ..."): a stutter, a loop
    that the phrase counts miss when the prefix is two words."""
    prefix = prefix.strip().lower()
    return bool(prefix) and content.lstrip().lower().startswith(prefix)


# A yes/no question opens with an auxiliary verb; a quantity question asks how many, how long, what year...
YES_NO_OPENERS = frozenset("""
is are am was were do does did can could should would will shall may might must has have had isn't aren't wasn't
weren't don't doesn't didn't can't couldn't shouldn't wouldn't won't hasn't haven't est-ce
""".split())
QUANTITY_QUESTION = re.compile(r"\b(how (many|much|long|old|far|fast|big|tall|high|heavy|deep|often|wide|hot|cold)"
                               r"|what (year|percentage|temperature|time)|when|combien|quand)\b", re.IGNORECASE)
YES_NO = frozenset({"yes", "no", "oui", "non"})
NUMBER_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen
eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion trillion
dozen half
""".split())
SHORT_ANSWER_WORDS = 6  # a direct answer: "no", "yes, every day", "eight", "about 100 years"


def direct_answer(question: str, content: str) -> bool:
    """A short answer that is a direct yes/no to a yes/no question, or a number to a quantity question
    ("Should I water cactus plants every day?" -> "no."): an answer, though it names none of the question's words."""
    said, asked = words(content), words(question)
    if not said or len(said) > SHORT_ANSWER_WORDS or not asked:
        return False
    if asked[0] in YES_NO_OPENERS and said[0] in YES_NO:
        return True
    return bool(QUANTITY_QUESTION.search(question)) and any(word.isdigit() or word in NUMBER_WORDS for word in said)


def non_answer_reason(prompt, question: str, answer: str) -> str | None:
    """'echo', 'loop' or 'off_topic' when the answer is not an answer to `question` under `prompt` (a generative
    TaskPrompt), else None. Checked in this order: an echo of the prompt is usually also off topic, and says more."""
    prefix = format_prefix(prompt.check, answer)
    content = answer[len(prefix):]
    if echo_share(content, _prompt_ngrams(tuple(prompt.echo_sources()))) >= ECHO_MIN_SHARE:
        return "echo"
    if loops(content) or repeats_prefix(prefix, content):
        return "loop"
    if (prompt.on_topic == "question_words" and not on_topic(question, content)
            and not direct_answer(question, content)):
        return "off_topic"
    return None
