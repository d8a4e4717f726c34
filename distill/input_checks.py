"""Owns the checks on flags and inputs made before any model loads; must not load a model or write a file.

The checks stages make on their flags and inputs before any model loads, so that bad input costs seconds and reads
the same way everywhere: an InputError naming the flag, or the `file:line` (`file: row N` for a dataset), saying what
is wrong and what to do. docs/troubleshooting.md lists every refusal.

    positive_int                                     # argparse type: --max_samples 0 and -1 are refused
    check_model("--model_name", args.model)          # a local path that does not exist says so
    check_writable("--output_file", args.output_file)
    check_recipe(parser, argv)                       # a --config YAML key that is no flag, with the nearest ones
    rows, dropped = gold_labels(rows, places, labels, "label", ignore_unknown=False)
    check_teacher_coverage(args.teacher_file, rows, min_share=1.0)
"""

import argparse
import difflib
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

from distill.records import InputError, output_paths, query_id, read_jsonl


def positive_int(text: str) -> int:
    """An argparse type for counts that must be 1 or more; argparse names the flag in its message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value} (leave the flag out for no limit)")
    return value


# ---- models and output places -----------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a path on this machine rather than a hub id (`org/name`): it starts with
    `/`, `.` or `~`, has more than one `/`, or its first part is a directory here (`models/x`)."""
    parts = name.split("/")
    return name.startswith(("/", ".", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, file), str) for file in ("config.json", "adapter_config.json"))


def check_model(flag: str, name: str, kinds: str = "a model directory or a hub id") -> None:
    """A model or adapter a stage will load: a directory holding config.json (a model) or adapter_config.json (a LoRA
    adapter), or a hub id, which offline (HF_HUB_OFFLINE) must be in the hub cache. InputError otherwise."""
    from huggingface_hub.constants import is_offline_mode

    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / file).exists() for file in ("config.json", "adapter_config.json", "params.json")):
            adapter = (path / "adapter_model.safetensors").exists()
            raise InputError(
                f"{flag} {name}: no adapter_config.json there"
                + (" beside adapter_model.safetensors: an adapter needs both (training writes them together); copy "
                   "it from the run's output dir" if adapter else
                   f" (a LoRA adapter) and no config.json (a model); give {kinds}"))
        return
    if path.exists():
        raise InputError(f"{flag} {name}: a file, not a model directory or hub id")
    if looks_local(name):
        raise InputError(f"{flag} {name} does not exist; give {kinds}")
    if is_offline_mode() and not in_hub_cache(name):
        raise InputError(f"{flag} {name} does not exist here: no such directory, and not in the hub cache while "
                         f"HF_HUB_OFFLINE is set; download it first (unset HF_HUB_OFFLINE) or give a local directory")


def check_writable(flag: str, path: str | Path) -> None:
    """The nearest existing directory of `path` (which may not exist yet: stages create it) takes a new file;
    InputError naming the flag otherwise. Tried, not read from permissions: root ignores those, a read-only mount
    does not."""
    target = Path(path).expanduser().absolute()
    place = target.parent if target.is_file() else target  # an earlier run's output: written beside it again
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise InputError(f"{flag} {path}: {place} is a file, so nothing can be written under it; choose another "
                         f"{flag}")
    try:
        tempfile.TemporaryFile(dir=place).close()
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot write in {place} ({error.strerror}); choose a writable {flag}") \
            from None


# ---- a --config recipe (TRL's parser) -------------------------------------------------------------------------


def check_recipe(parser, argv: list[str]) -> None:
    """The YAML file after --config in `argv`, before TRL reads it: it exists, parses (its own line on an error), is a
    mapping, and every key is a flag of `parser` (TRL's message names neither the file nor a valid key)."""
    import yaml

    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    path = Path(argv[argv.index("--config") + 1])
    if not path.is_file():
        raise InputError(f"--config {path} does not exist; give a recipe YAML (e.g. recipes/cpu.yaml)")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"{yaml_error(path, error)}; fix that line") from None
    if node is None:
        return
    if not isinstance(node, yaml.MappingNode):
        raise InputError(f"{path}:{node.start_mark.line + 1}: a recipe is YAML keys (flag: value), one per line")
    known = {action.dest for action in parser._actions} | {"env"}  # TRL sets a recipe's `env:` as variables
    for key, _ in node.value:
        if key.value not in known:
            near = difflib.get_close_matches(key.value, sorted(known), n=3)
            raise InputError(f"{path}:{key.start_mark.line + 1}: unknown key '{key.value}'"
                             + (f" (did you mean {', '.join(near)}?)" if near else "")
                             + "; every key is a flag of the script without its dashes (--help lists them)")


