"""Hash sharding: every row in exactly one shard, and a row's shard does not move when the input changes."""

import random

import pytest

from distill.shards import coverage_errors, select_shard, shard_of


def rows(n, prefix="q"):
    return [{"id": f"{prefix}{i}", "text": f"t{i}"} for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 7, 101])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_every_row_lands_in_exactly_one_shard(n, count):
    parts = [select_shard(rows(n), index, count) for index in range(count)]
    assert sorted(row["id"] for part in parts for row in part) == sorted(row["id"] for row in rows(n))
    for part in parts:  # each shard keeps the input order
        assert part == [row for row in rows(n) if row in part]


def test_a_rows_shard_survives_added_removed_and_reordered_rows():
    base = rows(200)
    changed = base[50:] + rows(80, prefix="new")  # rows dropped (as --max_samples or --split would) and added
    random.Random(0).shuffle(changed)
    before = {row["id"]: index for index in range(4) for row in select_shard(base, index, 4)}
    after = {row["id"]: index for index in range(4) for row in select_shard(changed, index, 4)}
    assert all(after[row_id] == before[row_id] for row_id in after.keys() & before.keys())
    assert len(after.keys() & before.keys()) == 150


def test_shards_are_balanced_and_the_hash_is_fixed():
    sizes = [len(select_shard(rows(4000), index, 4)) for index in range(4)]
    assert min(sizes) > 900 and sum(sizes) == 4000
    # sha256-based, not Python's salted hash(): the same in every process and on every machine
    assert [shard_of(f"q{i}", 8) for i in range(8)] == [7, 2, 3, 7, 3, 5, 1, 7]

def test_coverage_errors_name_duplicate_missing_and_stranger_ids():
    selected = rows(5)
    assert coverage_errors(selected, selected) == []
    errors = coverage_errors(selected, selected[1:] + selected[2:3] + [{"id": "stranger"}])
    assert errors == ["1 ids appear more than once (e.g. q2)", "1 ids are missing (e.g. q0)",
                      "1 ids were not selected (e.g. stranger)"]
