"""Compile a ring-type schedule straight to a :class:`~tokenloom.simulator.lockstep.StepPlan`.

``build_schedule`` materialises one object per (rank, step, op): ~n^2 of them and an n^3 term, so
256 ranks take ~8 s and 1024 ranks minutes before anything is priced. This module produces the
same per (rank, step) kernel seconds and the same transfers as compiling the built schedule
(:func:`~tokenloom.simulator.lockstep.plan_from_schedule`) — tests check equality for every
strategy, layout and mask over many ring sizes — but vectorised over (owner, step) with numpy:

- the builder's rule (``tokenloom.parallel.builders``): a block (queries for TokenRing, keys and
  values for Ring) visits the ring's members in order; holder ``j`` computes the (query chunk,
  key chunk) pairs the mask needs; the block is forwarded with the chunks later holders still
  need (a reverse cumulative OR); TokenRing returns each partial output one step later; Ring's
  backward trails a dk/dv accumulator (a cumulative OR) one step behind and sends it home;
- every duration and size comes from the cost model's own functions on real ``Block``/``Buf``
  objects, once per distinct case: away from the diagonal the kernel depends only on which
  (query, key) chunk pairs are needed (no causal diagonal pairs there, so ``make_blocks`` groups
  by that pattern alone), and each diagonal (owner = holder) step is priced individually.

Only dense (no packed documents) sequences; the 2-D hybrids and pure Ulysses add their
all-to-alls and the backward's ``Pack`` exactly as ``_hybrid`` does.
"""

from __future__ import annotations

import functools

import numpy as np

from tokenloom.parallel.builders import ParallelDims, make_blocks, parse_strategy
from tokenloom.parallel.schedule import AllToAll, Buf, Compute, Direction, Merge, Pack
from tokenloom.simulator.lockstep import ScheduleInfo, StepPlan


class _Acc:
    """Per (rank, step) seconds and transfers, collected as arrays."""

    def __init__(self) -> None:
        self.comp, self.merge, self.flows = [], [], []  # (rank, step, seconds) / (step, src, dst, bytes, coll)
        self.coll_step: list[int] = []
        self.coll_members: list[np.ndarray] = []
        self.ring_secs: dict[tuple, np.ndarray] = {}  # the rings of a hybrid differ only in their shard

    def flow(self, step, src, dst, nbytes, coll=-1) -> None:
        step, src, dst, nbytes = np.broadcast_arrays(step, src, dst, nbytes)
        self.flows.append((step.ravel().astype(np.int64), src.ravel().astype(np.int64),
                           dst.ravel().astype(np.int64), nbytes.ravel().astype(np.float64),
                           np.full(step.size, coll, dtype=np.int64)))


def _counts_bytes(counts: np.ndarray, fn) -> np.ndarray:
    """``fn(count)`` for every distinct count, looked up for all."""
    if not counts.size:
        return np.zeros(counts.shape)
    table = np.array([fn(c) if c else 0.0 for c in range(int(counts.max()) + 1)], dtype=np.float64)
    return table[counts]


def _ring(acc: _Acc, cost, members: np.ndarray, local: np.ndarray, *, move: str, direction: int, causal: bool,
          backward: bool, shard: int, num_shards: int, s0: int) -> None:
    """One ring: members (R,) ranks, local (R, L) chunk ids of each member (``_Ring.travel``)."""
    R, L = local.shape
    q_kind = "qg" if backward else "q"
    part = "dq" if backward else "out"
    st = _structure(local.tobytes(), R, L, move, direction, causal)
    hold, moving, any_need, count, carry = st.hold, st.moving, st.any_need, st.count, st.carry
    m = members
    shard_buf = shard

    def buf_bytes(kind: str, c: int) -> float:
        return cost.buf_bytes(Buf(kind, 0, tuple(range(c)), shard=shard_buf))

    def merge_s(kind: str, c: int) -> float:
        b = Buf(kind, 0, tuple(range(c)), at=1, shard=shard_buf)
        return cost.merge_s(Merge(b, b))

    o_i, s_i = st.carry_at
    kind = q_kind if move == "q" else "kv"
    acc.flow(s0 + s_i, m[hold[o_i, s_i]], m[hold[o_i, s_i + 1]],
             _counts_bytes(carry[o_i, s_i], lambda c: buf_bytes(kind, c)))
    _ring_computes(acc, cost, m, local, st, move=move, causal=causal,
                   q_kind=q_kind, shard=shard, num_shards=num_shards, s0=s0)
    if move == "q":  # partial results go straight home one step later
        o_i, s_i = np.nonzero(any_need[:, 1:])
        s_i = s_i + 1
        nb = _counts_bytes(count[o_i, s_i], lambda c: buf_bytes(part, c))
        acc.flow(s0 + s_i + 1, m[hold[o_i, s_i]], m[o_i], nb)
        acc.merge.append((m[o_i], s0 + s_i + 1, _counts_bytes(count[o_i, s_i], lambda c: merge_s(part, c))))
    elif backward:
        _ring_dkv(acc, m, hold, moving, any_need, buf_bytes, merge_s, s0)


