"""tokenloom.comm: rank math (pure), the Communicator over torch.distributed, heartbeats and the
roll call, node discovery (:mod:`.nodes`), and the launchers (:mod:`.launch`: ``run_job``, local,
torchrun, Ray).

The rank math is imported eagerly (pure Python); the Communicator, which needs torch.distributed,
on first use.
"""

from __future__ import annotations

from tokenloom.common.shadow import hand_back

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

from tokenloom.common.lazy import lazy_exports

_LAZY = {name: "tokenloom.comm.communicator" for name in ("Communicator", "Handle", "resolve_group")}

__all__ = ["Communicator", "Handle", "LAYOUTS", "causal_pair_kind", "chunk_len", "chunks_of_rank",
           "global_chunk_order", "num_chunks", "owner_of_chunk", "resolve_group", "ring_peer"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
