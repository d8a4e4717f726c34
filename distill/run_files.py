"""Owns one run's files (output, rejects, sidecar, record): resume, append, merge; must not render or call a model.

One run's files, side by side: the output JSONL, its rejects file, the logprobs sidecar (create_data.py
--save_logprobs) and the run record. Stage 0 and stage 1 (create_queries.py, create_data.py and its Ray driver)
resume, append and merge them only through this class, so they do it the same way.

    files = RunFiles(args.output_file, RunRecord("create_data", vars(args)), RESUME_KEYS, sidecar=True)
    written, rejected = files.resume(settings, overwrite=False)   # rows an earlier run of the same command finished
    files.mark_running(settings=settings)                         # the run record, written atomically
    with files.appender() as append:
        append([{"row": ..., "sidecar": ...}, {"reject": ...}])  # one write and fsync per file, sidecar lines first

Resuming refuses a run record made with other settings (the keys a stage names: what its answers mean), and a
finished row whose input (its `input_sha256`: the rendered teacher input and the prompt file) is not the input now,
e.g. a query edited under the same id (rows from before the hash resume unchecked, with a note); it cuts a
last line torn by a crash (and, under --keep all, the rest of that query's rows), and keeps rows and sidecar lines
only in pairs: a row whose sidecar line is missing, or a sidecar line without its row, is dropped and its query asked
again. --overwrite deletes all four files instead.
`merge` builds one output from a multi-instance run's shards when together they hold every selected id exactly
once and were all made, to the end, with the same settings.
"""

import json
from collections.abc import Callable
from contextlib import contextmanager
from glob import glob
from pathlib import Path

from distill.records import InputError, RunRecord, append_jsonl, output_paths, query_id, read_jsonl, repair_torn_tail
from distill.shards import coverage_errors

# ---- the KD sidecar: one line per written row (its content: distill/soft_targets.py) ---------------------------
#
# A row and its sidecar line are one unit: the sidecar line is written (and fsynced) first, so a crash leaves at worst
# a sidecar line without its row; on resume `sync_sidecar` keeps only ids present in both files, so such a query (or
# a row whose sidecar line is missing) is asked again.

SIDECAR_SUFFIX = ".logprobs.jsonl"


def sidecar_path(output: str | Path) -> Path:
    stem = Path(output).with_suffix("")
    return stem.with_name(stem.name + SIDECAR_SUFFIX)


def sync_sidecar(out: Path, sidecar: Path) -> dict:
    """After a crash: cut torn tails, then keep in both files only the ids present in both (the last sidecar line of
    an id wins), rewriting a file only if it changes. Returns what was dropped, for the log."""
    repair_torn_tail(sidecar)
    rows = read_jsonl(out) if out.exists() else []
    lines = {line["id"]: line for line in (read_jsonl(sidecar) if sidecar.exists() else [])}
    row_ids = {row["id"] for row in rows}
    dropped = {"rows_without_sidecar": [row["id"] for row in rows if row["id"] not in lines],
               "sidecar_without_row": [line_id for line_id in lines if line_id not in row_ids]}
    kept_rows = [row for row in rows if row["id"] in lines]
    kept_lines = [lines[row["id"]] for row in kept_rows]
    if len(kept_rows) != len(rows):
        _rewrite(out, kept_rows)
    if not sidecar.exists() or kept_lines != read_jsonl(sidecar):
        _rewrite(sidecar, kept_lines)
    return dropped


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        append_jsonl(handle, rows)
    tmp.replace(path)


def read_sidecar(path: Path) -> dict[str, dict]:
    lines = {}
    for number, line in enumerate(read_jsonl(path), start=1):
        if not isinstance(line, dict) or "id" not in line or "top_ids" not in line:
            raise InputError(f"{path}:{number}: not a sidecar line (needs id, answer_token_ids, top_ids, "
                             "top_logprobs)")
        lines[line["id"]] = line
    return lines



