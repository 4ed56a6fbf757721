"""Pure rank math: ring neighbours and sequence layouts.

Everything here is a pure function of ``(rank, world_size, ...)`` so it can be checked for every
rank in one process. Nothing here talks to other processes.

Layouts (how a global sequence of length S is cut across ``world_size`` = N ranks):

- ``"contiguous"``: N chunks of S/N; rank r holds chunk r.
- ``"zigzag"``: 2N chunks of S/(2N); rank r holds chunks r and 2N-1-r. Under a causal mask every
  rank then does the same amount of work (REFERENCE.md §1).
"""

from __future__ import annotations

from tokenloom.common.errors import UsageError
from tokenloom.common.vocab import LAYOUTS  # noqa: F401 -- the vocabulary, named once


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_world(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise UsageError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank must be in [0, {world_size}), got {rank}")


def ring_peer(rank: int, world_size: int, hops: int) -> int:
    """The rank ``hops`` steps along the ring (negative: the other way)."""
    check_world(rank, world_size)
    return (rank + hops) % world_size


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into."""
    check_layout(layout)
    return world_size if layout == "contiguous" else 2 * world_size


def chunks_of_rank(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """Global chunk ids held by ``rank``, in the order they sit in its local tensor."""
    check_world(rank, world_size)
    if check_layout(layout) == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def owner_of_chunk(chunk: int, world_size: int, layout: str) -> int:
    """Inverse of :func:`chunks_of_rank`."""
    n = num_chunks(world_size, layout)
    if not 0 <= chunk < n:
        raise UsageError(f"chunk must be in [0, {n}), got {chunk}")
    if layout == "contiguous":
        return chunk
    return chunk if chunk < world_size else 2 * world_size - 1 - chunk


def chunk_len(seq_len: int, world_size: int, layout: str, *, field: str = "seq_len") -> int:
    """Tokens per chunk; raises a ValueError saying what must divide what."""
    n = num_chunks(world_size, layout)
    if seq_len <= 0 or seq_len % n:
        how = "world_size" if layout == "contiguous" else "2 * world_size"
        raise UsageError(
            f"{field}={seq_len} must be a positive multiple of {how}={n} for layout {layout!r}"
        )
    return seq_len // n


def local_offset(chunk: int, rank: int, world_size: int, layout: str) -> int:
    """Position (in chunks) of global ``chunk`` inside ``rank``'s local tensor."""
    mine = chunks_of_rank(rank, world_size, layout)
    if chunk not in mine:
        raise UsageError(f"rank {rank} does not hold chunk {chunk} (holds {mine})")
    return mine.index(chunk)


def global_chunk_order(world_size: int, layout: str) -> list[tuple[int, int]]:
    """``(rank, local_index)`` of every global chunk in sequence order (for gather/reorder)."""
    return [
        (owner_of_chunk(c, world_size, layout),
         local_offset(c, owner_of_chunk(c, world_size, layout), world_size, layout))
        for c in range(num_chunks(world_size, layout))
    ]


def mesh_chunks_of_rank(rank: int, world_size: int, layout: str, ulysses: int = 1) -> tuple[int, ...]:
    """Chunks of SP rank ``rank`` on a 2-D ``(ulysses, ring)`` grid of ``world_size`` ranks.

    SP rank ``p = ring_rank * ulysses + ulysses_rank``. The sequence is cut for the ring
    (``num_chunks(ring, layout)`` ring chunks), each ring chunk into ``ulysses`` equal sub-chunks:
    global chunk ``c * ulysses + u``. Rank ``p`` holds sub-chunk ``u`` of each of its ring rank's
    ring chunks, so a Ulysses group together holds whole ring chunks. ``ulysses == 1`` is the
    1-D layout of :func:`chunks_of_rank`.
    """
    if ulysses < 1 or world_size % ulysses:
        raise UsageError(f"ulysses size {ulysses} must be >= 1 and divide world_size {world_size}")
    check_world(rank, world_size)
    ring_rank, u = divmod(rank, ulysses)
    return tuple(c * ulysses + u for c in chunks_of_rank(ring_rank, world_size // ulysses, layout))


def causal_pair_kind(q_chunk: int, kv_chunk: int) -> str:
    """How query chunk ``q_chunk`` sees key chunk ``kv_chunk`` under a causal mask of equal chunks.

    ``"full"``: every key is visible; ``"diag"``: lower-triangular; ``"none"``: nothing visible.
    """
    if kv_chunk < q_chunk:
        return "full"
    return "diag" if kv_chunk == q_chunk else "none"
