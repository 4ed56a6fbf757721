"""Schedules as data: what every rank computes, sends and receives at every step.

A :class:`Schedule` holds, for each rank, an ordered tuple of :class:`Step`. A step runs in four
phases, and both the runtime and the simulator follow exactly these semantics:

1. post every op in ``comms`` at once (P2P sends/receives, or collectives);
2. run ``computes`` in order, while the communication is in flight;
3. wait for the step's communication;
4. run ``merges`` in order (fold received partials into accumulators).

Data is named by :class:`Buf` — ``(kind, owner, chunks, at, shard)``: what it holds (a
:class:`Kind`, see :data:`WIRE_FIELDS`), whose tokens, which global sequence chunks, for partial
results the rank that computed them (``at``; -1 for plain inputs, which are the same wherever they
are), and after an all-to-all the head shard (-1: all heads). A rank never holds two buffers with
the same :attr:`Buf.key`; an op may name a subset of a held buffer's chunks, which is how TokenRing
sends only the late half of a query block. Chunk lengths may differ (packed sequences); which
tokens a chunk holds is the schedule's :class:`~tokenloom.parallel.layout.SeqLayout`.

A compute or merge *folds* into its destination: attention outputs merge in log-sum-exp form,
gradients add; a destination that does not exist yet starts empty (an all-to-all of a result
nobody folded into moves zeros). All-to-alls run inside the groups of :attr:`Schedule.groups`;
P2P ops match by :func:`match_p2p`. The builders in ``tokenloom.parallel.builders`` make
schedules, ``tokenloom.parallel.check`` proves them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Union

from tokenloom.common.vocab import Word

if TYPE_CHECKING:
    from tokenloom.parallel.layout import SeqLayout


class Kind(Word):
    """What a buffer holds (its wire fields: :data:`WIRE_FIELDS`), and the channel (stream) a send of
    it travels on. Compares equal to its value."""

    Q = "q"
    KV = "kv"
    OUT = "out"
    QG = "qg"
    DOUT = "dout"
    DQ = "dq"
    DKV = "dkv"


Channel = Kind  # a P2P op's lane is named after what it carries: the simulator's send streams


class Direction(Word):
    """All-to-all direction: sequence shards -> head shards, or back."""

    SEQ2HEAD = "seq2head"
    HEAD2SEQ = "head2seq"


class WireField(NamedTuple):
    """One tensor of a buffer on the wire. ``heads``: whose head count it has ("q" or "kv");
    ``width``: "d" for per-token vectors ``(batch, seq, heads, d)``, "1" for per-row statistics
    ``(batch, heads, seq)``; ``dtype``: "io" travels in the input dtype, "acc" in fp32."""

    name: str
    heads: str
    width: str
    dtype: str


def _fields(*specs: str) -> tuple[WireField, ...]:
    return tuple(WireField(*spec.split()) for spec in specs)


WIRE_FIELDS: dict[str, tuple[WireField, ...]] = {
    Kind.Q: _fields("q q d io"),
    Kind.KV: _fields("k kv d io", "v kv d io"),
    Kind.OUT: _fields("out q d io", "lse q 1 acc"),
    Kind.QG: _fields("q q d io", "dout q d io", "lse q 1 acc", "delta q 1 acc"),
    Kind.DOUT: _fields("dout q d io"),
    Kind.DQ: _fields("dq q d acc"),
    Kind.DKV: _fields("dk kv d acc", "dv kv d acc"),
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
        object.__setattr__(self, "kind", Kind(self.kind))
        assert len(set(self.chunks)) == len(self.chunks), self.chunks

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.kind, self.owner, self.at, self.shard)

    def sub(self, chunks: tuple[int, ...]) -> "Buf":
        return Buf(self.kind, self.owner, tuple(chunks), self.at, self.shard)

    def __str__(self) -> str:
        at = f"@{self.at}" if self.at >= 0 and self.at != self.owner else ""
        shard = f"h{self.shard}" if self.shard >= 0 else ""
        chunks = _chunk_list(self.chunks)
        return f"{self.kind}{self.owner}{shard}[{chunks}]{at}"


@dataclass(frozen=True)
class Send:
    peer: int
    buf: Buf
    channel: Channel  # which stream carries it: the simulator's lanes (a plain string is converted)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel", Channel(self.channel))

    def __str__(self) -> str:
        return f">{self.peer}:{self.buf}"


@dataclass(frozen=True)
class Recv:
    peer: int
    buf: Buf
    channel: Channel

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel", Channel(self.channel))

    def __str__(self) -> str:
        return f"<{self.peer}:{self.buf}"


@dataclass(frozen=True)
class AllToAll:
    """Equal-split all-to-all over this rank's all-to-all group (:attr:`Schedule.groups`).

    ``seq2head`` turns the members' sequence chunks of all heads into all their chunks of one head
    shard (the member's index in the group); ``head2seq`` is the inverse. ``kind`` names the wire
    fields moved; ``kv_repeat`` > 1 when kv heads were replicated so they divide the group size.
    """

    kind: str
    direction: Direction
    kv_repeat: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "direction", Direction(self.direction))

    def __str__(self) -> str:
        return f"a2a:{self.kind}:{self.direction}"


Comm = Union[Send, Recv, AllToAll]


def a2a_bufs(op: AllToAll, rank: int, sched: "Schedule") -> tuple[Buf, Buf]:
    """What an all-to-all consumes and produces on ``rank``: (source buffer, destination buffer).

    The sequence side is this rank's own chunks of all heads; the head side is every chunk of the
    group's members (global order) of head shard ``index of rank in its group``. Partial kinds
    carry ``at=rank``.
    """
    group = sched.group_of(rank)
    seq = sched.seq_layout
    at = rank if op.kind in PARTIAL_KINDS else -1
    seq_side = Buf(op.kind, rank, seq.chunks_of(rank), at=at)
    every = tuple(sorted(c for m in group for c in seq.chunks_of(m)))
    head_side = Buf(op.kind, rank, every, at=at, shard=group.index(rank))
    if op.direction == Direction.SEQ2HEAD:
        return seq_side, head_side
    assert op.direction == Direction.HEAD2SEQ, op.direction
    return head_side, seq_side


def _chunk_list(chunks: tuple[int, ...]) -> str:
    """Chunk ids, comma-separated, ascending runs of three or more as ``a-b``: ``0-15``,
    ``2,3,29-31``. Unambiguous at any number of chunks (``1,12`` is never ``11,2``)."""
    parts: list[str] = []
    i = 0
    while i < len(chunks):
        j = i
        while j + 1 < len(chunks) and chunks[j + 1] == chunks[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{chunks[i]}-{chunks[j]}")
        else:
            parts.extend(map(str, chunks[i:j + 1]))
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Block:
    """One kernel call: query chunks against key chunks (each list contiguous in its buffer).

    ``causal`` means the bottom-right-aligned causal mask over the concatenated chunks; the
    builder only emits it when that equals the per-pair chunk mask. ``masked`` (sliding windows):
    a run of consecutive query chunks against a run of consecutive key chunks (often one against
    one) that the window shows only in part; the runtime masks it by token position and computes
    only the pairs the window shows (printed ``w``).
    """

    q_chunks: tuple[int, ...]
    kv_chunks: tuple[int, ...]
    causal: bool
    masked: bool = False

    def pairs(self) -> list[tuple[int, int]]:
        from tokenloom.comm.topology import causal_pair_kind

        return [(qc, kc) for qc in self.q_chunks for kc in self.kv_chunks
                if not self.causal or causal_pair_kind(qc, kc) != "none"]

    def __str__(self) -> str:
        q, kv = _chunk_list(self.q_chunks), _chunk_list(self.kv_chunks)
        return f"{q}x{kv}{'c' if self.causal else ''}{'w' if self.masked else ''}"


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
    """Per-rank step lists plus what each rank starts with and ends with.

    ``seq`` says which chunks each rank holds (None: the flat layout of ``layout`` over
    ``world_size``); ``groups`` partitions the ranks into all-to-all groups (empty: no
    all-to-all). ``head_shards`` is how many head shards the computes are split into.
    """

    strategy: str
    layout: str
    causal: bool
    backward: bool
    world_size: int
    ranks: tuple[tuple[Step, ...], ...]
    inputs: tuple[tuple[Buf, ...], ...]  # per rank: buffers present before step 0
    outputs: tuple[dict[str, Buf], ...] = field(default_factory=tuple)  # per rank: result kind -> buffer
    seq: "SeqLayout | None" = None
    groups: tuple[tuple[int, ...], ...] = ()

    @property
    def num_steps(self) -> int:
        return max((len(steps) for steps in self.ranks), default=0)

    @property
    def seq_layout(self) -> "SeqLayout":
        from tokenloom.parallel.layout import SeqLayout

        return self.seq if self.seq is not None else SeqLayout(self.world_size, self.layout)

    @property
    def head_shards(self) -> int:
        return len(self.groups[0]) if self.groups else 1

    def group_of(self, rank: int) -> tuple[int, ...]:
        for g in self.groups:
            if rank in g:
                return g
        raise AssertionError(f"rank {rank} is in no all-to-all group of {self.strategy}")

    def describe(self, mark: tuple[int, int] | None = None, ranks: list[int] | None = None) -> str:
        """Compact text, one line per (rank, step); ``mark=(rank, step)`` flags a failing step."""
        head = (f"{self.strategy} {'bwd' if self.backward else 'fwd'} layout={self.layout} "
                f"causal={self.causal} world_size={self.world_size}")
        if self.seq is not None and (self.seq.ulysses > 1 or self.seq.varlen):
            head += f" ulysses={self.seq.ulysses}"
            if self.seq.varlen:
                head += f" docs={len(self.seq.doc_lens or ())}"
        if self.seq is not None and self.seq.window is not None:
            head += f" window={self.seq.window}"
        lines = [head]
        for r, steps in enumerate(self.ranks):
            if ranks is not None and r not in ranks:
                continue
            for s, step in enumerate(steps):
                flag = "  <-- here" if mark == (r, s) else ""
                lines.append(f"  r{r} s{s}: {step}{flag}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class P2PMatch:
    """A send and the receive it meets: ``(rank, step, index in step.comms)`` of each side."""

    send_at: tuple[int, int, int]
    recv_at: tuple[int, int, int]
    send: Send
    recv: Recv


class P2PProblem(NamedTuple):
    """Why a P2P op cannot complete: ``kind`` is "unmatched", "mismatch" or "peer"."""

    rank: int
    step: int
    message: str
    kind: str


def match_p2p(sched: Schedule) -> tuple[list[P2PMatch], list[P2PProblem]]:
    """Pair sends with receives by the runtime's rule; return ``(matches, problems)``.

    The rule (the one NCCL and gloo apply to what the runtime posts): between ranks a and b the
    k-th send from a (in step order, then in ``step.comms`` order, which is the posting order)
    meets the k-th receive at b from a. A pair whose buffers differ, an op without partner and a
    peer outside the world are :class:`P2PProblem`. Checker, simulator engine and
    runtime all rely on this one function.
    """
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    problems: list[P2PProblem] = []
    for r, steps in enumerate(sched.ranks):
        for s, step in enumerate(steps):
            for i, op in enumerate(step.comms):
                if isinstance(op, (Send, Recv)) and not 0 <= op.peer < sched.world_size:
                    problems.append(P2PProblem(r, s, f"peer {op.peer} outside world_size "
                                                     f"{sched.world_size}", "peer"))
                elif isinstance(op, Send):
                    sends[(r, op.peer)].append((s, i, op))
                elif isinstance(op, Recv):
                    recvs[(op.peer, r)].append((s, i, op))
    matches = []
    for a, b in sorted(set(sends) | set(recvs)):
        sa, rb = sends.get((a, b), []), recvs.get((a, b), [])
        for k in range(max(len(sa), len(rb))):
            if k >= len(sa):
                problems.append(P2PProblem(b, rb[k][0], f"receive #{k} from rank {a} ({rb[k][2].buf}) "
                                                        f"has no matching send", "unmatched"))
            elif k >= len(rb):
                problems.append(P2PProblem(a, sa[k][0], f"send #{k} to rank {b} ({sa[k][2].buf}) has "
                                                        f"no matching receive", "unmatched"))
            elif sa[k][2].buf != rb[k][2].buf:
                problems.append(P2PProblem(b, rb[k][0], f"receive #{k} from rank {a} expects "
                                                        f"{rb[k][2].buf} but rank {a} sends {sa[k][2].buf} "
                                                        f"(sizes would differ or data would be swapped)",
                                                        "mismatch"))
            else:
                matches.append(P2PMatch((a, *sa[k][:2]), (b, *rb[k][:2]), sa[k][2], rb[k][2]))
    return matches, problems


def a2a_entries(sched: Schedule) -> dict[tuple[int, ...], list[list[tuple[int, AllToAll]]]]:
    """Per all-to-all group: for each member (in group order), its ``(step, op)`` collectives."""
    out = {}
    for g in sched.groups:
        out[g] = [[(s, op) for s, st in enumerate(sched.ranks[r]) for op in st.comms
                   if isinstance(op, AllToAll)] for r in g]
    return out
