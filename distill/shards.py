"""Which instance labels which query, and the merge that checks every selected query was labelled exactly once.

A row belongs to shard `hash(id) mod num_shards`. Unlike slicing by position, that does not move when rows are
added, removed or reordered, or when --max_samples or --split change, so a resumed shard never collides with
another shard's finished rows at merge time.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path

from distill.records import InputError, read_jsonl


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


def settings_errors(shard_records: dict[Path, dict], settings: dict, keys: tuple[str, ...]) -> list[str]:
    """Shards made with other settings than the merge's (their answers would mean something else)."""
    errors = []
    for path, record in shard_records.items():
        previous = record.get("settings", {})
        changed = [key for key in keys if previous.get(key) != settings.get(key)]
        if changed:
            errors.append(f"{path} was made with other settings ({', '.join(changed)})")
    return errors


def read_shards(shard_files: list[Path], rejects_path_of, record_path_of) -> tuple[list, list, dict]:
    """(written rows, rejected rows, {shard file: its run record}) of every shard."""
    written, rejected, records = [], [], {}
    for shard_file in shard_files:
        written += read_jsonl(shard_file)
        rejects = rejects_path_of(shard_file)
        rejected += read_jsonl(rejects) if rejects.exists() else []
        record = record_path_of(shard_file)
        if not record.exists():
            raise InputError(f"{record} is missing: every shard must come from a create_data.py run")
        records[shard_file] = json.loads(record.read_text(encoding="utf-8"))
    return written, rejected, records
