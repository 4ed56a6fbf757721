"""Walks a decode schedule (:mod:`tokenloom.parallel.decode_schedule`) with a Communicator and the
block kernels. It decides nothing: chunk lengths come from the agreed sizes, the schedule says what
to send, attend and merge. Step semantics as in :mod:`tokenloom.parallel.schedule`: post every comm
of the step, run the computes, wait, run the merges. Partials travel in the accumulation dtype
(fp32, fp64 for fp64 inputs) so that merging on another rank loses nothing. Keys and values are
``(batch, kv_heads, seq, head_dim)`` views here, of either storage order the cache keeps
(:mod:`tokenloom.parallel.kv_cache`); on the wire they travel in the order the CPU fp32/fp64 cache
stores them, keys-last (:attr:`Shape.keys_last_wire`, decided by agreed values only), so a shard
leaves as a plain copy of its rows, not a transpose. Queries and outputs BSHD, lse
``(batch, heads, seq)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokenloom import kernels
from tokenloom.kernels.decode import cache_block
from tokenloom.comm.communicator import P2P, Communicator
from tokenloom.kernels.reference import acc_dtype
from tokenloom.parallel.kv_cache import keys_last_default
from tokenloom.parallel.schedule import Buf, Compute, Recv, Schedule, Send

Key = tuple


@dataclass
class Held:
    """A buffer on this rank: its chunks (in buffer order) and its tensors."""

    chunks: tuple[int, ...]
    tensors: dict[str, torch.Tensor]


@dataclass
class Shape:
    """Sizes every rank agreed on: chunk lengths and the tensor dims."""

    lens: dict[int, int]
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    impl: str | None
    softcap: float | None = None
    left: int = -1  # a causal sliding window's left reach (-1: none); kv buffers then carry "pos"
    start: int = 0  # position of the call's first new token

    @property
    def keys_last_wire(self) -> bool:
        """K and V travel ``(batch, kv_heads, head_dim, seq)`` where the cache stores them so by
        default (the dtype is agreed, and every rank of a group is on one device type)."""
        return keys_last_default(self.device, self.dtype)

    def wire(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` as it travels: K/V keys-last when :attr:`keys_last_wire` (a view; the sender
        makes it contiguous, a received buffer already is)."""
        return t.transpose(-1, -2) if name in ("k", "v") and self.keys_last_wire else t

    def q_position(self, chunks: tuple[int, ...]) -> int:
        """Position of the first row of a query buffer (its parts are consecutive new tokens)."""
        n = len(self.lens) // 2
        return self.start + sum(self.lens[n + j] for j in range(chunks[0] - n))

    def offsets(self, chunks: tuple[int, ...]) -> dict[int, tuple[int, int]]:
        out, at = {}, 0
        for c in chunks:
            out[c] = (at, at + self.lens[c])
            at += self.lens[c]
        return out

    def length(self, chunks: tuple[int, ...]) -> int:
        return sum(self.lens[c] for c in chunks)


@dataclass
class Timing:
    """Seconds this rank spent attending (computes and merges) and waiting for transfers."""

    attention_s: float = 0.0
    comm_s: float = 0.0  # the schedule's transfers plus the argument all-gather and output gather
    agree_s: float = 0.0  # of comm_s: the one all-gather that agrees the arguments
    strategy: str = ""  # the strategy that ran (after "auto")
    steps: list[tuple[float, float]] = field(default_factory=list)


def _alloc(buf: Buf, sh: Shape) -> dict[str, torch.Tensor]:
    n = sh.length(buf.chunks)
    acc = acc_dtype(sh.dtype)
    if buf.kind == "q":
        return {"q": torch.empty(sh.batch, n, sh.heads, sh.head_dim, dtype=sh.dtype, device=sh.device)}
    if buf.kind == "kv":
        shape = ((sh.batch, sh.kv_heads, sh.head_dim, n) if sh.keys_last_wire
                 else (sh.batch, sh.kv_heads, n, sh.head_dim))
        kv = {name: sh.wire(name, torch.empty(shape, dtype=sh.dtype, device=sh.device))
              for name in ("k", "v")}  # (batch, kv_heads, n, head_dim) views either way
        if sh.left >= 0:
            kv["pos"] = torch.empty(n, dtype=torch.int64, device=sh.device)
        return kv
    assert buf.kind == "out", buf
    return {"out": torch.zeros(sh.batch, n, sh.heads, sh.head_dim, dtype=acc, device=sh.device),
            "lse": torch.full((sh.batch, sh.heads, n), float("-inf"), dtype=acc, device=sh.device)}


def _rows(t: torch.Tensor, name: str, a: int, b: int) -> torch.Tensor:
    if name == "pos":
        return t[a:b]
    return t[:, :, a:b] if name in ("lse", "k", "v") else t[:, a:b]


