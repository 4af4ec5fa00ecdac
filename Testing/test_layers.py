"""The core's layers: it never imports the command line, its modules import each other without
cycles (function-level imports included), and the names follow the method registry."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

CORE = REPO / "OEFPredictor" / "OEFPredictorLib"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports, at any level of the code)."""
    modules = {".".join(f.relative_to(CORE).with_suffix("").parts) for f in CORE.rglob("*.py")}
    graph = {}
    for f in CORE.rglob("*.py"):
        name = ".".join(f.relative_to(CORE).with_suffix("").parts)
        package = name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    target = ".".join(base + [alias.name])
                    deps.add(target if target in modules else ".".join(base))
        graph[name] = {d for d in deps if d in modules and d != name and not d.endswith("__init__")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, out = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_core_never_imports_the_command_line():
    graph = import_graph()
    assert "cohort" in graph and "cli.predict" in graph  # the graph sees both layers
    up = sorted((m, d) for m, deps in graph.items() if not m.startswith("cli") for d in deps if d.startswith("cli"))
    assert up == []


def test_the_core_has_no_import_cycles():
    graph = import_graph()
    assert "spatial" not in graph["models"] and "predict" in graph["files"]
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # it finds one


def test_names_follow_the_registry():
    from OEFPredictorLib import methods, resources
    from OEFPredictorLib.cli import build_parser

    for m in methods.METHODS.values():
        if m.architecture:
            assert methods.of_card({"model": {"architecture": m.architecture}}) is m
    assert methods.of_card({}).name == "lstm"  # the first cards named no architecture
    try:
        assert resources.bundled_model_path().name == methods.get(None).model_file
    except FileNotFoundError:  # a checkout without the bundled models
        pass
    description = build_parser().description
    assert methods.METHODS[methods.DEFAULT_METHOD].label.lower() in description.lower()
    for text in ((REPO / "pyproject.toml").read_text(), (REPO / "CMakeLists.txt").read_text()):
        assert "context network" in text


def test_the_design_notes_the_code_cites_are_in_the_repository():
    import re

    cited = set()
    for path in [*REPO.joinpath("OEFPredictor").rglob("*.py"), *REPO.joinpath("Resources").rglob("*.json"),
                 *REPO.joinpath("Testing").glob("*.py")]:
        cited |= set(re.findall(r"\b([a-z]+\.md)\b", path.read_text(encoding="utf-8")))
    assert {"physics.md", "method.md"} <= cited
    for name in ("physics.md", "method.md"):
        assert (REPO / "docs" / "design" / name).is_file(), name
    assert "../shared" not in (REPO / "docs" / "design" / "physics.md").read_text()