def cut_partial_query(path: Path) -> tuple[str, int, int] | None:
    """Cut the rows of a last query that a crash left with fewer rows than it gave (--keep all writes a query's rows
    in one write, so only the last query can be short, and `repair_torn_tail` kept its whole lines). Returns
    (query id, rows found, rows it gave), or None when the last query is whole."""
    if not path.exists():
        return None
    lines = path.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1]) if lines else {}
    query = last.get("query_id")
    if query is None:  # one row per query: whole or absent
        return None
    tail = 0
    while tail < len(lines) and json.loads(lines[-1 - tail]).get("query_id") == query:
        tail += 1
    expected = last["teacher"]["samples_kept"]
    if tail >= expected:
        return None
    with open(path, "r+b") as handle:
        handle.truncate(sum(len(line) for line in lines[:-tail]))
    return query, tail, expected


def changed_settings(record: dict, settings: dict, keys: tuple[str, ...]) -> list[str]:
    """The `keys` whose value in a run record's settings differs from `settings`."""
    previous = record.get("settings", {})
    return [key for key in keys if previous.get(key) != settings.get(key)]


class RunFiles:
    def __init__(self, output_file: str, run: RunRecord, resume_keys: tuple[str, ...], sidecar: bool = False):
        self.out, self.rejects, self.record_path = output_paths(output_file)
        self.sidecar = sidecar_path(self.out) if sidecar else None
        self.run, self.resume_keys = run, resume_keys

    def written(self) -> list[dict]:
        return read_jsonl(self.out) if self.out.exists() else []

    def rejected(self) -> list[dict]:
        return read_jsonl(self.rejects) if self.rejects.exists() else []

    def write(self, **results) -> dict:
        """Writes the run record (how the run was started, and `results`); returns it."""
        return self.run.write(self.record_path, **results)

    def mark_running(self, **results) -> dict:
        return self.run.mark_running(self.record_path, **results)

    def resume(self, settings: dict, overwrite: bool,
               input_sha256: Callable[[str], str | None] | None = None) -> tuple[list[dict], list[dict]]:
        """(written rows, rejected rows) that earlier runs of the same command finished, after the repairs above;
        none with `overwrite`, which deletes the files. InputError when the earlier run had other settings, or when
        `input_sha256` (query id -> the hash of its input now, None for an id not selected) differs from a row's."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in (self.out, self.rejects, self.record_path, self.sidecar):
                if path:
                    path.unlink(missing_ok=True)
            return [], []
        if not self.out.exists() and not self.rejects.exists():
            return [], []
        if self.record_path.exists():
            changed = changed_settings(json.loads(self.record_path.read_text()), settings, self.resume_keys)
            if changed:
                raise InputError(f"{self.out} was made with other settings ({', '.join(changed)}); pass --overwrite "
                                 f"to start over")
        for path in (self.out, self.rejects):
            cut = repair_torn_tail(path)
            if cut:
                print(f"resume: cut a torn last line ({cut} bytes) from {path}")
        partial = cut_partial_query(self.out)
        if partial:
            print(f"resume: query {partial[0]} has {partial[1]} of its {partial[2]} rows (--keep all; a crash cut its "
                  f"write): dropped, to be asked again")
        if self.sidecar:
            for what, ids in sync_sidecar(self.out, self.sidecar).items():
                if ids:
                    print(f"resume: {len(ids)} {what.replace('_', ' ')} dropped, to be asked again: "
                          f"{', '.join(ids[:5])}")
        written, rejected = self.written(), self.rejected()
        if input_sha256:
            self.check_inputs(written, rejected, input_sha256)
        return written, rejected

    def check_inputs(self, written: list[dict], rejected: list[dict], input_sha256) -> None:
        """InputError naming the first finished row whose stored input hash is not its input's now; rows without one
        (written before hashes) are counted in a note."""
        unchecked, changed = 0, []
        for path, rows in ((self.out, written), (self.rejects, rejected)):
            for number, row in enumerate(rows, start=1):
                stored = row.get("teacher", {}).get("input_sha256") if path == self.out else row.get("input_sha256")
                if stored is None:
                    unchecked += 1
                elif (now := input_sha256(query_id(row))) is not None and now != stored:
                    changed.append(f"{path}:{number} (id {row['id']})")
        if changed:
            raise InputError(f"{len(changed)} finished rows were asked with another input than this run gives their "
                             f"id (the query's text or turns, or the prompt as rendered), first {changed[0]}; pass "
                             f"--overwrite to start over, or give the edited queries new ids")
        if unchecked:
            print(f"resume: {unchecked} finished rows carry no input hash (written before stage 1 stored one): their "
                  f"input is not checked against this run's")

    @contextmanager
    def appender(self):
        """A function that appends records ({"row": ...}, {"reject": ...}, {"sidecar": ...} dicts) to their files,
        one write and fsync per file per call. Sidecar lines go first, so a crash leaves at worst a sidecar line
        without its row (resume drops it), never a row without its sidecar line."""
        paths = {"sidecar": self.sidecar, "row": self.out, "reject": self.rejects}
        handles = {kind: open(path, "a", encoding="utf-8") for kind, path in paths.items() if path}

        def append(records: list[dict]) -> None:
            for kind, handle in handles.items():  # in the order of `paths`: sidecar, row, reject
                append_jsonl(handle, [record[kind] for record in records if kind in record])

        try:
            yield append
        finally:
            for handle in handles.values():
                handle.close()

    def merge(self, pattern: str, rows: list[dict], settings: dict) -> dict:
        """Writes this run's output, rejects (and sidecar) from the shard outputs matching `pattern`, each file
        replaced atomically, if together they hold every selected id (`rows`) exactly once, were all made with
        `settings` and finished; InputError otherwise. Then the merged run record, which keeps the settings (the
        same command run again on the merged output resumes from it and finds nothing to do); returns it."""
        shard_files = [Path(path) for path in sorted(glob(pattern))
                       if not path.endswith((".rejects.jsonl", SIDECAR_SUFFIX))]
        if not shard_files:
            raise InputError(f"no shard files match {pattern}")
        shards = {path: RunFiles(str(path), self.run, self.resume_keys, bool(self.sidecar)) for path in shard_files}
        records, written, rejected = {}, [], []
        for path, shard in shards.items():
            if not shard.record_path.exists():
                raise InputError(f"{shard.record_path} is missing: every shard must come from a create_data.py run")
            records[path] = json.loads(shard.record_path.read_text(encoding="utf-8"))
            written += shard.written()
            rejected += shard.rejected()
        errors = [f"{path} was made with other settings ({', '.join(changed)})" for path, record in records.items()
                  if (changed := changed_settings(record, settings, self.resume_keys))]
        errors += coverage_errors(rows, written + rejected)
        unfinished = [str(path) for path, record in records.items() if record.get("status") != "finished"]
        if unfinished:
            errors.append(f"shards not finished: {', '.join(unfinished)}")
        if errors:
            raise InputError(f"shards {pattern} do not cover the input exactly once with the same settings: "
                             + "; ".join(errors))
        merged = [(self.out, written), (self.rejects, rejected)]
        if self.sidecar:
            merged.append((self.sidecar, merged_sidecars(list(shards.values()), written)))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for path, lines in merged:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
            tmp.replace(path)
        shard_records = list(records.values())
        # What every shard's record says alike (same settings, so the same prompt file and teacher): stage 2 reads
        # the student side from here.
        alike = {key: shard_records[0].get(key) for key in ("teacher_tokenizer_sha256", "input_kind", "student",
                                                              "system_merged_into_user")}
        return self.write(status="finished", settings=settings, merged_from=[str(path) for path in records], **alike,
                           logprobs_top_k=settings["save_logprobs"],
                           counts={"selected": len(rows), "written_total": len(written),
                                   "rejected_total": len(rejected)},
                           shards=[record.get("counts") for record in shard_records],
                           generation_seconds=max(record.get("generation_seconds") or 0 for record in shard_records))


def merged_sidecars(shards: list[RunFiles], written: list[dict]) -> list[dict]:
    """The shards' sidecar lines in the merged rows' order; InputError unless every written row has one."""
    lines = {}
    for shard in shards:
        lines.update(read_sidecar(shard.sidecar) if shard.sidecar.exists() else {})
    missing = [row["id"] for row in written if row["id"] not in lines]
    if missing:
        raise InputError(f"{len(missing)} rows have no line in their shard's {SIDECAR_SUFFIX} "
                         f"(e.g. {', '.join(missing[:5])}); re-run those shards to resume them")
    return [lines[row["id"]] for row in written]
