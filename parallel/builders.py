"""Schedule builders for TokenRing, Ring and Ulysses, forward and backward.

All three ring-style schedules come from one rule: a block of data (queries for TokenRing, keys and
values for Ring) visits the ranks in ring order, each holder computes the (query chunk, key chunk)
pairs the mask needs, and a block is forwarded only with the chunks some later holder still needs.
For causal zigzag this reproduces the published TokenRing behaviour (REFERENCE.md §2): the full
query travels until the ring wraps, then only its late half.

- TokenRing (arXiv 2412.20501): queries move (direction +1 for contiguous, -1 for zigzag), K/V stay.
  The partial output computed at step s goes straight back to the query's owner at step s+1, on the
  opposite direction of the links, overlapping the next block; the last one after the loop is not
  overlapped. Backward moves (q, dout, lse, delta) the same way and returns fp32 dq partials; dk/dv
  accumulate where K/V live.
- Ring: K/V move +1; outputs accumulate locally. Backward moves K/V the same way and passes an fp32
  dk/dv accumulator one step behind them (only the chunks other holders touch), which comes home
  after the last holder that needs it and is merged into the owner's own contribution.
- Ulysses (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards, full attention on
  H/N heads, all-to-all back.
- 2-D hybrid (USP, arXiv 2405.07719): all-to-all over heads inside each Ulysses group, then a
  TokenRing or Ring over the ring dimension on each head shard, then all-to-all back. Pure Ulysses
  is the same builder with one group of all ranks and a ring of one.

Which (query chunk, key chunk) pairs are needed comes from the sequence layout
(:class:`~tokenloom.parallel.layout.SeqLayout`): causal and/or document masks; pairs with no
visible key are never scheduled. Every rule about sizes and heads comes from
:class:`~tokenloom.parallel.dims.ParallelDims`.
"""

from __future__ import annotations

import functools
from collections import defaultdict

from tokenloom.common.errors import UsageError
from tokenloom.parallel.blocks import make_blocks, ordered as _ordered, window_blocks
from tokenloom.parallel.dims import STRATEGIES, ParallelDims, describe_strategy, hybrid_name, parse_strategy
from tokenloom.parallel.layout import SeqLayout, normalize_window
from tokenloom.parallel.schedule import (
    AllToAll,
    Block,
    Buf,
    Compute,
    Direction,
    Merge,
    Pack,
    Recv,
    Schedule,
    Send,
    Step,
)

__all__ = ["STRATEGIES", "ParallelDims", "build_schedule", "describe_strategy", "hybrid_name", "make_blocks",
           "parse_strategy", "schedule_for", "window_blocks"]


class _Steps:
    """Mutable per-rank, per-step op lists, frozen into Steps at the end."""

    def __init__(self, world_size: int) -> None:
        self.ops: list[dict[int, dict[str, list]]] = [defaultdict(lambda: defaultdict(list))
                                                      for _ in range(world_size)]

    def add(self, rank: int, step: int, phase: str, op) -> None:
        self.ops[rank][step][phase].append(op)

    def p2p(self, step: int, src: int, dst: int, buf: Buf, channel: str) -> None:
        self.add(src, step, "comms", Send(dst, buf, channel))
        self.add(dst, step, "comms", Recv(src, buf, channel))

    def freeze(self) -> tuple[tuple[Step, ...], ...]:
        num_steps = 1 + max((max(d) for d in self.ops if d), default=-1)
        ranks = []
        for per_rank in self.ops:
            steps = []
            for s in range(num_steps):
                ph = per_rank.get(s, {})
                # Same order on both ends of every pair: the k-th send a->b meets the k-th recv.
                comms = sorted(ph.get("comms", []), key=lambda c: (str(c.channel), c.buf, c.peer))
                steps.append(Step(tuple(ph.get("a2a", [])) + tuple(comms),
                                  tuple(ph.get("computes", [])), tuple(ph.get("merges", []))))
            ranks.append(tuple(steps))
        return tuple(ranks)


