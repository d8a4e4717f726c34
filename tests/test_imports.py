"""The house's one-way data flow, read from the source: no distill module imports a stage script, and no two distill
modules import each other, directly or round a longer cycle. Imports inside functions count too."""

import ast
from pathlib import Path

from tests.conftest import REPO

STAGE_SCRIPTS = {path.stem for path in REPO.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code, as a dotted name ("distill.records", "create_data")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            # `from distill import records` imports the module distill.records
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def distill_graph() -> dict[str, set[str]]:
    """distill module -> the distill modules it imports."""
    modules = {path.stem: path for path in (REPO / "distill").glob("*.py") if path.stem != "__init__"}
    return {name: {imported.removeprefix("distill.") for imported in imported_modules(path)
                   if imported.removeprefix("distill.") in modules and imported.startswith("distill.")}
            for name, path in modules.items()}


def test_no_distill_module_imports_a_stage_script():
    assert STAGE_SCRIPTS >= {"create_data", "create_queries", "evaluate", "train_sft_trl"}
    offenders = {path.name: sorted(imported_modules(path) & STAGE_SCRIPTS)
                 for path in sorted((REPO / "distill").glob("*.py"))}
    assert {name: stages for name, stages in offenders.items() if stages} == {}


def test_distill_imports_form_no_cycle():
    graph = distill_graph()
    assert graph["soft_targets"] and graph["teacher"], "the parser found no imports: it is broken, not the graph"
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_bench_imports_a_stage_script():
    """Benches measure what users run: a stage through its CLI, or the distill/ code a stage calls."""
    offenders = {path.name: sorted(imported_modules(path) & STAGE_SCRIPTS) for path in (REPO / "bench").glob("*.py")}
    assert {name: stages for name, stages in offenders.items() if stages} == {}


def test_every_distill_module_opens_with_what_it_owns_and_must_not_do():
    import ast

    for path in sorted((REPO / "distill").glob("*.py")):
        if path.stem == "__init__":
            continue
        first = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").splitlines()[:1]
        assert first and first[0].startswith("Owns ") and "must not" in first[0], f"{path.name}: {first}"
