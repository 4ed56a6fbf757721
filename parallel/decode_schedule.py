"""Schedules for attention of new queries over a sharded KV cache (decode, chunked prefill).

The same IR as training (:mod:`tokenloom.parallel.schedule`: ``Buf``, ``Send``, ``Recv``,
``Compute``, ``Block``, ``Merge``, ``Step``, ``Schedule``), with its own chunk numbering:

* chunk ``r`` (``0 <= r < N``) is rank r's *old* cache: every token it held before this call. All of
  them precede the new tokens, so every new query sees all of them (a full block).
* chunk ``N + j`` is part ``j`` of the new tokens (in sequence order; :func:`part_rank` says which
  rank holds it). Its K/V are appended to that rank's cache, so rank r's key buffer is
  ``kv r [r, N + part(r)]``. Query part j sees new part i fully when ``i < j``, causally when
  ``i == j`` (the square diagonal block) and not at all when ``i > j``.

Queries are either *sharded* (rank r holds only its own part ``N + part(r)``: chunked prefill whose
non-attention layers are sequence-parallel) or *replicated* (every rank holds every part: decode,
where each rank runs the whole model on the few new tokens). The strategies:

* ``"gather"`` (pass-Q gather/scatter): sharded: each rank sends its queries to every rank, every
  rank attends them over its shard, the ``(out, lse)`` partials return to the owner and merge.
  Replicated: each rank attends all queries over its shard and exchanges the partials with every
  rank (one round: what decode wants).
* ``"ring"`` (pass-Q ring, TokenRing's pattern): queries travel one hop a step round the ring while
  each rank attends them over its shard; each partial goes straight back to its owner one step
  later, overlapping the next step's compute.
* ``"passkv"``: the cache shards travel round the ring and the queries stay (Ring attention over the
  cache): worth it only when the new tokens outnumber the cached ones.

``ring`` and ``passkv`` are built for sharded queries; with replicated queries the runtime gives
each rank its own part and all-gathers the outputs afterwards (:mod:`tokenloom.parallel.decode`).
:mod:`tokenloom.parallel.decode_check` proves every schedule built here.
"""

from __future__ import annotations

from tokenloom.common.errors import UsageError
from tokenloom.parallel.schedule import Block, Buf, Compute, Merge, Recv, Schedule, Send, Step

# The per-call agreement message (tokenloom.parallel.decode_agree) is MESSAGE_BYTES long whatever the
# arguments: the agreed vector of AGREE_FIELDS, then a decode step's partials when they fit. Pure
# numbers here, so the simulator prices the same one-round-trip step the runtime runs.
AGREE_FIELDS = ("arguments", "world_size", "cache", "model", "layer_present", "seq_len", "start",
                "new_tokens", "heads", "strategy", "queries", "softmax_scale", "impl", "window_size",
                "softcap", "sinks", "replicated_inputs")
MESSAGE_BYTES = 1 << 16  # the vector plus a decode step's partials for up to ~120 heads x d=128
MESSAGE_HEADER = 8 * (len(AGREE_FIELDS) + 1)


def payload_fits_bytes(num_bytes: float) -> bool:
    """Whether ``num_bytes`` of partials ride in the agreement message."""
    return MESSAGE_HEADER + num_bytes <= MESSAGE_BYTES

DECODE_STRATEGIES = ("gather", "ring", "passkv")
REPLICATED_OWNER = 0  # replicated queries are one buffer "owned" by rank 0 and held by every rank


def part_rank(part: int, world_size: int, start: int) -> int:
    """Rank that holds part ``part`` of new tokens starting at global position ``start``.

    The append rule: a call's new tokens are cut into ``world_size`` contiguous parts (sizes differ
    by at most one, the longer first) and part j goes to rank ``(j + start) % world_size``. One
    token per call (decode) thus goes round-robin over the ranks, and a long chunk splits evenly.
    """
    return (part + start) % world_size


