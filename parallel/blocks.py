"""Which (query chunk, key chunk) pairs go into which kernel call: the blocks of a Compute.

Pure functions of chunk ids and the sequence layout, used by the schedule builders
(:mod:`tokenloom.parallel.builders`) and the simulator's fast ring pricing.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import product

from tokenloom.comm.topology import causal_pair_kind
from tokenloom.parallel.layout import SeqLayout
from tokenloom.parallel.schedule import Block


def ordered(chunks: set[int], order: tuple[int, ...]) -> tuple[int, ...]:
    """``chunks`` in the order ``order`` lists them."""
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
        kvs = ordered(set(by_q[qc]), kv_order)
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
    return _join_diagonals(blocks)


def window_blocks(pairs: list[tuple[int, int]], q_order: tuple[int, ...], kv_order: tuple[int, ...],
                  seq: SeqLayout) -> tuple[Block, ...]:
    """Blocks under a sliding window: pairs the window shows whole are grouped as in
    :func:`make_blocks` (no mask); pairs it shows in part become ``masked`` blocks, one per run
    (:func:`_masked_runs`)."""
    full = [(qc, kc) for qc, kc in pairs if seq.pair_kind(qc, kc) == "full"]
    partial = [(qc, kc) for qc, kc in pairs if seq.pair_kind(qc, kc) == "partial"]
    blocks = list(make_blocks(full, q_order, kv_order, False)) if full else []
    order_q = {c: i for i, c in enumerate(q_order)}
    runs = _masked_runs(partial, q_order, kv_order, seq)
    return tuple(blocks + sorted(runs, key=lambda b: (order_q[b.q_chunks[0]], b.kv_chunks)))


def _masked_runs(partial: list[tuple[int, int]], q_order: tuple[int, ...], kv_order: tuple[int, ...],
                 seq: SeqLayout) -> list[Block]:
    """Partly visible pairs joined into one masked block where they touch: a diagonal pair, the
    pair below it and the next diagonal (chunks c, c+1 held side by side, as the middle rank of a
    zigzag ring holds them) are one band of consecutive positions, which one windowed kernel call
    covers with a single pass of query tiles. Separately each was a call of its own, and the small
    corner pair (c+1, c) cost ~1.9x per visible pair what the diagonal did (fewer rows per call):
    on 2 ranks at S=16K, window 1K that made rank 1 14% slower than rank 0 for 6.7% more pairs.

    A group of pairs that share a chunk becomes one block when its query chunks and its key chunks
    are each consecutive ids lying side by side in their buffers, and every other pair of the
    rectangle is hidden (not shown whole: that pair is an unmasked block's; not partly visible
    but computed by another op); the rectangle's hidden pairs cost nothing
    (the windowed kernels visit only the key range each query tile sees). Otherwise, one block per pair.
    """
    groups: list[tuple[set[int], set[int], list[tuple[int, int]]]] = []
    for qc, kc in partial:
        touching = [g for g in groups if qc in g[0] or kc in g[1]]
        merged = (set().union({qc}, *(g[0] for g in touching)), set().union({kc}, *(g[1] for g in touching)),
                  [(qc, kc)] + [p for g in touching for p in g[2]])
        groups = [g for g in groups if not any(g is t for t in touching)] + [merged]
    blocks = []
    for qs, ks, members in groups:
        q_run, k_run = _run(qs, q_order), _run(ks, kv_order)
        if (len(members) > 1 and q_run and k_run
                and all(p in members or seq.pair_kind(*p) == "none" for p in product(q_run, k_run))):
            blocks.append(Block(q_run, k_run, False, masked=True))
        else:
            blocks.extend(Block((qc,), (kc,), False, masked=True) for qc, kc in members)
    return blocks


def _run(chunks: set[int], order: tuple[int, ...]) -> tuple[int, ...] | None:
    """``chunks`` as consecutive ids in ascending order, side by side in ``order``; else None."""
    run = tuple(sorted(chunks))
    if run != tuple(range(run[0], run[0] + len(run))):
        return None
    at = order.index(run[0])
    return run if order[at:at + len(run)] == run else None


def _join_diagonals(blocks: list[Block]) -> tuple[Block, ...]:
    """Merge causal blocks ``q=(c,), kv=P+(c,)`` and ``q=(c+1,), kv=P+(c, c+1)`` into one causal
    block ``q=(c, c+1), kv=P+(c, c+1)``: bottom-right alignment over the concatenation is exactly
    the pair mask then, and one kernel call replaces several (a whole Ulysses pass is one)."""
    out: list[Block] = []
    for blk in blocks:
        prev = out[-1] if out else None
        qc = blk.q_chunks[0] if blk.causal else None
        if (prev is not None and prev.causal and blk.causal and qc == prev.q_chunks[-1] + 1
                and blk.kv_chunks == prev.kv_chunks + (qc,)):
            out[-1] = Block(prev.q_chunks + (qc,), blk.kv_chunks, True)
        else:
            out.append(blk)
    return tuple(out)
