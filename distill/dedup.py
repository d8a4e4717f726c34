"""Owns deduplicating written queries (exact, then near duplicates); must not call a model or write files.

Deduplicating written queries: exact duplicates after normalisation, then near duplicates by word-shingle
Jaccard similarity against every query kept so far. Each drop has a reason, so a run can count them.

    index = NearDuplicateIndex(threshold=0.7)
    index.add("What is the capital of Japan?")          # -> None: kept
    index.add("what is the capital of japan")           # -> "duplicate"
    index.add("What is the capital city of Japan?")    # -> "near_duplicate"

datasketch's MinHash would make the near-duplicate search sub-linear, but it is not in our environment and is not
needed at this size: an inverted index from shingle to kept queries makes each check touch only queries that share
a shingle, which is fast for tens of thousands of short queries.
"""

import unicodedata
from collections import defaultdict

# Measured on example-data/general_questions.jsonl (400 distinct human questions, issue 12), shingles = words and
# word pairs: the closest two are 0.67 apart ("How do I start drawing / running as a beginner?"), so 0.7 drops none
# of them, while "What is the capital (city) of Japan?" (0.71) is dropped. Paraphrases that swap a word of a short
# question ("How do / can I make my tea less bitter?", 0.67) survive: near duplicates, not meaning, are caught.
NEAR_DUPLICATE_THRESHOLD = 0.7
SHINGLE_WORDS = 2


def normalise(text: str) -> str:
    """Casefolded, compatibility-normalised (full-width forms, ligatures), punctuation and symbols deleted (Unicode
    categories P and S, so « » ¿ count too; deleted, not spaced, so "What's" and "Whats" agree), whitespace
    collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(char for char in text if unicodedata.category(char)[0] not in "PS").split())


def shingles(normalised: str, size: int = SHINGLE_WORDS) -> frozenset:
    """The words and the runs of `size` consecutive words. The words are included because short queries have few
    pairs: one swapped word in a five-word query changes two of its four pairs but only one of its five words."""
    words = normalised.split()
    runs = {" ".join(words[start:start + size]) for start in range(len(words) - size + 1)}
    return frozenset(runs | set(words))


def jaccard(first: frozenset, second: frozenset) -> float:
    return len(first & second) / len(first | second) if first or second else 1.0


class NearDuplicateIndex:
    """What has been kept (and any reference texts, such as the seed examples a request showed) and the check a new
    text must pass. `add` returns None when the text is new (and keeps it), else the reason it is dropped."""

    def __init__(self, threshold: float = NEAR_DUPLICATE_THRESHOLD, shingle_words: int = SHINGLE_WORDS):
        if not 0 < threshold <= 1:
            raise ValueError(f"the near-duplicate threshold must be in (0, 1], not {threshold}")
        self.threshold, self.shingle_words = threshold, shingle_words
        self.exact: dict[str, str] = {}  # normalised text -> its origin ("kept" or "seed")
        self.kept_shingles: list[tuple[frozenset, str]] = []
        self.by_shingle: dict[str, list[int]] = defaultdict(list)

    def __len__(self) -> int:
        return sum(origin == "kept" for origin in self.exact.values())

    def check(self, text: str) -> str | None:
        """Why `text` would be dropped, or None; changes nothing."""
        normalised = normalise(text)
        if not normalised:
            return "empty_after_normalising"
        if normalised in self.exact:
            return "copies_seed_example" if self.exact[normalised] == "seed" else "duplicate"
        origin = self._nearest(shingles(normalised, self.shingle_words))
        if origin is None:
            return None
        return "near_seed_example" if origin == "seed" else "near_duplicate"

    def add(self, text: str, origin: str = "kept") -> str | None:
        reason = self.check(text)
        if reason is None or origin == "seed":  # a seed example is a reference, whatever it resembles
            self._insert(normalise(text), origin)
        return reason

    def _insert(self, normalised: str, origin: str) -> None:
        if not normalised:
            return
        self.exact.setdefault(normalised, origin)
        text_shingles = shingles(normalised, self.shingle_words)
        for shingle in text_shingles:
            self.by_shingle[shingle].append(len(self.kept_shingles))
        self.kept_shingles.append((text_shingles, origin))

    def _nearest(self, text_shingles: frozenset) -> str | None:
        """The origin of the first indexed text at least `threshold` similar, or None. Only texts sharing a shingle
        can be similar, so only those are compared."""
        candidates = {position for shingle in text_shingles for position in self.by_shingle.get(shingle, ())}
        for position in sorted(candidates):
            other, origin = self.kept_shingles[position]
            if jaccard(text_shingles, other) >= self.threshold:
                return origin
        return None