def part_of(rank: int, world_size: int, start: int) -> int:
    """Inverse of :func:`part_rank`: which part of the new tokens ``rank`` holds."""
    return (rank - start) % world_size


def part_lens(count: int, world_size: int) -> tuple[int, ...]:
    """Tokens in each part of ``count`` new tokens (sequence order)."""
    base, extra = divmod(count, world_size)
    return tuple(base + (1 if j < extra else 0) for j in range(world_size))


def part_range(part: int, count: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` offsets of part ``part`` within the call's new tokens."""
    lens = part_lens(count, world_size)
    lo = sum(lens[:part])
    return lo, lo + lens[part]


def kv_blocks(q_parts: tuple[int, ...], rank: int, n: int, start: int) -> tuple[Block, ...]:
    """Blocks of query parts ``q_parts`` (ascending, contiguous in their buffer) over rank's keys."""
    i = part_of(rank, n, start)
    old, new = rank, n + i
    q_all = tuple(n + j for j in q_parts)
    blocks = [Block(q_all, (old,), False)]
    later = tuple(n + j for j in q_parts if j > i)
    if later:
        blocks.append(Block(later, (new,), False))
    if i in q_parts:
        blocks.append(Block((new,), (new,), True))
    if len(q_parts) == 1 and q_parts[0] > i:  # one full block over the whole shard
        return (Block(q_all, (old, new), False),)
    return tuple(blocks)


def _kv(rank: int, n: int, start: int) -> Buf:
    return Buf("kv", rank, (rank, n + part_of(rank, n, start)))


def _q(owner: int, n: int, start: int) -> Buf:
    return Buf("q", owner, (n + part_of(owner, n, start),))


def _out(owner: int, n: int, start: int, at: int) -> Buf:
    return Buf("out", owner, (n + part_of(owner, n, start),), at=at)


def _compute(owner: int, holder: int, n: int, start: int) -> Compute:
    blocks = kv_blocks((part_of(owner, n, start),), holder, n, start)
    return Compute(_q(owner, n, start), _kv(holder, n, start), blocks, _out(owner, n, start, holder))


def _schedule(strategy: str, n: int, start: int, ranks, inputs, outputs, replicated: bool) -> Schedule:
    frozen = tuple(tuple(Step(tuple(c), tuple(p), tuple(m)) for c, p, m in steps) for steps in ranks)
    name = f"decode-{strategy}{'-replicated' if replicated else ''}@{start}"
    return Schedule(name, "contiguous", True, False, n, frozen, tuple(inputs), tuple(outputs))


def _gather_sharded(n: int, start: int) -> Schedule:
    ranks, inputs, outputs = [], [], []
    for r in range(n):
        others = [p for p in range(n) if p != r]
        s0 = ([op for p in others for op in (Send(p, _q(r, n, start), "q"), Recv(p, _q(p, n, start), "q"))],
              [_compute(r, r, n, start)], [])
        steps = [s0]
        if others:
            steps.append(([], [_compute(p, r, n, start) for p in others], []))
            comms = [op for p in others for op in (Send(p, _out(p, n, start, r), "out"),
                                                   Recv(p, _out(r, n, start, p), "out"))]
            steps.append((comms, [], [Merge(_out(r, n, start, p), _out(r, n, start, r)) for p in others]))
        ranks.append(steps)
        inputs.append((_q(r, n, start), _kv(r, n, start)))
        outputs.append({"out": _out(r, n, start, r)})
    return _schedule("gather", n, start, ranks, inputs, outputs, False)


def _gather_replicated(n: int, start: int) -> Schedule:
    every = tuple(range(n))
    q = Buf("q", REPLICATED_OWNER, tuple(n + j for j in every))
    ranks, inputs, outputs = [], [], []
    for r in range(n):
        mine = Buf("out", REPLICATED_OWNER, q.chunks, at=r)
        steps = [([], [Compute(q, _kv(r, n, start), kv_blocks(every, r, n, start), mine)], [])]
        others = [p for p in every if p != r]
        if others:
            comms = [op for p in others for op in (Send(p, mine, "out"),
                                                   Recv(p, Buf("out", REPLICATED_OWNER, q.chunks, at=p), "out"))]
            merges = [Merge(Buf("out", REPLICATED_OWNER, q.chunks, at=p), mine) for p in others]
            steps.append((comms, [], merges))
        ranks.append(steps)
        inputs.append((q, _kv(r, n, start)))
        outputs.append({"out": mine})
    return _schedule("gather", n, start, ranks, inputs, outputs, True)


def _ring_sharded(n: int, start: int) -> Schedule:
    """Step s < n: rank r attends the queries of rank r - s (received at step s - 1) while it
    forwards them and receives the next ones; the partial of step s - 1 goes home at step s (its
    own partial is already home)."""
    ranks, inputs, outputs = [], [], []
    for r in range(n):
        steps = []
        for s in range(n + 1):
            comms, computes, merges = [], [], []
            if s <= n - 2:
                comms.append(Send((r + 1) % n, _q((r - s) % n, n, start), "q"))
                comms.append(Recv((r - 1) % n, _q((r - s - 1) % n, n, start), "q"))
            if 2 <= s <= n:
                owner = (r - s + 1) % n
                comms.append(Send(owner, _out(owner, n, start, r), "out"))
                sender = (r + s - 1) % n
                comms.append(Recv(sender, _out(r, n, start, sender), "out"))
                merges.append(Merge(_out(r, n, start, sender), _out(r, n, start, r)))
            if s < n:
                computes.append(_compute((r - s) % n, r, n, start))
            if comms or computes or merges:
                steps.append((comms, computes, merges))
        ranks.append(steps)
        inputs.append((_q(r, n, start), _kv(r, n, start)))
        outputs.append({"out": _out(r, n, start, r)})
    return _schedule("ring", n, start, ranks, inputs, outputs, False)


def _passkv_sharded(n: int, start: int) -> Schedule:
    ranks, inputs, outputs = [], [], []
    for r in range(n):
        steps = []
        for s in range(n):
            comms = []
            if s <= n - 2:  # forward the shard attended now, receive the one attended next
                comms = [Send((r + 1) % n, _kv((r - s) % n, n, start), "kv"),
                         Recv((r - 1) % n, _kv((r - s - 1) % n, n, start), "kv")]
            c = _compute(r, (r - s) % n, n, start)
            steps.append((comms, [Compute(c.q_src, c.kv_src, c.blocks, _out(r, n, start, r))], []))
        ranks.append(steps)
        inputs.append((_q(r, n, start), _kv(r, n, start)))
        outputs.append({"out": _out(r, n, start, r)})
    return _schedule("passkv", n, start, ranks, inputs, outputs, False)


def build_decode_schedule(strategy: str, world_size: int, *, start: int, replicated: bool) -> Schedule:
    """The schedule of ``strategy`` for new tokens starting at global position ``start``.

    ``replicated``: every rank holds all new queries (only "gather" has a replicated schedule; the
    runtime runs the sharded one of the others on each rank's part).
    """
    if strategy not in DECODE_STRATEGIES:
        raise UsageError(f"strategy must be one of {', '.join(DECODE_STRATEGIES)} (or 'auto'), "
                         f"got {strategy!r}", field="strategy")
    if not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be >= 1, got {world_size!r}", field="world_size")
    start = start % world_size  # the schedule depends on the position only through the rotation
    if strategy == "gather":
        return (_gather_replicated if replicated else _gather_sharded)(world_size, start)
    if replicated:
        raise UsageError(f"strategy {strategy!r} has no replicated schedule; the runtime runs it on "
                         f"each rank's part of the queries", field="strategy")
    return (_ring_sharded if strategy == "ring" else _passkv_sharded)(world_size, start)
