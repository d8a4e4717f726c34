"""Which instance answers which query, and the check that every selected query was answered exactly once (the
merge of shards itself: distill/run_files.py).

A row belongs to shard `hash(id) mod num_shards`. Unlike slicing by position, that does not move when rows are
added, removed or reordered, or when --max_samples or --split change, so a resumed shard never collides with
another shard's finished rows at merge time.
"""

import hashlib
from collections import Counter


def shard_of(row_id: str, num_shards: int) -> int:
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def select_shard(rows: list[dict], index: int, num_shards: int) -> list[dict]:
    return [row for row in rows if shard_of(row["id"], num_shards) == index]


def coverage_errors(rows: list[dict], finished: list[dict]) -> list[str]:
    """What is wrong with `finished` (written + rejected rows) as a cover of the selected `rows`: nothing if every
    selected id appears exactly once."""
    seen = Counter(row["id"] for row in finished)
    expected = {row["id"] for row in rows}
    problems = {
        "appear more than once": sorted(i for i, n in seen.items() if n > 1),
        "are missing": sorted(expected - seen.keys()),
        "were not selected": sorted(seen.keys() - expected),
    }
    return [f"{len(ids)} ids {what} (e.g. {', '.join(ids[:5])})" for what, ids in problems.items() if ids]
