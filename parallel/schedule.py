"""Schedules as data: what every rank computes, sends and receives at every step.

A :class:`Schedule` holds, for each rank, an ordered tuple of :class:`Step`. A step runs in four
phases, and both the runtime and the simulator follow exactly these semantics:

1. post every op in ``comms`` at once (P2P sends/receives, or collectives);
2. run ``computes`` in order, while the communication is in flight;
3. wait for the step's communication;
4. run ``merges`` in order (fold received partials into accumulators).

Data is named by :class:`Buf` — ``(kind, owner, chunks, at)``: what it holds (see
:data:`WIRE_FIELDS`), whose tokens, which global sequence chunks, and for partial results the rank
that computed them (``at``; -1 for plain inputs, which are the same wherever they are). A rank
never holds two buffers with the same ``(kind, owner, at)`` key; an op may name a subset of a
held buffer's chunks, which is how TokenRing sends only the late half of a query block.

A compute or merge *folds* into its destination: attention outputs merge in log-sum-exp form,
gradients add; a destination that does not exist yet starts empty. The builders in
``tokenloom.parallel.builders`` make schedules, ``tokenloom.parallel.check`` proves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

# kind -> ((field name, head kind "q"|"kv", per-token width "d"|"1", dtype "io"|"acc"), ...)
# "io" travels in the input dtype, "acc" in fp32. Fields with width "d" are (batch, seq, heads, d);
# width "1" fields are per-row statistics shaped (batch, heads, seq).
WIRE_FIELDS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "q": (("q", "q", "d", "io"),),
    "kv": (("k", "kv", "d", "io"), ("v", "kv", "d", "io")),
    "out": (("out", "q", "d", "io"), ("lse", "q", "1", "acc")),
    "qg": (("q", "q", "d", "io"), ("dout", "q", "d", "io"), ("lse", "q", "1", "acc"),
           ("delta", "q", "1", "acc")),
    "dout": (("dout", "q", "d", "io"),),
    "dq": (("dq", "q", "d", "acc"),),
    "dkv": (("dk", "kv", "d", "acc"), ("dv", "kv", "d", "acc")),
}
PARTIAL_KINDS = ("out", "dq", "dkv")  # results that fold; everything else is input data


@dataclass(frozen=True, order=True)
class Buf:
    """A named piece of data on a rank (see module docstring)."""

    kind: str
    owner: int
    chunks: tuple[int, ...]
    at: int = -1
    shard: int = -1  # head shard index after a Ulysses all-to-all; -1: all heads

    def __post_init__(self) -> None:
        assert self.kind in WIRE_FIELDS, self.kind
        assert len(set(self.chunks)) == len(self.chunks), self.chunks

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.kind, self.owner, self.at, self.shard)

    def sub(self, chunks: tuple[int, ...]) -> "Buf":
        return Buf(self.kind, self.owner, tuple(chunks), self.at, self.shard)

    def __str__(self) -> str:
        at = f"@{self.at}" if self.at >= 0 and self.at != self.owner else ""
        shard = f"h{self.shard}" if self.shard >= 0 else ""
        chunks = ",".join(map(str, self.chunks)) if len(self.chunks) <= 4 else f"{self.chunks[0]}..{self.chunks[-1]}"
        return f"{self.kind}{self.owner}{shard}[{chunks}]{at}"


@dataclass(frozen=True)
class Send:
    peer: int
    buf: Buf
    channel: str  # which stream carries it ("q", "out", "kv", ...): the simulator's lanes

    def __str__(self) -> str:
        return f">{self.peer}:{self.buf}"


@dataclass(frozen=True)
class Recv:
    peer: int
    buf: Buf
    channel: str

    def __str__(self) -> str:
        return f"<{self.peer}:{self.buf}"


@dataclass(frozen=True)
class AllToAll:
    """Equal-split all-to-all over the whole group (Ulysses): ``seq2head`` or ``head2seq``.

    ``kind`` names the wire fields moved; ``kv_repeat`` > 1 when kv heads were replicated so they
    divide the world size.
    """

    kind: str
    direction: str
    kv_repeat: int = 1

    def __str__(self) -> str:
        return f"a2a:{self.kind}:{self.direction}"


Comm = Union[Send, Recv, AllToAll]


def a2a_bufs(op: AllToAll, rank: int, world_size: int, layout: str) -> tuple[Buf, Buf]:
    """What an all-to-all consumes and produces on ``rank``: (source buffer, destination buffer).

    ``seq2head`` turns this rank's sequence chunks of all heads into all chunks (global order) of
    head shard ``rank``; ``head2seq`` is the inverse. Partial kinds carry ``at=rank``.
    """
    from tokenloom.comm.topology import chunks_of_rank, num_chunks

    every = tuple(range(num_chunks(world_size, layout)))
    local = chunks_of_rank(rank, world_size, layout)
    at = rank if op.kind in PARTIAL_KINDS else -1
    seq_side = Buf(op.kind, rank, local, at=at)
    head_side = Buf(op.kind, rank, every, at=at, shard=rank)
    if op.direction == "seq2head":
        return seq_side, head_side
    assert op.direction == "head2seq", op.direction
    return head_side, seq_side


@dataclass(frozen=True)
class Block:
    """One kernel call: query chunks against key chunks (each list contiguous in its buffer).

    ``causal`` means the bottom-right-aligned causal mask over the concatenated chunks; the
    builder only emits it when that equals the per-pair chunk mask.
    """

    q_chunks: tuple[int, ...]
    kv_chunks: tuple[int, ...]
    causal: bool

    def pairs(self) -> list[tuple[int, int]]:
        from tokenloom.comm.topology import causal_pair_kind

        return [(qc, kc) for qc in self.q_chunks for kc in self.kv_chunks
                if not self.causal or causal_pair_kind(qc, kc) != "none"]

    def __str__(self) -> str:
        return f"{''.join(map(str, self.q_chunks))}x{''.join(map(str, self.kv_chunks))}{'c' if self.causal else ''}"


@dataclass(frozen=True)
class Compute:
    """Attention blocks on ``q_src`` x ``kv_src``; results fold into ``dst`` (and ``dst_kv``).

    Forward: ``dst`` is an ``out`` buffer. Backward: ``q_src`` is a ``qg`` buffer, ``dst`` a
    ``dq`` buffer and ``dst_kv`` a ``dkv`` buffer. ``head_shard = (index, count)`` restricts the
    work to a slice of heads (Ulysses); ``(0, 1)`` is all heads.
    """

    q_src: Buf
    kv_src: Buf
    blocks: tuple[Block, ...]
    dst: Buf
    dst_kv: Buf | None = None
    head_shard: tuple[int, int] = (0, 1)

    def __str__(self) -> str:
        blocks = "+".join(map(str, self.blocks))
        kv = f",{self.dst_kv}" if self.dst_kv is not None else ""
        return f"C({self.q_src}*{self.kv_src} {blocks} ->{self.dst}{kv})"


@dataclass(frozen=True)
class Pack:
    """Build a ``qg`` buffer locally from ``q``, ``out`` (with lse) and ``dout`` buffers.

    ``delta = rowsum(dout * out)``. Used by Ulysses backward, whose q/out were saved from forward.
    """

    dst: Buf
    srcs: tuple[Buf, ...]

    def __str__(self) -> str:
        return f"P({'+'.join(map(str, self.srcs))}->{self.dst})"


@dataclass(frozen=True)
class Merge:
    """Fold received partial ``src`` into ``dst`` (log-sum-exp merge for ``out``, sum for grads)."""

    src: Buf
    dst: Buf

    def __str__(self) -> str:
        return f"M({self.src}->{self.dst})"


@dataclass(frozen=True)
class Step:
    comms: tuple[Comm, ...] = ()
    computes: tuple[Union[Compute, Pack], ...] = ()
    merges: tuple[Merge, ...] = ()

    def __str__(self) -> str:
        parts = [" ".join(map(str, self.comms)), " ".join(map(str, self.computes)),
                 " ".join(map(str, self.merges))]
        return " | ".join(p or "-" for p in parts)


@dataclass(frozen=True)
class Schedule:
    """Per-rank step lists plus what each rank starts with and ends with."""

    strategy: str
    layout: str
    causal: bool
    backward: bool
    world_size: int
    ranks: tuple[tuple[Step, ...], ...]
    inputs: tuple[tuple[Buf, ...], ...]  # per rank: buffers present before step 0
    outputs: tuple[dict[str, Buf], ...] = field(default_factory=tuple)  # per rank: result kind -> buffer

    @property
    def num_steps(self) -> int:
        return max((len(steps) for steps in self.ranks), default=0)

    def describe(self, mark: tuple[int, int] | None = None) -> str:
        """Compact text, one line per (rank, step); ``mark=(rank, step)`` flags a failing step."""
        head = (f"{self.strategy} {'bwd' if self.backward else 'fwd'} layout={self.layout} "
                f"causal={self.causal} world_size={self.world_size}")
        lines = [head]
        for r, steps in enumerate(self.ranks):
            for s, step in enumerate(steps):
                flag = "  <-- here" if mark == (r, s) else ""
                lines.append(f"  r{r} s{s}: {step}{flag}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()
