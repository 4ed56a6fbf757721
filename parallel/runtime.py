"""Execute a :class:`~tokenloom.parallel.schedule.Schedule` on this rank.

The runtime makes no decisions: it walks its rank's steps with the four-phase semantics of
``schedule.py`` (post comms, compute, wait, merge), using a :class:`Communicator` for transfers and
:func:`tokenloom.kernels.block_forward` / ``block_backward`` for the blocks.

Buffers live in a dict keyed by :attr:`Buf.key`. Each holds its chunks (global chunk ids, in the
order they sit along the sequence axis) and its fields (:data:`WIRE_FIELDS`): per-token fields are
``(batch, seq, heads, head_dim)``, per-row statistics ``(batch, heads, seq)``. Partial results that
this rank folds into (``out``, ``dq``, ``dkv``) are held in the accumulation dtype (fp32); on the
wire each field travels in the dtype WIRE_FIELDS names ("io": the input dtype, "acc": fp32).
A buffer is freed after its last use in the schedule unless it is an output or asked to be kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from tokenloom.comm.communicator import P2P, Communicator
from tokenloom.comm.topology import chunks_of_rank, global_chunk_order
from tokenloom.kernels import attention_delta, block_backward, block_forward, merge_into_
from tokenloom.kernels.reference import acc_dtype
from tokenloom.parallel.schedule import (
    WIRE_FIELDS,
    AllToAll,
    Buf,
    Compute,
    Merge,
    Pack,
    Recv,
    Schedule,
    Send,
    a2a_bufs,
)

Key = tuple  # Buf.key


@dataclass(frozen=True)
class Dims:
    """Per-rank tensor geometry shared by every buffer of one attention call."""

    batch: int
    chunk: int  # tokens per sequence chunk
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype  # input ("io") dtype
    device: torch.device
    world_size: int
    kv_repeat: int = 1  # Ulysses: kv heads replicated so that they split over the ranks

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.dtype)

    def num_heads(self, head_kind: str, shard: int) -> int:
        if head_kind == "q":
            return self.heads if shard < 0 else self.heads // self.world_size
        if shard < 0:
            return self.kv_heads
        return self.kv_heads * self.kv_repeat // self.world_size

    def wire_dtype(self, dt: str) -> torch.dtype:
        return self.dtype if dt == "io" else self.acc


@dataclass
class Held:
    """A buffer present on this rank."""

    chunks: tuple[int, ...]
    fields: dict[str, torch.Tensor] = field(default_factory=dict)


def seq_dim(width: str) -> int:
    return 1 if width == "d" else 2


def head_dim_of(width: str) -> int:
    return 2 if width == "d" else 1


def _runs(have: tuple[int, ...], want: Iterable[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(pos_in_have, pos_in_want, length)`` mapping ``want`` into ``have``."""
    index = {c: i for i, c in enumerate(have)}
    runs: list[list[int]] = []
    for j, c in enumerate(want):
        if c not in index:
            raise KeyError(f"chunk {c} is not held (held chunks {have})")
        i = index[c]
        if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == j:
            runs[-1][2] += 1
        else:
            runs.append([i, j, 1])
    return [tuple(r) for r in runs]


def select(t: torch.Tensor, dim: int, chunk: int, have: tuple[int, ...], want: tuple[int, ...]
           ) -> torch.Tensor:
    """The rows of ``want`` chunks from ``t`` (which holds ``have``): a view when they are adjacent."""
    runs = _runs(have, want)
    if len(runs) == 1:
        i, _, n = runs[0]
        return t.narrow(dim, i * chunk, n * chunk)
    return torch.cat([t.narrow(dim, i * chunk, n * chunk) for i, _, n in runs], dim=dim)


def place(t: torch.Tensor, dim: int, chunk: int, have: tuple[int, ...], want: tuple[int, ...]):
    """Yield ``(view of t at want's runs, slice of a want-shaped tensor)`` pairs for folding."""
    for i, j, n in _runs(have, want):
        yield t.narrow(dim, i * chunk, n * chunk), (j * chunk, n * chunk)