def _ring_dkv(acc: _Acc, m, hold, moving, any_need, buf_bytes, merge_s, s0: int) -> None:
    """Ring backward: the dk/dv accumulator trails K/V and goes home after the last holder."""
    R = hold.shape[0]
    seen = np.logical_or.accumulate(moving[:, 1:], axis=1)  # chunks of moving[1..s]
    acc_cnt = np.concatenate([np.zeros((R, 1), dtype=np.int64), seen.sum(axis=2)], axis=1)  # (R, R)
    steps = np.arange(R)[None, :]
    last = np.where(any_need & (steps >= 1), steps, 0).max(axis=1)  # (R,)
    prev = np.concatenate([np.zeros((R, 1), dtype=np.int64), acc_cnt[:, :-1]], axis=1)  # acc_cnt[s-1]
    chain = (steps >= 2) & (steps <= last[:, None]) & (prev > 0)
    o_i, s_i = np.nonzero(chain)
    acc.flow(s0 + s_i, m[hold[o_i, s_i - 1]], m[hold[o_i, s_i]],
             _counts_bytes(prev[o_i, s_i], lambda c: buf_bytes("dkv", c)))
    acc.merge.append((m[hold[o_i, s_i]], s0 + s_i, _counts_bytes(prev[o_i, s_i], lambda c: merge_s("dkv", c))))
    o_i = np.flatnonzero(last > 0)
    li = last[o_i]
    acc.flow(s0 + li + 1, m[hold[o_i, li]], m[o_i], _counts_bytes(acc_cnt[o_i, li], lambda c: buf_bytes("dkv", c)))
    acc.merge.append((m[o_i], s0 + li + 1, _counts_bytes(acc_cnt[o_i, li], lambda c: merge_s("dkv", c))))


class _Structure:
    """Who holds which block when, and which chunk pairs it needs: the same for every pass and
    head shard of a ring, so built once (cached) and priced per pass."""

    def __init__(self, local: np.ndarray, move: str, direction: int, causal: bool) -> None:
        R, L = local.shape
        self.hold = hold = (np.arange(R)[:, None] + direction * np.arange(R)[None, :]) % R  # (owner, step)
        held = local[hold]  # (R, R, L)
        mine = local[:, None, :]  # owner's chunks
        if not causal:
            self.need = np.ones((R, R, L, L), dtype=bool)
        elif move == "q":  # need[o, s, a, b]: owner's q chunk a sees holder's kv chunk b
            self.need = held[:, :, None, :] <= mine[:, :, :, None]
        else:  # need[o, s, a, b]: holder's q chunk a sees owner's kv chunk b
            self.need = mine[:, :, None, :] <= held[:, :, :, None]
        self.moving = self.need.any(axis=3 if move == "q" else 2)
        self.any_need = self.moving.any(axis=2)
        self.count = self.moving.sum(axis=2)
        # forward the block with what later holders still need (OR over s' > s)
        later = np.logical_or.accumulate(self.moving[:, ::-1], axis=1)[:, ::-1]
        self.carry = later[:, 1:].sum(axis=2)  # (R, R-1): chunks sent at step s = 0..R-2
        self.carry_at = np.nonzero(self.carry)
        self.patterns = None
        if R > 1:  # off the diagonal the kernel depends only on the needed-pair pattern
            off = self.need[:, 1:].reshape(R * (R - 1), L * L)
            keys = np.packbits(off, axis=1)
            if keys.shape[1] <= 8:  # one integer per pattern: a plain sort instead of a row sort
                keys = np.pad(keys, ((0, 0), (0, 8 - keys.shape[1]))).view(np.uint64).ravel()
            _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
            self.patterns = (first, inv.ravel(), off[first].any(axis=1))


