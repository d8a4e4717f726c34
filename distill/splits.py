"""Owns the train / held-out split every stage shares; must not read files.

The deterministic train / held-out split that training and evaluation share.

A row's side depends only on its group (or its id when it has none) and the seed, through a hash: it does not
move when rows are added, removed or reordered, and every row of a translation group lands on the same side.
"""

import hashlib

from distill.defaults import HELDOUT_FRACTION, SPLIT_SEED


def split_key(row: dict) -> str:
    return str(row.get("group") or row["id"])


def split_of(row: dict, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED) -> str:
    digest = hashlib.sha256(f"{seed}:{split_key(row)}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def select(rows: list[dict], split: str, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED):
    if split == "all":
        return list(rows)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    return [row for row in rows if split_of(row, heldout_fraction, seed) == split]
