"""Keep the checkout's top-level folders from shadowing installed packages of the same bare name.

The repository root holds ``comm/``, ``kernels/``, ``parallel/``, ... and pyproject maps each to
``tokenloom.<name>``. Anything that puts the checkout root on ``sys.path`` (``python -m pytest``,
``python -m tokenloom``, ``python -c``, a notebook started there) also makes the bare names
importable, and the first ``sys.path`` entry wins: ``import kernels`` inside transformers found our
folder instead of Hugging Face's ``kernels`` distribution, ``import comm`` inside ipykernel found
ours instead of Jupyter's.

Every top-level folder's ``__init__`` therefore starts with :func:`hand_back`. Imported as
``tokenloom.<name>`` it does nothing. Imported under its bare name it finds the package of that
name on the rest of the import path (skipping the checkout root), executes it and puts it in
``sys.modules``, where the import statement picks it up; with no such package the import fails
with ``ModuleNotFoundError``, exactly as if the folder were not there. The mechanism works from
any working directory and for any package, present or future, without a list of names to keep
up to date. (The rest of the folder's ``__init__`` then runs on a module object nobody holds; it
only imports ``tokenloom.*`` names, so that costs time at most.) ``tests/common/test_no_shadowing.py``
checks every top-level folder.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_OURS = "tokenloom."


def _real(path: str) -> str:
    return os.path.realpath(path or os.getcwd())


def _find_elsewhere(name: str, folder: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of top-level ``name`` from every import path entry but the checkout root (the
    parent of our ``folder``), and from any finder other than the path finder; or None."""
    root = os.path.dirname(folder)
    search = [entry for entry in sys.path if isinstance(entry, str) and _real(entry) != root]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, search)
        else:
            find = getattr(finder, "find_spec", None)
            spec = find(name, None) if find is not None else None
        if spec is None:
            continue
        origin = spec.origin or next(iter(spec.submodule_search_locations or []), "")
        if origin and _real(origin).startswith(folder + os.sep):
            continue  # our own folder again (some finders ignore the path we pass)
        return spec
    return None


def hand_back(module_name: str, init_file: str) -> None:
    """Called first thing in a top-level folder's ``__init__`` with its ``__name__, __file__``."""
    if module_name.startswith(_OURS):
        return
    spec = _find_elsewhere(module_name, os.path.dirname(_real(init_file)))
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {module_name!r} (the checkout's {module_name}/ folder is "
            f"'tokenloom.{module_name}', not {module_name!r})", name=module_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