def alloc(buf: Buf, dims: Dims, *, fill: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for ``buf``'s fields: uninitialised in wire dtypes (to receive into), or, with
    ``fill``, an empty fold destination in the accumulation dtype (zeros, lse = -inf)."""
    length = len(buf.chunks) * dims.chunk
    fields = {}
    for name, head_kind, width, dt in WIRE_FIELDS[buf.kind]:
        h = dims.num_heads(head_kind, buf.shard)
        shape = (dims.batch, length, h, dims.head_dim) if width == "d" else (dims.batch, h, length)
        if not fill:
            fields[name] = torch.empty(shape, dtype=dims.wire_dtype(dt), device=dims.device)
        else:
            value = float("-inf") if name == "lse" else 0.0
            fields[name] = torch.full(shape, value, dtype=dims.acc, device=dims.device)
    return fields


class Runner:
    """Executes one schedule on one rank; reusable across calls with the same geometry."""

    def __init__(self, schedule: Schedule, comm: Communicator, dims: Dims, *, softmax_scale: float | None,
                 impl: str | None = None, keep: Iterable[Key] = ()) -> None:
        if schedule.world_size != comm.world_size:
            raise ValueError(f"schedule is for world_size {schedule.world_size}, the group has "
                             f"{comm.world_size} ranks")
        self.schedule, self.comm, self.dims = schedule, comm, dims
        self.rank = comm.rank
        self.scale, self.impl = softmax_scale, impl
        self.steps = schedule.ranks[self.rank]
        self.outputs = schedule.outputs[self.rank] if schedule.outputs else {}
        self.keep = set(keep) | {b.key for b in self.outputs.values()}
        self.last_use = self._last_use()

    # ------------------------------------------------------------------ bookkeeping
    def _last_use(self) -> dict[Key, int]:
        last: dict[Key, int] = {}
        for s, step in enumerate(self.steps):
            keys: list[Key] = []
            for op in step.comms:
                if isinstance(op, (Send, Recv)):
                    keys.append(op.buf.key)
                else:
                    keys.extend(b.key for b in a2a_bufs(op, self.rank, self.comm.world_size,
                                                        self.schedule.layout))
            for op in step.computes:
                if isinstance(op, Compute):
                    keys += [op.q_src.key, op.kv_src.key, op.dst.key]
                    if op.dst_kv is not None:
                        keys.append(op.dst_kv.key)
                else:
                    keys += [op.dst.key, *(b.key for b in op.srcs)]
            for op in step.merges:
                keys += [op.src.key, op.dst.key]
            for k in keys:
                last[k] = s
        return last

    def _ensure(self, store: dict, buf: Buf) -> Held:
        """The fold destination ``buf``, created empty (zeros, lse = -inf) when absent."""
        held = store.get(buf.key)
        if held is None:
            held = store[buf.key] = Held(buf.chunks, alloc(buf, self.dims, fill=True))
        elif not set(buf.chunks) <= set(held.chunks):
            raise RuntimeError(f"rank {self.rank}: fold into {buf} but only chunks {held.chunks} held")
        return held

    def _get(self, store: dict, buf: Buf) -> Held:
        held = store.get(buf.key)
        if held is None:
            raise RuntimeError(f"rank {self.rank}: buffer {buf} is not here (schedule bug)")
        return held

    # ------------------------------------------------------------------ folds
    def _fold(self, dst: Held, chunks: tuple[int, ...], fields: dict[str, torch.Tensor]) -> None:
        """Fold a partial over ``chunks`` into ``dst``: lse-merge for outputs, sum for grads."""
        c = self.dims.chunk
        if "lse" in fields:
            for (o_view, (j, n)), (l_view, _) in zip(place(dst.fields["out"], 1, c, dst.chunks, chunks),
                                                     place(dst.fields["lse"], 2, c, dst.chunks, chunks)):
                merge_into_(o_view, l_view, fields["out"].narrow(1, j, n), fields["lse"].narrow(2, j, n))
            return
        for name, value in fields.items():
            for view, (j, n) in place(dst.fields[name], 1, c, dst.chunks, chunks):
                view.add_(value.narrow(1, j, n))

    def _compute(self, store: dict, op: Compute) -> None:
        c, d = self.dims.chunk, self.dims
        qs, kvs = self._get(store, op.q_src), self._get(store, op.kv_src)
        dst = self._ensure(store, op.dst)
        dst_kv = self._ensure(store, op.dst_kv) if op.dst_kv is not None else None
        for blk in op.blocks:
            k = select(kvs.fields["k"], 1, c, kvs.chunks, blk.kv_chunks)
            v = select(kvs.fields["v"], 1, c, kvs.chunks, blk.kv_chunks)
            q = select(qs.fields["q"], 1, c, qs.chunks, blk.q_chunks)
            if op.q_src.kind == "q":
                out, lse = block_forward(q, k, v, causal=blk.causal, softmax_scale=self.scale,
                                         impl=self.impl)
                self._fold(dst, blk.q_chunks, {"out": out, "lse": lse})
                continue
            dout = select(qs.fields["dout"], 1, c, qs.chunks, blk.q_chunks)
            lse = select(qs.fields["lse"], 2, c, qs.chunks, blk.q_chunks)
            delta = select(qs.fields["delta"], 2, c, qs.chunks, blk.q_chunks)
            dq, dk, dv = block_backward(dout, q, k, v, lse, delta, causal=blk.causal,
                                        softmax_scale=self.scale, impl=self.impl)
            self._fold(dst, blk.q_chunks, {"dq": dq.to(d.acc)})
            assert dst_kv is not None
            self._fold(dst_kv, blk.kv_chunks, {"dk": dk.to(d.acc), "dv": dv.to(d.acc)})

    def _pack(self, store: dict, op: Pack) -> None:
        by_kind = {b.kind: self._get(store, b) for b in op.srcs}
        q, out, dout = by_kind["q"], by_kind["out"], by_kind["dout"]
        if not (q.chunks == out.chunks == dout.chunks == op.dst.chunks):
            raise RuntimeError(f"rank {self.rank}: pack {op} with mismatched chunks")
        fields = {"q": q.fields["q"], "dout": dout.fields["dout"], "lse": out.fields["lse"],
                  "delta": attention_delta(out.fields["out"], dout.fields["dout"])}
        store[op.dst.key] = Held(op.dst.chunks, fields)

    # ------------------------------------------------------------------ all-to-all (Ulysses)
    def _a2a_post(self, store: dict, op: AllToAll) -> tuple:
        n, d = self.comm.world_size, self.dims
        src_buf, dst_buf = a2a_bufs(op, self.rank, n, self.schedule.layout)
        src = self._get(store, src_buf)
        order = global_chunk_order(n, self.schedule.layout)
        every = tuple(range(len(order)))
        handles, pending = [], []
        for name, head_kind, width, dt in WIRE_FIELDS[op.kind]:
            t = src.fields[name].to(d.wire_dtype(dt))
            hd, sd = head_dim_of(width), seq_dim(width)
            if op.direction == "seq2head":
                if head_kind == "kv" and op.kv_repeat > 1:
                    t = t.repeat_interleave(op.kv_repeat, dim=hd)
                x = t.unflatten(hd, (n, t.shape[hd] // n)).movedim(hd, 0).contiguous()
            else:  # head2seq: rank j gets its own chunks of this head shard
                x = torch.stack([select(t, sd, d.chunk, every, chunks_of_rank(j, n, self.schedule.layout))
                                 for j in range(n)]).contiguous()
            y = torch.empty_like(x)
            handles.append(self.comm.all_to_all(y, x, what=f"all_to_all {name}"))
            pending.append((name, head_kind, width, y))
        return handles, pending, dst_buf, op

    def _a2a_finish(self, store: dict, state) -> None:
        handles, pending, dst_buf, op = state
        n, d = self.comm.world_size, self.dims
        for h in handles:
            h.wait()
        fields = {}
        for name, head_kind, width, y in pending:
            hd, sd = head_dim_of(width), seq_dim(width)
            if op.direction == "seq2head":  # y[j] holds rank j's chunks; put them in global order
                parts = [y[j].narrow(sd, i * d.chunk, d.chunk)
                         for j, i in global_chunk_order(n, self.schedule.layout)]
                fields[name] = torch.cat(parts, dim=sd)
            else:  # y[j] holds head shard j of my chunks
                t = y.movedim(0, hd).flatten(hd, hd + 1)
                if head_kind == "kv" and op.kv_repeat > 1:
                    t = t.unflatten(hd, (t.shape[hd] // op.kv_repeat, op.kv_repeat)).sum(hd + 1)
                fields[name] = t
        store[dst_buf.key] = Held(dst_buf.chunks, fields)

    # ------------------------------------------------------------------ the walk
    def run(self, store: dict[Key, Held]) -> dict[Key, Held]:
        """Walk this rank's steps over ``store`` (inputs in, outputs and kept buffers out)."""
        for s, step in enumerate(self.steps):
            try:
                self._step(store, s, step)
            except Exception as exc:
                lines = self.schedule.describe(mark=(self.rank, s)).splitlines()
                mine = [ln for ln in lines[1:] if ln.startswith(f"  r{self.rank} ")]
                exc.add_note(f"tokenloom: rank {self.rank} failed in step {s} of\n"
                             + "\n".join([lines[0], *mine]))
                raise
        return store

    def _step(self, store: dict, s: int, step) -> None:
        d = self.dims
        ops, recvs, a2a = [], [], []
        for op in step.comms:
            if isinstance(op, Send):
                held = self._get(store, op.buf)
                for name, _, width, dt in WIRE_FIELDS[op.buf.kind]:
                    t = select(held.fields[name], seq_dim(width), d.chunk, held.chunks, op.buf.chunks)
                    ops.append(P2P("send", op.peer, t.to(d.wire_dtype(dt)).contiguous()))
            elif isinstance(op, Recv):
                fields = alloc(op.buf, d)
                ops.extend(P2P("recv", op.peer, t) for t in fields.values())
                recvs.append((op.buf, fields))
            else:
                a2a.append(self._a2a_post(store, op))
        handle = self.comm.batch_p2p(ops, what=f"step {s} p2p") if ops else None
        for op in step.computes:
            if isinstance(op, Compute):
                self._compute(store, op)
            else:
                self._pack(store, op)
        if handle is not None:
            handle.wait()
        for buf, fields in recvs:
            store[buf.key] = Held(buf.chunks, fields)
        for state in a2a:
            self._a2a_finish(store, state)
        for m in step.merges:
            self._merge(store, m)
        for key in [k for k, last in self.last_use.items() if last == s and k not in self.keep]:
            store.pop(key, None)

    def _merge(self, store: dict, m: Merge) -> None:
        src = self._get(store, m.src)
        dst = self._ensure(store, m.dst)
        self._fold(dst, src.chunks, src.fields)

    # ------------------------------------------------------------------ outputs
    def output(self, store: dict, kind: str, name: str) -> torch.Tensor:
        """Field ``name`` of output ``kind`` over this rank's local chunks (empty parts filled)."""
        buf = self.outputs[kind]
        return extract(store, buf, name, self.dims, self.schedule.layout)


def extract(store: dict, buf: Buf, name: str, dims: Dims, layout: str) -> torch.Tensor:
    """Field ``name`` of ``buf`` laid out over ``buf.chunks``; chunks never written are 0 (lse -inf)."""
    held = store.get(buf.key)
    if held is not None and held.chunks == tuple(buf.chunks):
        return held.fields[name]
    spec = {f[0]: f for f in WIRE_FIELDS[buf.kind]}[name]
    width = spec[2]
    out = alloc(buf, dims, fill=True)[name]
    if held is not None:
        present = tuple(c for c in buf.chunks if c in held.chunks)
        src = select(held.fields[name], seq_dim(width), dims.chunk, held.chunks, present)
        for view, (j, n) in place(out, seq_dim(width), dims.chunk, tuple(buf.chunks), present):
            view.copy_(src.narrow(seq_dim(width), j, n))
    return out