@functools.lru_cache(maxsize=4)
def _structure(local_bytes: bytes, R: int, L: int, move: str, direction: int, causal: bool) -> _Structure:
    return _Structure(np.frombuffer(local_bytes, dtype=np.int64).reshape(R, L), move, direction, causal)


def _ring_computes(acc: _Acc, cost, m, local, st: _Structure, *, move, causal, q_kind, shard,
                   num_shards, s0) -> None:
    """Kernel seconds at (holder, step): priced once per needed-pair pattern off the diagonal."""
    hold, need, moving, any_need = st.hold, st.need, st.moving, st.any_need
    R, _, L, _ = need.shape

    def price(o: int, s: int) -> float:
        h = int(hold[o, s])
        a_idx, b_idx = np.nonzero(need[o, s])
        if move == "q":
            qs = local[o]
            kvs = local[h]
            q_order = tuple(int(qs[a]) for a in range(L) if moving[o, s, a])
            pairs = [(int(qs[a]), int(kvs[b])) for a, b in zip(a_idx, b_idx)]
            blocks = make_blocks(pairs, q_order, tuple(int(x) for x in kvs), causal)
            q_src = Buf(q_kind, int(m[o]), q_order, shard=shard)
        else:
            qs = local[h]
            kvs = local[o]
            kv_order = tuple(int(kvs[b]) for b in range(L) if moving[o, s, b])
            pairs = [(int(qs[a]), int(kvs[b])) for a, b in zip(a_idx, b_idx)]
            q_used = tuple(int(x) for x in qs if int(x) in {p[0] for p in pairs})
            blocks = make_blocks(pairs, tuple(int(x) for x in qs), kv_order, causal)
            q_src = Buf(q_kind, int(m[h]), q_used, shard=shard)
        kv = Buf("kv", 0, (0,), shard=shard)
        dst = Buf("dq" if q_kind == "qg" else "out", 0, (0,), at=0, shard=shard)
        return cost.compute_s(Compute(q_src, kv, blocks, dst, None, (max(shard, 0), num_shards)))

    # compute_s reads the head-shard count, not the index: every shard's ring costs the same
    key = (id(st), move, q_kind, shard >= 0, num_shards)
    secs = acc.ring_secs.get(key)
    if secs is None:
        secs = acc.ring_secs[key] = np.zeros((R, R))
        for o in range(R):  # the diagonal: owner = holder (causal diagonal pairs, joined blocks)
            if any_need[o, 0]:
                secs[o, 0] = price(o, 0)
        if st.patterns is not None:
            first, inv, nonempty = st.patterns
            table = np.array([price(int(f) // (R - 1), int(f) % (R - 1) + 1) if ok else 0.0
                              for f, ok in zip(first, nonempty)])
            secs[:, 1:] = table[inv].reshape(R, R - 1)
    o_i, s_i = np.nonzero(any_need)
    acc.comp.append((m[hold[o_i, s_i]], s0 + s_i, secs[o_i, s_i]))


def _direction(strategy: str, layout: str) -> int:
    return -1 if (strategy == "tokenring" and layout == "zigzag") else 1


def compile_ring(strategy: str, world_size: int, cost, *, layout: str, causal: bool, backward: bool,
                 num_heads: int, num_kv_heads: int) -> StepPlan:
    """The :class:`StepPlan` of ``build_schedule(strategy, world_size, ...)`` (dense sequences)."""
    if getattr(cost, "window", None) is not None:  # windowed blocks are priced by chunk distance, not pattern
        raise ValueError("compile_ring prices unwindowed schedules only; use the event engine")
    name, ul = parse_strategy(strategy)
    dims = ParallelDims(name, world_size, layout=layout, ulysses=ul, heads=num_heads, kv_heads=num_kv_heads)
    acc = _Acc()
    n = world_size
    if not dims.uses_a2a:
        seq = dims.seq
        local = np.array([seq.chunks_of(r) for r in range(n)], dtype=np.int64)
        move = "q" if name == "tokenring" else "kv"
        _ring(acc, cost, np.arange(n), local, move=move, direction=_direction(name, layout), causal=causal,
              backward=backward, shard=-1, num_shards=1, s0=0)
    else:
        _hybrid(acc, cost, dims, causal, backward)
    return _finish(acc, dims, causal, backward, n)


def _hybrid(acc: _Acc, cost, dims: ParallelDims, causal: bool, backward: bool) -> None:
    n, seq, rep = dims.world_size, dims.seq, dims.kv_repeat
    groups = np.array(dims.a2a_groups(), dtype=np.int64)  # (G, width)
    width = groups.shape[1]
    local = np.array([sorted(c for r in g for c in seq.chunks_of(int(r))) for g in groups], dtype=np.int64)
    ring_strategy = "tokenring" if dims.strategy == "ulysses" else dims.strategy
    first = 2 if backward and len(groups) > 1 else 1
    ops0 = [AllToAll("dout", Direction.SEQ2HEAD)] if backward else [
        AllToAll("q", Direction.SEQ2HEAD), AllToAll("kv", Direction.SEQ2HEAD, rep)]
    _a2a(acc, cost, groups, 0, ops0)
    if backward:
        every = tuple(int(c) for c in local[0])
        pack = Pack(Buf("qg", 0, every, shard=0), (Buf("q", 0, every, shard=0), Buf("out", 0, every, at=0, shard=0),
                                                    Buf("dout", 0, every, shard=0)))
        acc.comp.append((np.arange(n), np.full(n, 1), np.full(n, cost.compute_s(pack))))
    before = _max_step(acc)
    for u in range(width):
        _ring(acc, cost, groups[:, u], local, move="q" if ring_strategy == "tokenring" else "kv",
              direction=_direction(ring_strategy, dims.layout), causal=causal, backward=backward, shard=u,
              num_shards=width, s0=first)
    last = max(_max_step(acc), before)
    ops = [AllToAll("dq", Direction.HEAD2SEQ), AllToAll("dkv", Direction.HEAD2SEQ, rep)] if backward else [
        AllToAll("out", Direction.HEAD2SEQ)]
    _a2a(acc, cost, groups, last + 1, ops)


def _max_step(acc: _Acc) -> int:
    steps = [int(x[1].max()) for x in acc.comp + acc.merge if len(x[1])]
    steps += [int(f[0].max()) for f in acc.flows if len(f[0])] + acc.coll_step
    return max(steps, default=0)


def _a2a(acc: _Acc, cost, groups: np.ndarray, step: int, ops: list[AllToAll]) -> None:
    width = groups.shape[1]
    i, j = np.nonzero(~np.eye(width, dtype=bool))
    for g in groups:
        for op in ops:
            k = len(acc.coll_step)
            acc.coll_step.append(step)
            acc.coll_members.append(np.sort(g))
            acc.flow(np.full(len(i), step), g[i], g[j], np.full(len(i), cost.a2a_pair_bytes(op)), coll=k)


def _finish(acc: _Acc, dims: ParallelDims, causal: bool, backward: bool, n: int) -> StepPlan:
    steps = _max_step(acc) + 1
    compute, merge = np.zeros((n, steps)), np.zeros((n, steps))
    for rows, cols, secs in acc.comp:
        np.add.at(compute, (rows, cols), secs)
    for rows, cols, secs in acc.merge:
        np.add.at(merge, (rows, cols), secs)
    cat = [np.concatenate([f[i] for f in acc.flows]) if acc.flows else np.zeros(0, dtype=np.int64 if i != 3 else float)
           for i in range(5)]
    step, src, dst, nbytes, coll = cat
    small = np.int16 if steps < (1 << 15) else np.int64  # numpy sorts int16 by radix
    order = np.argsort(step.astype(small), kind="stable")
    step, src, dst, nbytes, coll = (x[order] for x in (step, src, dst, nbytes, coll))
    has_ops = np.zeros((n, steps), dtype=bool)
    has_ops[src, step] = True
    has_ops[dst, step] = True
    for k, members in zip(acc.coll_step, acc.coll_members):
        has_ops[members, k] = True
    info = ScheduleInfo(dims.name, dims.layout, causal, backward, n, steps)
    return StepPlan(info, compute, merge, has_ops, step, src, dst, nbytes, coll,
                    np.asarray(acc.coll_step, dtype=np.int64), acc.coll_members)