class _Ring:
    """One ring of ``members`` (SP ranks in ring order) over head shard ``shard``.

    ``local[i]`` are the chunks member i holds for this ring; steps start at ``first_step``.
    """

    def __init__(self, sched: _Steps, seq: SeqLayout, members: list[int], local: list[tuple[int, ...]],
                 *, shard: int, causal: bool, backward: bool, first_step: int) -> None:
        self.sched, self.seq, self.members, self.local = sched, seq, members, local
        self.shard, self.causal, self.backward, self.s0 = shard, causal, backward, first_step

    def buf(self, kind: str, i: int, chunks: tuple[int, ...], at: int = -1) -> Buf:
        return Buf(kind, self.members[i], chunks, at=at, shard=self.shard)

    def pairs(self, q_chunks, kv_chunks) -> list[tuple[int, int]]:
        return self.seq.needed_pairs(q_chunks, kv_chunks, self.causal)

    def blocks(self, pairs, q_order, kv_order) -> tuple[Block, ...]:
        if self.seq.window is not None:
            return window_blocks(pairs, q_order, kv_order, self.seq)
        return make_blocks(pairs, q_order, kv_order, self.causal)

    def travel(self, move: str, direction: int) -> dict[int, Buf]:
        """``move`` ("q" or "kv") blocks visit every member; returns member -> its dk/dv home (Ring bwd)."""
        q_kind = "qg" if self.backward else "q"
        homes = {}
        for owner in range(len(self.members)):
            for holders, need in self._legs(owner, move, direction):
                pick = (lambda p: {qc for qc, _ in p}) if move == "q" else (lambda p: {kc for _, kc in p})
                moving = [_ordered(pick(p), self.local[owner]) for p in need]
                kind = q_kind if move == "q" else "kv"
                for s in range(len(holders) - 1):  # forward the block with what later holders still need
                    carry = _ordered(set().union(*moving[s + 1:]), self.local[owner])
                    if not carry:
                        break
                    self.sched.p2p(self.s0 + s, self.members[holders[s]], self.members[holders[s + 1]],
                                   self.buf(kind, owner, carry), kind)
                if move == "q":
                    self._q_moving_results(owner, holders, need, moving)
                else:
                    homes[owner] = self._kv_moving_results(owner, holders, need, moving)
        return homes

    def _legs(self, owner: int, move: str, direction: int) -> list[tuple[list[int], list]]:
        """The paths ``owner``'s block takes: ``[(holders, pairs each holder computes)]``, the owner
        first. Without a window: once round the ring in ``direction``. Under a window (more than two
        members) each holder that needs the block is reached the shorter way round, so the block
        travels both ways at once and only as far as its farthest reader on each side (a short
        window under zigzag needs both neighbours); when the two ways would meet, once round."""
        n = len(self.members)

        def need_of(h: int) -> list[tuple[int, int]]:
            if move == "q":
                return self.pairs(self.local[owner], self.local[h])
            return self.pairs(self.local[h], self.local[owner])

        one_way = [(owner + direction * s) % n for s in range(n)]
        if self.seq.window is None or n <= 2:
            return [(one_way, [need_of(h) for h in one_way])]
        side: dict[int, int] = {}
        reach = {1: 0, -1: 0}
        for h in range(n):
            if h == owner or not need_of(h):
                continue
            ahead, back = (h - owner) % n, (owner - h) % n
            d = direction if ahead == back else (1 if ahead < back else -1)
            side[h] = d
            reach[d] = max(reach[d], ahead if d == 1 else back)
        if reach[1] + reach[-1] >= n:  # the two ways would meet: go once round
            return [(one_way, [need_of(h) for h in one_way])]
        legs = []
        for d in (direction, -direction):
            holders = [(owner + d * s) % n for s in range(reach[d] + 1)]
            need = [need_of(owner) if d == direction else []]
            need += [need_of(h) if side.get(h) == d else [] for h in holders[1:]]
            if d == direction or len(holders) > 1:
                legs.append((holders, need))
        return legs

    def _q_moving_results(self, owner: int, holders: list[int], need, moving) -> None:
        """TokenRing: compute at each holder; send each partial straight back one step later."""
        q_kind, part = ("qg", "dq") if self.backward else ("q", "out")
        m, local, s0 = self.members, self.local, self.s0
        acc = self.buf(part, owner, local[owner], at=m[owner])
        for s, h in enumerate(holders):
            if not need[s]:
                continue
            dst = acc if s == 0 else self.buf(part, owner, moving[s], at=m[h])
            kv_used = _ordered({kc for _, kc in need[s]}, local[h])
            self.sched.add(m[h], s0 + s, "computes", Compute(
                self.buf(q_kind, owner, moving[s]), self.buf("kv", h, kv_used),
                self.blocks(need[s], moving[s], local[h]), dst,
                self.buf("dkv", h, local[h], at=m[h]) if self.backward else None, self.head_shard))
            if s > 0:
                self.sched.p2p(s0 + s + 1, m[h], m[owner], dst, part)
                self.sched.add(m[owner], s0 + s + 1, "merges", Merge(dst, acc))

    @property
    def head_shard(self) -> tuple[int, int]:
        return (max(self.shard, 0), self.num_shards)

    num_shards = 1

    def _kv_moving_results(self, owner: int, holders: list[int], need, moving) -> Buf:
        """Ring: outputs accumulate at the query's rank; in backward a dk/dv accumulator trails K/V.

        The owner's own dk/dv contribution stays home; the travelling accumulator starts at the
        first other holder that needs the block, carries only the chunks some other holder
        touched, and is merged at home after the last one. Returns the owner's dk/dv buffer.
        """
        q_kind, part = ("qg", "dq") if self.backward else ("q", "out")
        m, local, s0, n = self.members, self.local, self.s0, len(holders)
        home = self.buf("dkv", owner, local[owner], at=m[owner])
        acc_chunks: list[tuple[int, ...]] = [()]
        seen: set[int] = set()
        for s in range(1, n):
            seen |= set(moving[s])
            acc_chunks.append(_ordered(seen, local[owner]))
        chain = [home] + [self.buf("dkv", owner, acc_chunks[s], at=m[holders[s]]) for s in range(1, n)]
        last = max((s for s in range(1, n) if need[s]), default=0)
        for s, h in enumerate(holders):
            if need[s]:
                q_used = _ordered({qc for qc, _ in need[s]}, local[h])
                self.sched.add(m[h], s0 + s, "computes", Compute(
                    self.buf(q_kind, h, q_used), self.buf("kv", owner, moving[s]),
                    self.blocks(need[s], local[h], moving[s]),
                    self.buf(part, h, local[h], at=m[h]), chain[s] if self.backward else None,
                    self.head_shard))
            if self.backward and 2 <= s <= last and acc_chunks[s - 1]:
                self.sched.p2p(s0 + s, m[holders[s - 1]], m[h], chain[s - 1], "dkv")
                self.sched.add(m[h], s0 + s, "merges", Merge(chain[s - 1], chain[s]))
        if self.backward and last > 0:
            self.sched.p2p(s0 + last + 1, m[holders[last]], m[owner], chain[last], "dkv")
            self.sched.add(m[owner], s0 + last + 1, "merges", Merge(chain[last], home))
        return home


