"""tokenloom.comm: rank math (pure), the Communicator over torch.distributed, group set-up.

The rank math is imported eagerly (pure Python); the Communicator, which needs torch.distributed,
on first use.
"""

from __future__ import annotations

from tokenloom._shadow import hand_back

hand_back(__name__, __file__)  # imported by its bare name from the checkout: the installed package wins

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

from tokenloom._lazy import lazy_exports

_LAZY = {name: "tokenloom.comm.communicator" for name in ("Communicator", "Handle", "resolve_group")}

__all__ = ["Communicator", "Handle", "LAYOUTS", "causal_pair_kind", "chunk_len", "chunks_of_rank",
           "global_chunk_order", "num_chunks", "owner_of_chunk", "resolve_group", "ring_peer"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
