"""JSONL and CSV input, crash-safe JSONL output, ids and run records.

Every stage reads and writes through here so bad input fails the same way everywhere: an InputError naming the
file and line, raised before any model is loaded.
"""

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_RUN_RECORD = "distill_run.json"  # train_sft_trl.py writes it beside the adapter; evaluation reads its split


class InputError(ValueError):
    pass


@dataclass
class Queries:
    rows: list[dict]  # each has "id" and "text", plus the input's other columns carried through
    empty: int = 0  # blank lines / blank texts skipped
    duplicates: int = 0  # texts seen before, kept once
    lines: int = 0


def text_id(text: str) -> str:
    return "q" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _decoded_lines(path: Path):
    """(line number, text) of a UTF-8 file; a BOM is dropped, CRLF is read as LF, bad bytes name their line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line does not start another one
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{path}:{number}: invalid UTF-8 at byte {error.start} of the line") from None
        yield number, line.removesuffix("\r")


def _parsed_rows(path: Path, text_field: str):
    """(line number, row dict) from .txt, .jsonl or .csv."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for number, line in _decoded_lines(path):
            yield number, {text_field: line}
    elif suffix in (".jsonl", ".json"):
        for number, line in _decoded_lines(path):
            if not line.strip():
                yield number, {text_field: ""}  # counted as empty, like a blank .txt line
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: malformed JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row
    elif suffix == ".csv":
        text = "\n".join(line for _, line in _decoded_lines(path))
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield reader.line_num, row
    else:
        raise InputError(f"{path}: unsupported input type '{suffix}' (use .txt, .jsonl or .csv)")


def read_queries(source: str, text_field: str = "text", split: str = "train") -> Queries:
    """Queries from a file or a datasets name. Empty texts are skipped and counted; a repeated text is kept once
    and counted; rows without an id get one from their text, so a re-run finds the same ids."""
    path = Path(source)
    if path.exists():
        numbered = _parsed_rows(path, text_field)
    else:
        try:
            import datasets

            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:  # the name is neither a file nor a loadable dataset
            raise InputError(f"{source}: no such file, and not a loadable dataset ({error})") from None
        numbered = enumerate(dataset, start=1)
    queries, seen_texts, seen_ids = Queries([]), set(), {}
    for number, row in numbered:
        queries.lines += 1
        if text_field not in row:
            raise InputError(f"{source}:{number}: no '{text_field}' field (columns: {', '.join(row)})")
        text = row[text_field]
        if not isinstance(text, str):
            raise InputError(f"{source}:{number}: '{text_field}' must be a string, got {type(text).__name__}")
        if not text.strip():
            queries.empty += 1
            continue
        if text in seen_texts:
            queries.duplicates += 1
            continue
        seen_texts.add(text)
        row = {**row, "text": text}
        row["id"] = str(row["id"]) if row.get("id") not in (None, "") else text_id(text)
        if row["id"] in seen_ids:
            raise InputError(f"{source}:{number}: id '{row['id']}' already used on line {seen_ids[row['id']]}")
        seen_ids[row["id"]] = number
        queries.rows.append(row)
    return queries


def output_paths(output_file: str) -> tuple[Path, Path, Path]:
    """A stage writing JSONL rows: the output, its rejects file and its run record, side by side."""
    out = Path(output_file)
    stem = out.with_suffix("")
    return out, stem.with_name(stem.name + ".rejects.jsonl"), stem.with_name(stem.name + ".run.json")


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for number, line in _decoded_lines(Path(path)):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: malformed JSON ({error.msg})") from None
    return rows


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that a crash left half-written (every complete row ends in a newline). Returns bytes cut."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(keep)
    return len(data) - keep


def append_jsonl(handle, rows: list[dict]) -> None:
    """One write per batch, flushed and fsynced: after a crash a row is either whole on disk or absent."""
    if rows:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | Path, obj) -> None:
    """Atomic: readers see the old file or the new one, never half of one. The temporary name carries the process
    id, so two processes writing the same file (a misconfigured launch) cannot tear each other's copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


@dataclass
class RunRecord:
    """What a run directory needs to describe itself: how it was started and what it produced."""

    stage: str
    args: dict
    started: float = field(default_factory=time.time)
    command: str = field(default_factory=lambda: " ".join([sys.executable, *sys.argv]))
    git_revision: str = field(default_factory=git_revision)

    def finish(self, path: str | Path, **results) -> dict:
        record = {
            "stage": self.stage,
            "command": self.command,
            "git_revision": self.git_revision,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "wall_seconds": round(time.time() - self.started, 2),
            "args": self.args,
            **results,
        }
        write_json(path, record)
        return record
