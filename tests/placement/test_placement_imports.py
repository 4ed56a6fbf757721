"""placement/ reads one way: data at the bottom, algorithms above, no import cycle among its modules
(imports inside functions count too) and no module importing a sibling's private name."""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2] / "placement"
PACKAGE = "tokenloom.placement"


def _imports(path: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """Every import in ``path`` (module level or not) of a placement module: (module, names, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith(PACKAGE + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = PACKAGE if node.level == 1 else None
                assert base is not None, f"{path.name}:{node.lineno}: relative import above the package"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == PACKAGE or module.startswith(PACKAGE + "."):
                found.append((module, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> placement modules it imports, and the problems found on the way."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for path in sorted(ROOT.glob("*.py")):
        for module, names, line in _imports(path):
            where = f"{path.name}:{line}"
            if module == PACKAGE:  # from tokenloom.placement import x: a submodule, or a name through the facade
                subs = [n for n in names if n in modules]
                if path.stem != "__init__" and len(subs) != len(names):
                    problems.append(f"{where}: imports {sorted(set(names) - set(subs))} through the package "
                                    f"facade; import the module that defines them")
                edges[path.stem].update(subs)
                continue
            target = module[len(PACKAGE) + 1:].split(".")[0]
            edges[path.stem].add(target)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{where}: imports private {private} from {target}.py")
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a self-import)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_placement():
    edges, _ = _graph()
    assert not _cycles(edges), f"import cycles among placement modules: {_cycles(edges)}"


def test_no_private_names_from_sibling_modules():
    _, problems = _graph()
    assert not problems, problems


def test_data_modules_import_no_algorithm():
    """The bottom floor (problem, trace, plan) imports nothing above it."""
    edges, _ = _graph()
    bottom = {"problem", "trace", "plan"}
    for module in bottom:
        assert edges[module] <= bottom, (module, sorted(edges[module] - bottom))


def test_the_checker_sees_cycles_lazy_imports_and_private_names(tmp_path, monkeypatch):
    """The checks above would fail on the layout this test was written against (issue 17)."""
    (tmp_path / "trace.py").write_text("def f():\n    from tokenloom.placement.colocate import coactivation\n")
    (tmp_path / "colocate.py").write_text("from tokenloom.placement.affinity import _Swaps\n")
    (tmp_path / "affinity.py").write_text("import numpy\nfrom tokenloom.placement import trace\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges, problems = _graph()
    assert _cycles(edges) == [["affinity", "colocate", "trace"]]
    assert problems == ["colocate.py:1: imports private ['_Swaps'] from affinity.py"]