def yaml_error(path: Path, error, first_line: int = 1) -> str:
    """`path:line: not valid YAML (...)` for a PyYAML error, its lines counted from `first_line` of the file (a
    prompt file's front matter starts on line 2), with the line of what it was parsing when that is another."""
    mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    what = getattr(error, "problem", None) or str(error)
    if getattr(error, "context", None) and context_mark and (not mark or context_mark.line != mark.line):
        what += f"; {error.context} on line {context_mark.line + first_line}"
    return f"{path}:{mark.line + first_line}: not valid YAML ({what})" if mark else f"{path}: not valid YAML ({what})"


# ---- what evaluation scores ---------------------------------------------------------------------------------------


def gold_labels(rows: list[dict], places: dict, labels: tuple[str, ...], label_field: str,
                ignore_unknown: bool) -> tuple[list[dict], Counter]:
    """The rows to score and the gold labels outside the prompt's label set (dropped, counted), which the accuracy
    and the confusion matrix cannot place. Without `ignore_unknown` such a label is an InputError at its row."""
    unknown = [row for row in rows if row.get(label_field) is not None and row[label_field] not in labels]
    if unknown and not ignore_unknown:
        row = unknown[0]
        label = row[label_field]
        hint = f" (the label set is lower case: '{label.lower()}'?)" if str(label).lower() in labels else ""
        raise InputError(f"{places.get(row['id'], row['id'])}: gold {label_field} {label!r} is not one of the "
                         f"prompt's labels ({', '.join(labels)}){hint}; {len(unknown)} of the {len(rows)} rows "
                         f"scored have such a label. Fix them, or pass --ignore_unknown_labels to drop and count them")
    dropped = {row["id"] for row in unknown}
    return [row for row in rows if row["id"] not in dropped], Counter(str(row[label_field]) for row in unknown)


def teacher_file_ids(path: str) -> set[str]:
    """The query ids a --teacher_file accounts for: a stage-1 JSONL's rows and the rejects beside it, or every example
    of a --with_prompt results JSON (an answer that broke the contract included: the teacher did answer it)."""
    if path.endswith(".jsonl"):
        rejects = output_paths(path)[1]
        return {query_id(row) for row in read_jsonl(path) + (read_jsonl(rejects) if rejects.exists() else [])}
    return {example["id"] for example in json.loads(Path(path).read_text(encoding="utf-8"))["examples"]}


def check_teacher_coverage(path: str, rows: list[dict], min_share: float) -> None:
    """A --teacher_file made for the rows scored: it accounts for at least `min_share` of them (1: all), else the
    agreement would cover other rows than the accuracy, or none. InputError naming how many matched."""
    covered = teacher_file_ids(path)
    matched = sum(row["id"] in covered for row in rows)
    if matched < min_share * len(rows):
        raise InputError(f"--teacher_file {path} answers {matched} of the {len(rows)} rows scored; "
                         f"--teacher_min_share {min_share:g} needs {math.ceil(min_share * len(rows))}. Give the "
                         f"teacher's answers to these rows (evaluate.py --with_prompt with the same --test_file, "
                         f"--split and --max_samples, or stage 1 on them), or lower --teacher_min_share")


def require_rows(source: str, queries) -> None:
    """An input with no query at all: empty, or every line blank (read_queries' Queries)."""
    if not queries.rows:
        what = "the file is empty" if not queries.lines else f"all {queries.lines} of its lines are blank"
        raise InputError(f"{source}: no queries ({what}); give an input with a query per line or row")

