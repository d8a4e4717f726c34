"""Owns reading query inputs, JSONL writes and run records; must not know what a stage does with them.

Query input (text, JSONL, CSV, parquet/arrow, datasets; texts or conversations), crash-safe JSONL output, ids and
run records.

Every stage reads and writes through here so bad input fails the same way everywhere: an InputError naming the
file and line (a dataset's row), raised before any model is loaded.
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
    rows: list[dict]  # each has "id" and "text", plus the input's other columns carried through; a conversation
    # also has "messages" (its turns, ending in the user turn to answer) and "text" is that last user turn
    empty: int = 0  # blank lines / blank texts skipped
    duplicates: int = 0  # texts (or conversations) seen before, kept once
    lines: int = 0
    kind: str = "text"  # "text" or "conversations": a file holds one or the other
    places: dict = field(default_factory=dict)  # id -> `file:line` (`source: row N`), for errors about a row


ROLES = ("system", "user", "assistant")


def text_id(text: str) -> str:
    return "q" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def conversation_key(turns: list[dict]) -> str:
    """A conversation's content, canonical: what deduplication compares and its derived id hashes."""
    return json.dumps([[turn["role"], turn["content"]] for turn in turns], ensure_ascii=False, separators=(",", ":"))


def query_id(row: dict) -> str:
    """The query a written row answers: with --keep all a query gives rows `<id>#<k>`, each naming its query."""
    return row.get("query_id", row["id"])


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
        raise InputError(f"{path}: unsupported input type '{suffix}' (use .txt, .jsonl, .csv, .parquet or .arrow, a "
                         f"dataset saved with save_to_disk, or a datasets name)")


def load_dataset_rows(source: str, split: str = "train"):
    """The rows of a `datasets` source: a .parquet or .arrow file (read whole), a folder saved with save_to_disk (its
    `split` when it holds several), or a datasets name or folder that load_dataset reads (its `split`)."""
    import datasets

    path = Path(source)
    try:
        if path.suffix.lower() in (".parquet", ".arrow") and path.is_file():
            return datasets.load_dataset(path.suffix.lower()[1:], data_files=str(path), split="train")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise InputError(f"{source}: no split '{split}' (it has {', '.join(saved)}); pick one with "
                                     f"--dataset_split")
                return saved[split]
            return saved
        return datasets.load_dataset(source, split=split)
    except InputError:
        raise
    except Exception as error:  # the name is neither a readable file nor a loadable dataset
        kind = "not a readable dataset" if path.exists() else "no such file, and not a loadable dataset"
        raise InputError(f"{source}: {kind} ({error})") from None


def _numbered_rows(source: str, text_field: str, split: str):
    """(place, where, row) of every row: `line N`, `file:N` for a text file; `row N`, `source: row N` for a
    dataset (its rows have no lines)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in (".parquet", ".arrow"):
        return ((f"line {number}", f"{source}:{number}", row) for number, row in _parsed_rows(path, text_field))
    return ((f"row {number}", f"{source}: row {number}", row)
            for number, row in enumerate(load_dataset_rows(source, split), start=1))


def read_conversation(value, where: str) -> list[dict]:
    """A row's conversation as [{"role", "content"}, ...]: an optional system turn first, then user and assistant
    turns, ending in the user turn the teacher answers. InputError naming `where` otherwise."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: an empty conversation" if isinstance(value, list) or value is None else
                         f"{where}: a conversation must be a list of {{role, content}} turns, got "
                         f"{type(value).__name__}")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise InputError(f"{where}: turn {number} must be {{\"role\": ..., \"content\": \"a string\"}}")
        if turn.get("role") not in ROLES:
            raise InputError(f"{where}: turn {number} has an unknown role {turn.get('role')!r} (use system, user or "
                             f"assistant)")
        if turn["role"] == "system" and number > 1:
            raise InputError(f"{where}: turn {number} is a system turn; a conversation's system turn comes first")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] != "user":
        raise InputError(f"{where}: the conversation ends in a{'n' if turns[-1]['role'] == 'assistant' else ''} "
                         f"{turns[-1]['role']} turn; it must end in the user turn the teacher answers")
    if not turns[-1]["content"].strip():
        raise InputError(f"{where}: the conversation's last user turn is empty")
    return turns


