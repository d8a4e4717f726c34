"""Owns which instance answers which query, and the exactly-once check; must not read or write files.

Which instance answers which query, and the check that every selected query was answered exactly once (the
merge of shards itself: distill/run_files.py); a written row names its query by `records.query_id`.

A row belongs to shard `hash(id) mod num_shards`. Unlike slicing by position, that does not move when rows are
added, removed or reordered, or when --max_samples or --split change, so a resumed shard never collides with
another shard's finished rows at merge time.
"""

import hashlib
from collections import Counter, defaultdict

from distill.records import query_id


def shard_of(row_id: str, num_shards: int) -> int:
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def select_shard(rows: list[dict], index: int, num_shards: int) -> list[dict]:
    return [row for row in rows if shard_of(row["id"], num_shards) == index]


def coverage_errors(rows: list[dict], finished: list[dict]) -> list[str]:
    """What is wrong with `finished` (written + rejected rows) as a cover of the selected `rows`: nothing if every
    selected id appears exactly once (with --keep all: as rows `<id>#<k>` of distinct k, or as one reject)."""
    by_query = defaultdict(list)
    for row in finished:
        by_query[query_id(row)].append(row["id"])
    expected = {row["id"] for row in rows}
    problems = {
        "appear more than once": sorted(i for i, ids in by_query.items()
                                        if len(set(ids)) < len(ids) or (i in ids and len(ids) > 1)),
        "are missing": sorted(expected - by_query.keys()),
        "were not selected": sorted(by_query.keys() - expected),
    }
    return [f"{len(ids)} ids {what} (e.g. {', '.join(ids[:5])})" for what, ids in problems.items() if ids]


def rows_per_query(written: list[dict]) -> dict[int, int]:
    """How many queries gave each number of written rows (1 each, except with --keep all), fewest rows first."""
    counts = Counter(Counter(query_id(row) for row in written).values())
    return dict(sorted(counts.items()))
