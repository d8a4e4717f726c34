"""The README, docs/*.md and the stages' --help against the code (docs are executable):
- every stage script's `--help` shows each of its own flags with its help and default (its main with `--help`, as
  a user runs it);
- every flag the README or a docs page names exists in the parser of the script it belongs to (a launcher's flags go
  to its stage script; flags after another tool, e.g. `sbatch --nodes=4`, are that tool's), built without loading
  any model;
- the defaults they state are the code's, each launcher's env variables are all listed, their commands use
  `.venv/bin/python`, and the wheels the GPU check's page says to carry are the pinned ones;
- every link to a local file resolves, and so does its #anchor."""

import importlib.metadata
import importlib.util
import re

import pytest

from tests.conftest import REPO, run_main

# The README and every docs page, each read on its own (a paragraph never spans two files).
DOCS = {path.relative_to(REPO).as_posix(): path.read_text(encoding="utf-8")
        for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
VLLM_STAGES = ("create_data.py", "evaluate.py", "create_queries.py")
# A launcher passes the flags it does not know to this stage script.
LAUNCHES = {"train_trl.sh": "train_sft_trl.py", "scripts/train_multinode.sbatch": "train_sft_trl.py",
            "create_data_h100x8.sh": "create_data.py", "create_data_ray.sh": "create_data.py",
            "scripts/ray_cluster.sbatch": "create_data.py", "scripts/gpu_check.sh": "scripts/gpu_check.py"}
NAMES = "|".join(re.escape(name) for name in sorted({*VLLM_STAGES, "train_sft_trl.py", "train_opd_trl.py",
                                                     "scripts/gpu_check.py", "distill.teacher_server",
                                                     *LAUNCHES}, key=len, reverse=True))
# Flags after these belong to them, not to a script of ours.
TOOLS = "|".join([r"vllm serve", r"vllm\.entrypoints\.openai\.api_server", r"accelerate's", r"ray start",
                  r"(?<![\w./])sbatch(?![\w.])", r"srun", r"accelerate launch", r"torchrun",
                  r"pip (?:install|download|uninstall)", r"make", r"(?<![\w-])pytest(?![\w-])"])
TOKEN = re.compile(rf"(?P<script>(?<![\w])(?:{NAMES}))|(?P<tool>{TOOLS})|(?P<flag>(?<![\w-])--[a-z][a-z0-9_-]*)")


def normal(flag: str) -> str:
    return flag.replace("_", "-")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built():
    """script -> its parser, built as the script builds it, with no model loaded."""
    from trl import DistillationConfig, ModelConfig, SFTConfig, TrlParser

    import create_data
    import create_queries
    import evaluate
    import train_opd_trl
    import train_sft_trl
    from distill import teacher_server

    return {"create_data.py": create_data.build_parser(), "evaluate.py": evaluate.build_parser(),
            "create_queries.py": create_queries.build_parser(),
            "train_sft_trl.py": TrlParser((train_sft_trl.DistillArguments, SFTConfig, ModelConfig)),
            "train_opd_trl.py": TrlParser((train_opd_trl.OnPolicyArguments, DistillationConfig, ModelConfig)),
            "scripts/gpu_check.py": load_gpu_check().build_parser(),
            "distill.teacher_server": teacher_server.build_parser()}


@pytest.fixture(scope="module")
def parsers(built):
    """script -> {normalised option string: argparse action}."""
    actions = {name: {normal(option): action for action in parser._actions for option in action.option_strings}
               for name, parser in built.items()}
    actions["train_sft_trl.py"]["--config"] = None  # TrlParser takes it before argparse sees it
    actions["train_opd_trl.py"]["--config"] = None
    return actions


def units(text: str):
    """(kind, text) pieces a flag is read in: each logical line of a code block (continuations joined, comments
    dropped), each paragraph or bullet of prose."""
    for number, block in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if number % 2:  # inside a fence
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                yield "code", re.sub(r"(^|\s)#.*", "", line)
        else:
            for piece in re.split(r"\n\s*\n|\n(?=- )", block):
                yield "prose", " ".join(piece.split())


def named_flags():
    """(script or None, flag, the doc and the unit's text) for every flag the README and docs/ name, attributed to the
    last script named before it in its unit; None where no script is named there (then any of ours must have it)."""
    for doc, content in DOCS.items():
        for _kind, text in units(content):
            owner = None
            for match in TOKEN.finditer(text):
                if match["script"]:
                    owner = LAUNCHES.get(match["script"], match["script"])
                elif match["tool"]:
                    owner = "tool"
                elif owner != "tool":
                    yield owner, match["flag"], f"{doc}: {text}"


def test_every_flag_the_readme_names_exists_in_its_scripts_parser(parsers):
    missing = []
    for script, flag, text in named_flags():
        known = parsers[script] if script else {option for actions in parsers.values() for option in actions}
        if normal(flag) not in known:
            missing.append(f"{flag} ({script or 'no script named'}): ...{text[:160]}")
    assert not missing, "\n".join(missing)
    assert sum(1 for _ in named_flags()) > 150  # the docs do name flags; the scan found them
    assert {"README.md", "docs/gpu-recipe.md", "docs/inputs.md"} <= {text.split(":")[0] for *_, text in named_flags()}


def test_defaults_the_readme_states_are_the_codes(parsers):
    """`--flag` (N) and `--flag` N in prose, where N is a number or one of the flag's choices."""
    checked, wrong = 0, []
    for doc, kind, text in ((doc, *unit) for doc, content in DOCS.items() for unit in units(content)):
        if kind != "prose":
            continue
        scripts = [LAUNCHES.get(name, name) for name in re.findall(rf"(?<![\w])(?:{NAMES})", text)]
        for flag, value in re.findall(r"`(--[\w-]+)(?: [^`]*)?` (?:\(|≥ )?([\w.]+)(?=[;:,)\s])", text):
            for script in scripts or list(parsers):
                action = parsers[script].get(normal(flag))
                if action is None or not (re.fullmatch(r"\d[\d.]*", value) or value in (action.choices or ())):
                    continue
                checked += 1
                if str(action.default) != value and not (value[0].isdigit() and float(action.default) == float(value)):
                    wrong.append(f"{script} {flag}: {doc} says {value}, the code {action.default!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 6


def test_launchers_env_variables_are_all_listed():
    for launcher in LAUNCHES:
        script = (REPO / launcher).read_text()
        names = {name for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-=]", script) if not name.startswith("SLURM_")}
        lists = [(doc, text) for doc, text in DOCS.items() if f"`{launcher}`: " in text]
        assert lists, f"no page lists {launcher}'s env variables (`{launcher}`: env ...)"
        doc, text = lists[0]
        start = text.index(f"`{launcher}`: ")
        others = [text.find(f"`{other}`", start + 1) for other in LAUNCHES if other != launcher]
        ends = [text.find("\n- ", start), text.find("\n\n", start)]
        end = min([at for at in others + ends if at > 0] + [len(text)])
        listed = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", text[start:end]))
        assert names <= listed, f"{launcher} reads {sorted(names - listed)}, which the list in {doc} lacks"


def test_readme_commands_use_the_venv_python():
    bare = {doc: re.findall(r"(?m)(?:^|[\s;&|(`])(python3? +[\w/.-]+\.py)\b", text) for doc, text in DOCS.items()}
    assert not any(bare.values()), f"bare python commands (use .venv/bin/python): {bare}"


def test_wheels_to_carry_are_the_pinned_versions():
    pins = dict(re.findall(r"^([\w-]+)==([\w.+]+)", (REPO / "requirements.txt").read_text(), flags=re.M))
    section = DOCS["docs/gpu-check.md"].split("\n## The GPU check, offline\n")[1]
    section = section[: re.search(r"\n##+ ", section).start()]
    carried = dict(re.findall(r"\b([\w-]+)==([\d.]+)", section))
    assert {"trl", "peft", "transformers", "datasets"} <= set(carried)
    for name, version in carried.items():
        expected = pins.get(name) or importlib.metadata.version(name)  # datasets' own needs: the versions here
        assert version == expected, f"the page carries {name}=={version}, requirements/installed say {expected}"


def prose(text: str) -> str:
    """A page without its code blocks."""
    return "".join(re.split(r"^```.*?^```", text, flags=re.M | re.S))


def anchors(text: str) -> set[str]:
    """The #anchors GitHub gives a page's headings (outside code blocks): lower case, punctuation dropped, spaces
    to hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", prose(text), flags=re.M)}


def test_links_to_local_files_resolve():
    """Every `[text](path)` and `[text](path#anchor)` outside code blocks in the README and docs/ names a file that
    exists (relative to the page) and, for a Markdown file, one of its headings."""
    checked, broken = 0, []
    for doc, text in DOCS.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (REPO / doc).parent / path if path else REPO / doc
            checked += 1
            if not file.resolve().is_file():
                broken.append(f"{doc}: ({target}): no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{doc}: ({target}): no heading with that anchor in {path or doc}")
    assert not broken, "\n".join(broken)
    assert checked > 30  # the README and the pages do link to each other


def test_no_placeholder_figures():
    """No figure is left to fill: a line that is only an ALL_CAPS token (a placeholder once landed in the README as
    `SOAK_FIGURES.`) or that says it is to be filled in."""
    placeholders = [f"{doc}:{number}: {line}" for doc, text in DOCS.items()
                    for number, line in enumerate(text.splitlines(), 1)
                    if re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+\.?", line.strip())
                    or re.search(r"to be filled|\bTODO\b|\bTBD\b", line)]
    assert not placeholders, "\n".join(placeholders)


@pytest.mark.parametrize("script", [*VLLM_STAGES, "train_sft_trl.py"])
def test_help_lists_every_own_flag_with_its_default(script, built):
    import argparse
    from dataclasses import fields

    result = run_main(script, "--help", check=False)  # in this process: the user's --help without the start-up
    assert result.returncode == 0, result.stderr[-2000:]
    blocks = {}  # each option string -> its help text with the whitespace removed (argparse wraps anywhere)
    for block in re.split(r"\n(?=  -)", result.stdout.split("\n\n", 1)[1]):
        for option in re.findall(r"--[\w-]+", block.split("\n")[0]):
            blocks.setdefault(normal(option), "".join(block.split()))
    if script == "train_sft_trl.py":  # TRL's parser; ours are the DistillArguments
        import train_sft_trl

        own = {f"--{field.name}": field.default for field in fields(train_sft_trl.DistillArguments)}
    else:
        parser = built[script]
        own = {action.option_strings[-1]: action.default for action in parser._actions
               if action.option_strings and action not in parser.engine_actions
               and action.help != argparse.SUPPRESS and action.dest != "help"}
    assert len(own) >= 10
    missing = [flag for flag, default in own.items()
               if f"(default:{''.join(str(default).split())})" not in blocks.get(normal(flag), "")]
    assert not missing, f"{script} --help lacks these flags or their defaults: {missing}"
    if script != "train_sft_trl.py":  # vLLM's engine flags: by group, and not in the usage line
        assert "--help=all" in result.stdout and "ModelConfig: " in result.stdout
        assert "--max-model-len" not in result.stdout.split("\n\n")[0]