def read_queries(source: str, text_field: str = "text", split: str = "train",
                 messages_field: str = "messages") -> Queries:
    """Queries from a file or a dataset: texts (`text_field`) or conversations (`messages_field`), one kind per
    input, set by its first row. Empty texts are skipped and counted; a repeated text (or conversation) is kept once
    and counted; rows without an id get one from their content, so a re-run finds the same ids."""
    queries, seen, seen_ids, kind = Queries([]), set(), {}, None
    for place, where, row in _numbered_rows(source, text_field, split):
        queries.lines += 1
        if row == {text_field: ""}:  # a blank line
            queries.empty += 1
            continue
        if kind is None:
            kind = "conversations" if row.get(text_field) is None and row.get(messages_field) is not None else "text"
            queries.kind = kind
        if kind == "conversations":
            row, key = _conversation_row(row, messages_field, text_field, where)
        else:
            if text_field not in row:
                raise InputError(f"{where}: a '{messages_field}' conversation, but the input mixes text rows and "
                                 f"conversations (its first row is a text); give each kind an input of its own"
                                 if row.get(messages_field) is not None else
                                 f"{where}: no '{text_field}' field (columns: {', '.join(row)})")
            text = key = row[text_field]
            if not isinstance(text, str):
                raise InputError(f"{where}: '{text_field}' must be a string, got {type(text).__name__}")
            if not text.strip():
                queries.empty += 1
                continue
            # A "messages" column of a text row would read as its conversation downstream (distill.prompts.query_of).
            row = {**{k: v for k, v in row.items() if k != "messages"}, "text": text}
        if key in seen:
            queries.duplicates += 1
            continue
        seen.add(key)
        row["id"] = str(row["id"]) if row.get("id") not in (None, "") else text_id(key)
        if row["id"] in seen_ids:
            raise InputError(f"{where}: id '{row['id']}' already used on {seen_ids[row['id']]}")
        seen_ids[row["id"]] = place
        queries.places[row["id"]] = where
        queries.rows.append(row)
    return queries


def _conversation_row(row: dict, messages_field: str, text_field: str, where: str) -> tuple[dict, str]:
    """A conversation row as a query row (its turns under "messages", its last user turn as "text") and the key
    deduplication compares."""
    if row.get(messages_field) is None:
        raise InputError(f"{where}: a '{text_field}' text, but the input mixes text rows and conversations (its "
                         f"first row is a conversation); give each kind an input of its own"
                         if row.get(text_field) is not None else
                         f"{where}: no '{messages_field}' field (columns: {', '.join(row)})")
    turns = read_conversation(row[messages_field], where)
    rest = {k: v for k, v in row.items() if k not in (messages_field, text_field)}
    return {**rest, "text": turns[-1]["content"], "messages": turns}, conversation_key(turns)


def query_fields(row: dict) -> dict:
    """What a results file shows of a query: its text (a conversation's last user turn) and, for a conversation,
    all of its turns."""
    return {"text": row["text"], **({"messages": row["messages"]} if "messages" in row else {})}


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


def row_place(source: str, rows: list[dict], row: dict) -> str:
    """Where `row`, one of the `rows` read from `source` (read_jsonl: blank lines skipped, or a dataset), is:
    `file:line`, or `source: row N`. For error messages: it reads the file again."""
    index = next(number for number, candidate in enumerate(rows) if candidate is row)
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in (".parquet", ".arrow"):
        lines = [number for number, line in _decoded_lines(path) if line.strip()]
        return f"{source}:{lines[index]}"
    return f"{source}: row {index + 1}"


def load_teacher_answers(path: str) -> tuple[dict, dict | None]:
    """Query id -> the teacher's label (or generative answer), from a stage-1 JSONL (with --keep all, a query's first
    row) or a results JSON of an `evaluate.py --with_prompt` run, and the latter's cost block. A generative teacher's
    empty answer (its output broke the contract) is no reference and is left out."""
    if path.endswith(".jsonl"):
        answers = {}
        for row in read_jsonl(path):
            answers.setdefault(query_id(row), row["messages"][-1]["content"])
        return answers, None
    results = json.loads(Path(path).read_text())
    if results.get("task") == "generative":
        return {e["id"]: e["answer"] for e in results["examples"] if e["answer"]}, results.get("cost")
    return {e["id"]: e["prediction"] for e in results["examples"]}, results.get("cost")


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

    def write(self, path: str | Path, **results) -> dict:
        """The record as it stands (atomically): how the run was started, and `results` (its status, counts, ...)."""
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

    def mark_running(self, path: str | Path, **results) -> dict:
        """The record of a run that has started: what a crashed run leaves behind, and what later stages read early."""
        return self.write(path, status="running", **results)
