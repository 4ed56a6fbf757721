"""tokenloom.parallel: schedules, runtimes and the public sequence-parallel attention API.

The attention API is imported on first use, so that ``tokenloom.parallel.builders`` (pure data,
used by the simulator) loads without the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "gather_sequence": "tokenloom.parallel.attention",
    "ring_attention": "tokenloom.parallel.attention",
    "shard_sequence": "tokenloom.parallel.attention",
    "sp_attention": "tokenloom.parallel.attention",
    "token_ring_attention": "tokenloom.parallel.attention",
    "ulysses_attention": "tokenloom.parallel.attention",
    "STRATEGIES": "tokenloom.parallel.builders",
    "build_schedule": "tokenloom.parallel.builders",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenloom.parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
