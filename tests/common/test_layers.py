"""The import floors read one way: a lower floor never imports a higher one (README, Layout).

Every ``import`` in the product folders is parsed, including those inside functions (a lazy
import is still a dependency). Floors, ground first:

    0 common            errors, checks, file I/O (pure: no torch, no numpy)
    1 comm, kernels     ranks, communicator, launchers, node discovery | block kernels
    2 parallel, placement
    3 simulator
    4 tokenloom         the roof: CLI, commands, jobs, integrations

Same-floor imports between different packages are refused too (comm and kernels, parallel and
placement are independent). The one declared exception: ``strategy="auto"`` asks the simulator
which strategy is fastest, in the attention API and in decode over a KV cache (``ALLOWED``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOOR = {"common": 0, "comm": 1, "kernels": 1, "parallel": 2, "placement": 2, "simulator": 3, "tokenloom": 4}
FOLDERS = {"common": "common", "comm": "comm", "kernels": "kernels", "parallel": "parallel",
           "placement": "placement", "simulator": "simulator", "tokenloom": "tokenloom"}
ALLOWED = {("parallel/attention_plan.py", "simulator"), ("parallel/decode.py", "simulator")}  # strategy="auto"
HEAVY = ("torch", "numpy", "scipy", "pulp", "ray", "triton")


def _package_of(module: str) -> str | None:
    """'tokenloom.parallel.x' -> 'parallel'; 'tokenloom.cli' -> 'tokenloom'; other -> None."""
    parts = module.split(".")
    if parts[0] != "tokenloom":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "tokenloom":
        return parts[1]
    return "tokenloom"


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tokenloom":  # from tokenloom import kernels: the subpackage
                out += [(f"tokenloom.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module, node.lineno))
    return out


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_lower_floors_never_import_higher_ones():
    bad = []
    for pkg, folder in FOLDERS.items():
        for path in _files(folder):
            rel = path.relative_to(ROOT).as_posix()
            for module, line in _imports(path):
                target = _package_of(module)
                if target is None or target == pkg:
                    continue
                if target == "common" and module.endswith("shadow"):
                    continue
                if FLOOR[target] >= FLOOR[pkg] and (rel, target) not in ALLOWED:
                    bad.append(f"{rel}:{line} ({pkg}, floor {FLOOR[pkg]}) imports {module} (floor {FLOOR[target]})")
    assert not bad, "\n".join(bad)


def test_the_declared_exception_is_still_needed():
    # An exception nobody uses any more is removed from ALLOWED, so it cannot hide a new one.
    for rel, target in ALLOWED:
        assert any(_package_of(m) == target for m, _ in _imports(ROOT / rel)), (rel, target)


def test_the_ground_floor_is_pure():
    for path in _files("common"):
        for module, line in _imports(path):
            assert module.split(".")[0] not in HEAVY, f"{path.name}:{line} imports {module}"
            pkg = _package_of(module)
            assert pkg in (None, "common"), f"{path.name}:{line} imports {module}"