def _direction(strategy: str, layout: str) -> int:
    return -1 if (strategy == "tokenring" and layout == "zigzag") else 1


def _flat(dims: ParallelDims, causal: bool, backward: bool) -> Schedule:
    """TokenRing or Ring over the whole group."""
    n, seq = dims.world_size, dims.seq
    q_kind = "qg" if backward else "q"
    local = [seq.chunks_of(r) for r in range(n)]
    sched = _Steps(n)
    ring = _Ring(sched, seq, list(range(n)), local, shard=-1, causal=causal, backward=backward,
                 first_step=0)
    move = "q" if dims.strategy == "tokenring" else "kv"
    homes = ring.travel(move, _direction(dims.strategy, dims.layout))
    inputs = tuple((Buf(q_kind, r, local[r]), Buf("kv", r, local[r])) for r in range(n))
    outputs = []
    for r in range(n):
        if not backward:
            outputs.append({"out": Buf("out", r, local[r], at=r)})
        else:
            dkv = homes[r] if move == "kv" else Buf("dkv", r, local[r], at=r)
            outputs.append({"dq": Buf("dq", r, local[r], at=r), "dkv": dkv})
    return Schedule(dims.name, dims.layout, causal, backward, n, sched.freeze(), inputs,
                    tuple(outputs), seq, ())


