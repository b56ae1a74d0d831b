"""The package's import structure, read from the source with `ast` (every import, also inside functions).

Data flows one way: config below distill below sweep; report apart and torch-free; no import cycles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


from conftest import REPO

ROOT = REPO / "platform" / "kdplatform"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports (kdplatform ones resolved to the module or package they name)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                me = _module_name(path)
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return out


GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def _arrows(src: str, banned: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {i}" for m, p in MODULES.items() if m == src or m.startswith(src + ".")
                  for i in _imports(p) if any(i == b or i.startswith(b + ".") for b in banned))


def test_the_walk_sees_the_layers():
    assert {"kdplatform.config.schema", "kdplatform.config.grid", "kdplatform.sweep.expand",
            "kdplatform.distill.losses", "kdplatform.report.collect"} <= set(MODULES)
    assert "kdplatform.config.schema" in GRAPH["kdplatform.config.resolve"]


def test_no_import_cycles_outside_the_worker():
    assert [c for c in _cycles() if not all(m.startswith("kdplatform.distill.") for m in c)] == []


def test_no_import_cycles_at_all():
    assert _cycles() == []


def test_config_imports_nothing_from_the_layers_above():
    assert _arrows("kdplatform.config", ("kdplatform.distill", "kdplatform.sweep", "kdplatform.report",
                                         "torch")) == []


def test_distill_imports_nothing_from_sweep_or_report():
    assert _arrows("kdplatform.distill", ("kdplatform.sweep", "kdplatform.report")) == []


def test_report_never_imports_torch_or_the_worker():
    assert _arrows("kdplatform.report", ("torch", "transformers", "kdplatform.distill")) == []


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += GRAPH[m]
    return seen


def test_report_reaches_no_torch_through_the_modules_it_uses():
    """The report imports runs.py (tag names, filters) and tracking.py: neither, nor anything they reach, may
    pull torch in."""
    reached = set().union(*(_reachable(m) for m in MODULES if m.startswith("kdplatform.report")))
    assert "kdplatform.runs" in reached
    assert [f"{m} -> {i}" for m in sorted(reached) for i in _imports(MODULES[m])
            if i.split(".")[0] in ("torch", "transformers")] == []


# Quoted `kdp.` tag names and MLflow filter strings (`tags.<name> ...` / ``tags.`<name>` ...``) in code.
TAG_LITERAL = re.compile(r"""["']kdp\.""")
FILTER_LITERAL = re.compile(r"""\btags\.(`|\S+\s*(=|!=|like|ilike)\s*')""", re.IGNORECASE)


def _string_hits(pattern: re.Pattern, path: Path) -> list[str]:
    """Lines of `path` whose code (not docstrings or comments) matches `pattern`.

    Each string's source text is cut from the file's lines by the node's byte offsets (one split of the
    file, not one `ast.get_source_segment` per node: that re-splits the whole file each time)."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    lines = [line.encode("utf-8") for line in text.splitlines()]
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in docstrings:
            first, last = node.lineno - 1, node.end_lineno - 1
            seg = (lines[first][node.col_offset:node.end_col_offset] if first == last else
                   b"\n".join([lines[first][node.col_offset:], *lines[first + 1:last],
                                lines[last][:node.end_col_offset]]))
            line = seg.decode("utf-8", errors="replace")
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line[:80]}")
    return sorted(set(hits))


def test_tag_names_and_run_filters_live_only_in_runs_py():
    """runs.py owns every `kdp.*` tag name and every MLflow filter string (issue 15): elsewhere, constants."""
    hits = [h for m, p in sorted(MODULES.items()) if m != "kdplatform.runs"
            for h in _string_hits(TAG_LITERAL, p) + _string_hits(FILTER_LITERAL, p)]
    assert hits == []
    assert _string_hits(TAG_LITERAL, MODULES["kdplatform.runs"]), "the check must see runs.py's own names"
    assert _string_hits(FILTER_LITERAL, MODULES["kdplatform.runs"])


def test_the_checks_would_catch_a_bad_arrow(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kdplatform.distill import worker\n    import torch.nn\n")
    assert {"kdplatform.distill", "kdplatform.distill.worker", "torch.nn"} <= _imports(bad)
