"""The core's layers: it never imports the command line, its modules import each other without
cycles (function-level imports included), and the names follow the method registry."""
from __future__ import annotations

import importlib.util

from conftest import REPO


def _structure():
    """benchmarks/structure.py: the import graph and its cycles (the numbers of docs/architecture.md)."""
    spec = importlib.util.spec_from_file_location("structure", REPO / "benchmarks" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_core_never_imports_the_command_line():
    graph = _structure().import_graph()
    assert "cohort" in graph and "cli.predict" in graph  # the graph sees both layers
    up = sorted((m, d) for m, deps in graph.items() if not m.startswith("cli") for d in deps if d.startswith("cli"))
    assert up == []


def test_the_core_has_no_import_cycles():
    structure = _structure()
    graph = structure.import_graph()
    assert "spatial" not in graph["models"] and "predict" in graph["files"]
    assert structure.cycles(graph) == []
    assert structure.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # it finds one


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