def _hybrid(dims: ParallelDims, causal: bool, backward: bool) -> Schedule:
    """All-to-all over heads inside each group, a ring across groups per head shard, and back.

    Pure Ulysses is one group of every rank (a ring of one). Forward: step 0 all-to-all of q and
    kv; ring steps; all-to-all of out. Backward: all-to-all of dout; pack (q, out, dout) into qg;
    ring steps; all-to-all of dq and dk/dv. The head-sharded q, kv and out of the forward are
    inputs of the backward (the API keeps them).
    """
    n, seq, rep = dims.world_size, dims.seq, dims.kv_repeat
    groups = dims.a2a_groups()
    width = len(groups[0])
    group_chunks = [tuple(sorted(c for m in g for c in seq.chunks_of(m))) for g in groups]
    sched = _Steps(n)
    ring_strategy = "tokenring" if dims.strategy == "ulysses" else dims.strategy
    # backward packs qg in step 1; a ring that sends qg at its first step must start after that
    first = 2 if backward and len(groups) > 1 else 1
    inputs, outputs = [], []
    for r in range(n):
        u, gi = groups_index(groups, r)
        every, mine = group_chunks[gi], seq.chunks_of(r)
        q_h, kv_h = Buf("q", r, every, shard=u), Buf("kv", r, every, shard=u)
        out_h = Buf("out", r, every, at=r, shard=u)
        if not backward:
            sched.add(r, 0, "a2a", AllToAll("q", Direction.SEQ2HEAD))
            sched.add(r, 0, "a2a", AllToAll("kv", Direction.SEQ2HEAD, rep))
            inputs.append((Buf("q", r, mine), Buf("kv", r, mine)))
            outputs.append({"out": Buf("out", r, mine, at=r)})
            continue
        sched.add(r, 0, "a2a", AllToAll("dout", Direction.SEQ2HEAD))
        sched.add(r, 1, "computes", Pack(Buf("qg", r, every, shard=u),
                                         (q_h, out_h, Buf("dout", r, every, shard=u))))
        inputs.append((q_h, kv_h, out_h, Buf("dout", r, mine)))
        outputs.append({"dq": Buf("dq", r, mine, at=r), "dkv": Buf("dkv", r, mine, at=r)})
    for u in range(width):
        members = [g[u] for g in groups]
        ring = _Ring(sched, seq, members, group_chunks, shard=u, causal=causal, backward=backward,
                     first_step=first)
        ring.num_shards = width
        ring.travel("q" if ring_strategy == "tokenring" else "kv", _direction(ring_strategy, dims.layout))
    last = max((max(d) for d in sched.ops if d), default=first)
    for r in range(n):
        kinds = (("dq", 1), ("dkv", rep)) if backward else (("out", 1),)
        for kind, repeat in kinds:
            sched.add(r, last + 1, "a2a", AllToAll(kind, Direction.HEAD2SEQ, repeat))
    return Schedule(dims.name, dims.layout, causal, backward, n, sched.freeze(), tuple(inputs),
                    tuple(outputs), seq, groups)


def groups_index(groups: tuple[tuple[int, ...], ...], rank: int) -> tuple[int, int]:
    """``(index of rank in its group, index of the group)``."""
    for gi, g in enumerate(groups):
        if rank in g:
            return g.index(rank), gi
    raise AssertionError(rank)


@functools.lru_cache(maxsize=256)
def schedule_for(dims: ParallelDims, *, causal: bool, backward: bool) -> Schedule:
    """The schedule of one attention pass for every rank (cached: schedules are pure data)."""
    if dims.uses_a2a:
        return _hybrid(dims, causal, backward)
    return _flat(dims, causal, backward)


def build_schedule(strategy: str, world_size: int, *, layout: str = "zigzag", causal: bool = False,
                   backward: bool = False, num_heads: int | None = None,
                   num_kv_heads: int | None = None, ulysses: int = 1,
                   doc_lens: tuple[int, ...] | None = None, window_size=None,
                   seq_len: int | None = None) -> Schedule:
    """The schedule of one attention pass for every rank.

    ``num_heads``/``num_kv_heads`` matter only when heads are sharded (divisibility, kv
    replication). ``ulysses`` > 1: 2-D hybrid, Ulysses groups of that size and ``strategy`` across
    them (or name the hybrid ``strategy="ulysses<N>+tokenring"``). ``doc_lens``: packed documents
    (document-causal mask, empty blocks skipped). ``window_size``: ``(left, right)`` sliding window
    (flash-attn convention); a dense sequence then needs ``seq_len`` (the global length).
    """
    name, named_ulysses = parse_strategy(strategy)
    if named_ulysses > 1:  # "ulysses8+tokenring": the simulator's and advisor's hybrid names
        if ulysses not in (1, named_ulysses):
            raise UsageError(f"strategy {strategy!r} contradicts ulysses={ulysses}", field="strategy")
        ulysses = named_ulysses
    if ulysses > world_size or world_size % ulysses:
        raise UsageError(f"ulysses size {ulysses} must divide world_size {world_size}", field="ulysses")
    window = normalize_window(window_size, causal)
    if window is not None and not doc_lens and seq_len is None:
        raise UsageError("a sliding window over a dense sequence needs seq_len", field="seq_len")
    dims = ParallelDims(name, world_size, layout=layout, ulysses=ulysses, heads=num_heads,
                        kv_heads=num_kv_heads, doc_lens=tuple(doc_lens) if doc_lens else None,
                        window=window, seq_len=seq_len if window is not None and not doc_lens else None)
    return schedule_for(dims, causal=causal, backward=backward)
