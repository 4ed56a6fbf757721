"""tokenloom.comm: rank math (pure), the Communicator over torch.distributed, group set-up.

The rank math is imported eagerly (pure Python); the Communicator, which needs torch.distributed,
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokenloom.comm.topology import (
    LAYOUTS,
    causal_pair_kind,
    chunk_len,
    chunks_of_rank,
    global_chunk_order,
    num_chunks,
    owner_of_chunk,
    ring_peer,
)

_LAZY = {"Communicator", "Handle", "resolve_group"}

__all__ = ["Communicator", "Handle", "LAYOUTS", "causal_pair_kind", "chunk_len", "chunks_of_rank",
           "global_chunk_order", "num_chunks", "owner_of_chunk", "resolve_group", "ring_peer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module("tokenloom.comm.communicator"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenloom.comm' has no attribute {name!r}")
