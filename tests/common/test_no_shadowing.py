"""No top-level folder of the checkout shadows an installed package's import name (issue 16).

Every check runs a fresh interpreter whose working directory is the repository root, the way
``python -m pytest``, ``python -c`` and a notebook started there see it (root first on sys.path).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from procs import run

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tokenloom")


def _python(code: str, *, extra_path: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after '' (the root) on sys.path, like site-packages
    return run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=timeout)


def test_every_top_level_package_hands_its_bare_name_back():
    # A folder added later without the guard fails here.
    assert {"comm", "kernels", "parallel", "placement", "simulator"} <= set(PACKAGES)
    for name in PACKAGES:
        head = (ROOT / name / "__init__.py").read_text()
        assert "hand_back(__name__, __file__)" in head, f"{name}/__init__.py lacks the guard"


def test_installed_packages_win_over_the_checkouts_folders(tmp_path):
    # A stand-in distribution for every top-level name, with a submodule, installed after the root.
    for name in PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
        (tmp_path / name / "sub.py").write_text("VALUE = 42\n")
    code = ("import importlib, json\n"
            f"names = {PACKAGES!r}\n"
            "mods = [importlib.import_module(n) for n in names]\n"
            "subs = [importlib.import_module(n + '.sub').VALUE for n in names]\n"
            "import tokenloom.kernels, tokenloom.comm\n"
            "print(json.dumps({'who': [m.WHO for m in mods], 'files': [m.__file__ for m in mods],\n"
            "                  'subs': subs, 'ours': [tokenloom.kernels.__file__, tokenloom.comm.__file__]}))\n")
    proc = _python(code, extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["who"] == [f"installed {n}" for n in PACKAGES]
    assert all(Path(f).is_relative_to(tmp_path) for f in got["files"]), got["files"]
    assert got["subs"] == [42] * len(PACKAGES)
    # ... and tokenloom's own subpackages are still the checkout's folders.
    assert got["ours"] == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "comm" / "__init__.py")]


def test_a_bare_name_with_nothing_installed_is_not_found():
    code = ("import importlib.machinery, sys\n"
            "from tokenloom.common.shadow import _find_elsewhere\n"
            f"root = {str(ROOT)!r}\n"
            f"for name in {PACKAGES!r}:\n"
            "    if _find_elsewhere(name, root + '/' + name) is not None:\n"
            "        continue  # a real distribution of that name is installed here\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ModuleNotFoundError as e:\n"
            "        assert e.name == name and 'tokenloom.' + name in str(e), e\n"
            "        assert name not in sys.modules\n"
            "    else:\n"
            "        raise SystemExit(f'bare {name} imported our folder')\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    code = ("from transformers import AutoModelForCausalLM\n"
            "import sys\n"
            "k = sys.modules.get('kernels')\n"
            "assert k is None or 'site-packages' in (k.__file__ or ''), k\n"
            "print('ok')\n")
    proc = _python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_python_m_tokenloom_runs_from_the_repository_root():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run([sys.executable, "-m", "tokenloom", "run", "attention", "--launcher", "local", "--world-size",
                "2", "--seq", "256", "--heads", "2", "--head-dim", "16", "--check"], cwd=ROOT, env=env,
               timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_hf_example_from_the_repository_root():
    pytest.importorskip("transformers")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run([torchrun, "--standalone", "--nproc-per-node", "2", "examples/hf_train_step.py", "--check",
                "--steps", "1"], cwd=ROOT, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-> OK" in proc.stdout, proc.stdout[-2000:]


def test_the_test_process_looks_packages_up_as_an_installed_user_does():
    # tests/conftest.py takes the checkout root off sys.path: find_spec (what libraries ask before
    # importing) sees installed packages, never our folders.
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path)
    for name in PACKAGES:
        spec = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
        origin = (spec.origin or "") if spec is not None else ""
        assert not origin.startswith(str(ROOT / name)), (name, origin)
