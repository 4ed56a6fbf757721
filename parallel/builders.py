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
"""

from __future__ import annotations

import math
from collections import defaultdict

from tokenloom.comm.topology import (
    causal_pair_kind,
    check_layout,
    chunks_of_rank,
    num_chunks,
)
from tokenloom.parallel.schedule import (
    AllToAll,
    Block,
    Buf,
    Compute,
    Merge,
    Pack,
    Recv,
    Schedule,
    Send,
    Step,
)

STRATEGIES = ("tokenring", "ring", "ulysses")


def needed_pairs(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], causal: bool
                 ) -> list[tuple[int, int]]:
    """(query chunk, key chunk) pairs with at least one visible key."""
    return [(qc, kc) for qc in q_chunks for kc in kv_chunks
            if not causal or causal_pair_kind(qc, kc) != "none"]


def _ordered(chunks: set[int], order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(c for c in order if c in chunks)


def make_blocks(pairs: list[tuple[int, int]], q_order: tuple[int, ...], kv_order: tuple[int, ...],
                causal: bool) -> tuple[Block, ...]:
    """Group pairs into as few kernel calls as the masks allow.

    Each query chunk takes its key chunks in buffer order; a causal list must be
    ``full..., diag`` so that one bottom-right causal mask covers it. Query chunks with the same
    all-visible key list share one call.
    """
    by_q: dict[int, list[int]] = defaultdict(list)
    for qc, kc in pairs:
        by_q[qc].append(kc)
    groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
    for qc in q_order:
        if qc not in by_q:
            continue
        kvs = _ordered(set(by_q[qc]), kv_order)
        kinds = [causal_pair_kind(qc, kc) if causal else "full" for kc in kvs]
        is_causal = kinds[-1] == "diag"
        assert all(k == "full" for k in kinds[:-1]), (qc, kvs, kinds)
        groups.setdefault((kvs, is_causal), []).append(qc)
    blocks = []
    for (kvs, is_causal), qcs in groups.items():
        if is_causal:
            blocks.extend(Block((qc,), kvs, True) for qc in qcs)
        else:
            blocks.append(Block(tuple(qcs), kvs, False))
    return tuple(blocks)


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
                comms = sorted(ph.get("comms", []), key=lambda c: (c.channel, c.buf, c.peer))
                steps.append(Step(tuple(comms), tuple(ph.get("computes", [])),
                                  tuple(ph.get("merges", []))))
            ranks.append(tuple(steps))
        return tuple(ranks)


def _traveling(world_size: int, layout: str, causal: bool, backward: bool, move: str) -> Schedule:
    """Ring-style schedule where ``move`` ("q" or "kv") blocks visit every rank."""
    n = world_size
    q_kind = "qg" if backward else "q"
    direction = -1 if (move == "q" and layout == "zigzag") else 1
    local = [chunks_of_rank(r, n, layout) for r in range(n)]
    sched = _Steps(n)
    dkv_home: dict[int, Buf] = {}  # Ring backward: where each rank's dk/dv ends up
    for owner in range(n):
        holders = [(owner + direction * s) % n for s in range(n)]
        if move == "q":
            need = [needed_pairs(local[owner], local[h], causal) for h in holders]
            moving = [_ordered({qc for qc, _ in p}, local[owner]) for p in need]
        else:
            need = [needed_pairs(local[h], local[owner], causal) for h in holders]
            moving = [_ordered({kc for _, kc in p}, local[owner]) for p in need]
        kind = q_kind if move == "q" else "kv"
        for s in range(n - 1):  # forward the block with what later holders still need
            carry = _ordered(set().union(*moving[s + 1:]), local[owner])
            if not carry:
                break
            sched.p2p(s, holders[s], holders[s + 1], Buf(kind, owner, carry), kind)
        if move == "q":
            _q_moving_results(sched, owner, holders, need, moving, local, backward, causal)
        else:
            dkv_home[owner] = _kv_moving_results(sched, owner, holders, need, moving, local,
                                                 backward, causal)
    inputs = tuple((Buf(q_kind, r, local[r]), Buf("kv", r, local[r])) for r in range(n))
    outputs = []
    for r in range(n):
        if not backward:
            outputs.append({"out": Buf("out", r, local[r], at=r)})
        elif move == "q":
            outputs.append({"dq": Buf("dq", r, local[r], at=r), "dkv": Buf("dkv", r, local[r], at=r)})
        else:
            outputs.append({"dq": Buf("dq", r, local[r], at=r), "dkv": dkv_home[r]})
    strategy = "tokenring" if move == "q" else "ring"
    return Schedule(strategy, layout, causal, backward, n, sched.freeze(), inputs, tuple(outputs))


def _q_moving_results(sched: _Steps, owner: int, holders: list[int], need, moving, local,
                      backward: bool, causal: bool) -> None:
    """TokenRing: compute at each holder; send each partial straight back one step later."""
    q_kind, part = ("qg", "dq") if backward else ("q", "out")
    acc = Buf(part, owner, local[owner], at=owner)
    for s, h in enumerate(holders):
        if not need[s]:
            continue
        dst = acc if s == 0 else Buf(part, owner, moving[s], at=h)
        kv_used = _ordered({kc for _, kc in need[s]}, local[h])
        sched.add(h, s, "computes", Compute(
            Buf(q_kind, owner, moving[s]), Buf("kv", h, kv_used),
            make_blocks(need[s], moving[s], local[h], causal), dst,
            Buf("dkv", h, local[h], at=h) if backward else None))
        if s > 0:
            sched.p2p(s + 1, h, owner, dst, part)
            sched.add(owner, s + 1, "merges", Merge(dst, acc))


def _kv_moving_results(sched: _Steps, owner: int, holders: list[int], need, moving, local,
                       backward: bool, causal: bool) -> Buf:
    """Ring: outputs accumulate at the query's rank; in backward a dk/dv accumulator trails K/V.

    The owner's own dk/dv contribution stays home; the travelling accumulator starts at the first
    other holder that needs the block, carries only the chunks some other holder touched, and is
    merged at home after the last one. Returns the buffer in which the owner's dk/dv end up.
    """
    q_kind, part = ("qg", "dq") if backward else ("q", "out")
    n = len(holders)
    home = Buf("dkv", owner, local[owner], at=owner)
    acc_chunks: list[tuple[int, ...]] = [()]
    seen: set[int] = set()
    for s in range(1, n):
        seen |= set(moving[s])
        acc_chunks.append(_ordered(seen, local[owner]))
    chain = [home] + [Buf("dkv", owner, acc_chunks[s], at=holders[s]) for s in range(1, n)]
    last = max((s for s in range(1, n) if need[s]), default=0)
    for s, h in enumerate(holders):
        if need[s]:
            q_used = _ordered({qc for qc, _ in need[s]}, local[h])
            sched.add(h, s, "computes", Compute(
                Buf(q_kind, h, q_used), Buf("kv", owner, moving[s]),
                make_blocks(need[s], local[h], moving[s], causal),
                Buf(part, h, local[h], at=h), chain[s] if backward else None))
        if backward and 2 <= s <= last and acc_chunks[s - 1]:
            sched.p2p(s, holders[s - 1], h, chain[s - 1], "dkv")
            sched.add(h, s, "merges", Merge(chain[s - 1], chain[s]))
    if backward and last > 0:
        sched.p2p(last + 1, holders[last], owner, chain[last], "dkv")
        sched.add(owner, last + 1, "merges", Merge(chain[last], home))
    return home


def _ulysses(world_size: int, layout: str, causal: bool, backward: bool,
             num_heads: int | None, num_kv_heads: int | None) -> Schedule:
    n = world_size
    kv_repeat = 1
    if num_heads is not None:
        if num_heads % n:
            raise ValueError(f"ulysses needs heads ({num_heads}) divisible by world_size ({n}); "
                             f"use strategy 'tokenring' or 'ring', or a world size dividing {num_heads}")
        hkv = num_kv_heads or num_heads
        if num_heads % hkv:
            raise ValueError(f"heads ({num_heads}) must be a multiple of kv heads ({hkv})")
        kv_repeat = n // math.gcd(hkv, n)  # replicate kv heads until they split evenly
    every = tuple(range(num_chunks(n, layout)))
    local = [chunks_of_rank(r, n, layout) for r in range(n)]
    blocks = (Block(every, every, causal),)
    ranks, inputs, outputs = [], [], []
    for r in range(n):
        q_h, kv_h = Buf("q", r, every, shard=r), Buf("kv", r, every, shard=r)
        out_h = Buf("out", r, every, at=r, shard=r)
        if not backward:
            ranks.append((
                Step((AllToAll("q", "seq2head"), AllToAll("kv", "seq2head", kv_repeat))),
                Step((), (Compute(q_h, kv_h, blocks, out_h, None, (r, n)),)),
                Step((AllToAll("out", "head2seq"),)),
            ))
            inputs.append((Buf("q", r, local[r]), Buf("kv", r, local[r])))
            outputs.append({"out": Buf("out", r, local[r], at=r)})
            continue
        qg_h = Buf("qg", r, every, shard=r)
        ranks.append((
            Step((AllToAll("dout", "seq2head"),)),
            Step((), (Pack(qg_h, (q_h, out_h, Buf("dout", r, every, shard=r))),
                      Compute(qg_h, kv_h, blocks, Buf("dq", r, every, at=r, shard=r),
                              Buf("dkv", r, every, at=r, shard=r), (r, n)))),
            Step((AllToAll("dq", "head2seq"), AllToAll("dkv", "head2seq", kv_repeat))),
        ))
        inputs.append((q_h, kv_h, out_h, Buf("dout", r, local[r])))
        outputs.append({"dq": Buf("dq", r, local[r], at=r), "dkv": Buf("dkv", r, local[r], at=r)})
    return Schedule("ulysses", layout, causal, backward, n, tuple(ranks), tuple(inputs), tuple(outputs))


def build_schedule(strategy: str, world_size: int, *, layout: str = "zigzag", causal: bool = False,
                   backward: bool = False, num_heads: int | None = None,
                   num_kv_heads: int | None = None) -> Schedule:
    """The schedule of one attention pass for every rank.

    ``num_heads``/``num_kv_heads`` matter only to Ulysses (divisibility, kv replication).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if strategy == "ulysses":
        return _ulysses(world_size, layout, causal, backward, num_heads, num_kv_heads)
    return _traveling(world_size, layout, causal, backward, "q" if strategy == "tokenring" else "kv")