class DecodeRunner:
    """Runs ``schedule`` for this rank. ``store`` maps buffer keys to :class:`Held` inputs."""

    def __init__(self, schedule: Schedule, comm: Communicator, shape: Shape) -> None:
        self.sched, self.comm, self.shape = schedule, comm, shape
        self.timing = Timing()

    def run(self, store: dict[Key, Held], first: int = 0, stop: int | None = None
            ) -> dict[Key, Held]:
        """Run steps ``first`` .. ``stop - 1`` (all by default) of this rank."""
        rank = self.comm.rank
        steps = self.sched.ranks[rank]
        for s in range(first, len(steps) if stop is None else min(stop, len(steps))):
            step = steps[s]
            t0 = time.perf_counter()
            ops, landing = self._post(store, step.comms)
            handle = self.comm.batch_p2p(ops, what=f"{self.sched.strategy} step {s}") if ops else None
            t1 = time.perf_counter()
            for op in step.computes:
                assert isinstance(op, Compute), op
                self._compute(store, op)
            t2 = time.perf_counter()
            if handle is not None:
                handle.wait()
            t3 = time.perf_counter()
            store.update(landing)
            for m in step.merges:
                self._fold(store, m.dst, store[m.src.key].chunks, store[m.src.key].tensors)
            t4 = time.perf_counter()
            att, com = (t2 - t1) + (t4 - t3), (t1 - t0) + (t3 - t2)
            self.timing.attention_s += att
            self.timing.comm_s += com
            self.timing.steps.append((att, com))
        return store

    def _post(self, store: dict, comms) -> tuple[list[P2P], dict[Key, Held]]:
        ops: list[P2P] = []
        landing: dict[Key, Held] = {}
        for op in comms:
            if isinstance(op, Send):
                held = store[op.buf.key]
                for name, t in self._slice(held, op.buf.chunks).items():
                    if t.numel():
                        ops.append(P2P("send", op.peer, self.shape.wire(name, t).contiguous()))
            else:
                assert isinstance(op, Recv), op
                tensors = _alloc(op.buf, self.shape)
                landing[op.buf.key] = Held(op.buf.chunks, tensors)
                ops.extend(P2P("recv", op.peer, self.shape.wire(name, t))
                           for name, t in tensors.items() if t.numel())
        return ops, landing

    def _slice(self, held: Held, chunks: tuple[int, ...]) -> dict[str, torch.Tensor]:
        offs = self.shape.offsets(held.chunks)
        a, b = offs[chunks[0]][0], offs[chunks[-1]][1]
        return {name: _rows(t, name, a, b) for name, t in held.tensors.items()}

    def _compute(self, store: dict, op: Compute) -> None:
        q_held, kv_held = store[op.q_src.key], store[op.kv_src.key]
        sh = self.shape
        q_offs, kv_offs = sh.offsets(q_held.chunks), sh.offsets(kv_held.chunks)
        calls = _calls(op.blocks, q_offs, kv_offs)
        rows = sh.length(q_held.chunks)
        whole = (len(calls) == 1 and calls[0][0] == (0, rows) and sh.length(op.dst.chunks) == rows)
        if op.dst.key not in store and not whole:  # exists (empty) even when every block is empty
            store[op.dst.key] = Held(op.dst.chunks, _alloc(op.dst, sh))
        q0, pos = sh.q_position(q_held.chunks), kv_held.tensors.get("pos")
        for (qa, qb), (ka, kb), causal in calls:
            out, lse = cache_block(q_held.tensors["q"][:, qa:qb], kv_held.tensors["k"][:, :, ka:kb],
                                   kv_held.tensors["v"][:, :, ka:kb], causal=causal, scale=sh.scale,
                                   impl=sh.impl, softcap=sh.softcap, q_pos=q0 + qa,
                                   k_pos=None if pos is None else pos[ka:kb], left=sh.left)
            if whole and op.dst.key not in store:  # one call fills a new buffer: no merge, no copy
                store[op.dst.key] = Held(op.dst.chunks, {"out": out, "lse": lse})
                continue
            self._fold_rows(store[op.dst.key], op.dst, q_offs, qa, qb, out, lse)

    def _fold_rows(self, dst: Held, buf: Buf, q_offs, qa: int, qb: int, out, lse) -> None:
        """Merge a partial for rows ``[qa, qb)`` of the query buffer into ``dst`` (same chunks
        order as the query buffer for the chunks it covers)."""
        chunks = tuple(c for c, (a, b) in q_offs.items() if a >= qa and b <= qb and b > a)
        if not chunks:
            return
        acc = self._slice(dst, chunks)
        kernels.merge_into_(acc["out"], acc["lse"], out, lse)

    def _fold(self, store: dict, dst: Buf, chunks: tuple[int, ...], part: dict[str, torch.Tensor]) -> None:
        """LSE-merge a partial over ``chunks`` into ``dst`` (created empty on first use)."""
        if dst.key not in store:
            store[dst.key] = Held(dst.chunks, _alloc(dst, self.shape))
        acc = self._slice(store[dst.key], chunks)
        if acc["out"].shape[1]:
            kernels.merge_into_(acc["out"], acc["lse"], part["out"], part["lse"])


def _calls(blocks, q_offs: dict, kv_offs: dict) -> list[tuple[tuple[int, int], tuple[int, int], bool]]:
    """Kernel calls for ``blocks`` as row ranges: empty blocks dropped, a one-token causal block is
    a full one, and full blocks of the same query rows over adjacent keys are one call (a decode
    step's cached block and its new token: one read of the shard)."""
    calls: list[list] = []
    for blk in blocks:
        qa, qb = q_offs[blk.q_chunks[0]][0], q_offs[blk.q_chunks[-1]][1]
        ka, kb = kv_offs[blk.kv_chunks[0]][0], kv_offs[blk.kv_chunks[-1]][1]
        if qa == qb or ka == kb:
            continue
        causal = blk.causal and qb - qa > 1
        last = calls[-1] if calls else None
        if last and not causal and not last[2] and last[0] == (qa, qb) and last[1][1] == ka:
            last[1] = (last[1][0], kb)
        else:
            calls.append([(qa, qb), (ka, kb), causal])
    return [(c[0], c[1], c[2]) for c in calls]
