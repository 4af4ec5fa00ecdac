"""Structure numbers of docs/architecture.md's before/after table, for any checkout.

    python benchmarks/structure.py [REPO]   -> JSON on stdout (benchmarks/results/structure.json)

- files_naming_a_map: source files that hold an interval map's name, file, desc label or panel field
  as a table entry (a string constant equal to OEF_p95, oef_p95.nii.gz, OEFp95, outputOEFp95...; in
  the .ui a widget or SlicerParameterName), not prose: what adding a map like it touches besides the
  code computing it;
- files_spelling_a_unit: source files holding a map unit as a string constant (CMRO2's umol/100 g/min,
  S0's a.u. / input units, OEF_width's pp / percentage points): what renaming a unit touches;
- engine_plumbing_lines: lines of predict.py's run object(s), runners and predict_maps (AST spans);
  run_object_fields and widest_runner_signature: what the runners are handed;
- core_imports_of_cli and import_cycles: imports that point back up (relative imports at any level).
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout measured (the command line may name another)
CORE = REPO / "OEFPredictor" / "OEFPredictorLib"


def sources():
    for path in [*REPO.joinpath("OEFPredictor").rglob("*.py"), *REPO.joinpath("Resources", "UI").glob("*.ui")]:
        yield path, path.read_text(encoding="utf-8")


def files_with_constants(values: set[str], ui_pattern: str | None = None) -> list[str]:
    found = []
    for path, text in sources():
        if path.suffix == ".ui":
            hit = ui_pattern is not None and re.search(ui_pattern, text)
        else:
            hit = any(isinstance(n, ast.Constant) and n.value in values for n in ast.walk(ast.parse(text)))
        if hit:
            found.append(str(path.relative_to(REPO)))
    return sorted(found)


def engine_plumbing() -> dict:
    tree = ast.parse((CORE / "predict.py").read_text(encoding="utf-8"))
    plumbing = re.compile(r"^(predict_maps|_Run|_Session|_Voxels|Predictor|_run_\w+|RUNNERS)$")
    lines, fields, widest = 0, 0, 0
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        name = getattr(node, "name", None) or getattr(target, "id", None)
        if not name or not plumbing.match(name):
            continue
        lines += node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef) and name != "Predictor":
            fields += sum(isinstance(s, ast.AnnAssign) for s in node.body)
        for fn in (n for n in ast.walk(node) if isinstance(n, ast.FunctionDef) and n.name != "predict_maps"):
            widest = max(widest, len(fn.args.args))
    return {"engine_plumbing_lines": lines, "run_object_fields": fields, "widest_runner_signature": widest}


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(f.relative_to(CORE).with_suffix("").parts) for f in CORE.rglob("*.py")}
    graph = {}
    for f in CORE.rglob("*.py"):
        name = ".".join(f.relative_to(CORE).with_suffix("").parts)
        package, deps = name.split(".")[:-1], set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    target = ".".join(base + [alias.name])
                    deps.add(target if target in modules else ".".join(base))
        graph[name] = {d for d in deps if d in modules and d != name and not d.endswith("__init__")}
    return graph


def cycles(graph) -> list[list[str]]:
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


if __name__ == "__main__":
    if len(sys.argv) > 1:
        REPO = Path(sys.argv[1]).resolve()
        CORE = REPO / "OEFPredictor" / "OEFPredictorLib"
    graph = import_graph()
    result = {
        "files_naming_a_map": files_with_constants({"OEF_p95", "oef_p95.nii.gz", "OEFp95", "outputOEFp95",
                                                    "outputOEFp95Selector"}, r"OEFp95"),
        "files_spelling_a_unit": files_with_constants({"umol/100g/min", "umol/100 g/min", "a.u.", "input units", "pp",
                                                       "percentage points"}),
        **engine_plumbing(),
        "core_imports_of_cli": sorted(f"{m} -> {d}" for m, ds in graph.items() if not m.startswith("cli")
                                      for d in ds if d.startswith("cli")),
        "import_cycles": cycles(graph),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
