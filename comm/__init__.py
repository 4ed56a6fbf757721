"""tokenloom.comm: rank math (pure), the Communicator over torch.distributed, group set-up."""

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
from tokenloom.comm.communicator import Communicator, Handle, resolve_group

__all__ = [
    "LAYOUTS",
    "Communicator",
    "Handle",
    "causal_pair_kind",
    "chunk_len",
    "chunks_of_rank",
    "global_chunk_order",
    "num_chunks",
    "owner_of_chunk",
    "resolve_group",
    "ring_peer",
]
