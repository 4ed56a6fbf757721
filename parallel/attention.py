"""Public sequence-parallel attention API: TokenRing, Ring, Ulysses, and ``sp_attention``.

Every function takes this rank's part of the sequence, ``(batch, seq_local, heads, head_dim)``
(see :func:`shard_sequence`), and returns this rank's part of the output, differentiable with
respect to q, k and v. The global sequence is ``seq_local * world_size`` tokens cut into equal
chunks: one per rank (``layout="contiguous"``) or two per rank (``"zigzag"``: rank r holds chunks
r and 2N-1-r, which balances causal work).

One call = one forward schedule (and one backward schedule when gradients flow), built by
:mod:`tokenloom.parallel.builders` and executed by :mod:`tokenloom.parallel.runtime`. Before any
point-to-point transfer the ranks agree on shapes, dtype and options (one tiny all-gather), so
mismatched inputs raise a ValueError naming the ranks instead of hanging.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from tokenloom.comm.communicator import Communicator
from tokenloom.comm.topology import (
    check_layout,
    chunk_len,
    chunks_of_rank,
    global_chunk_order,
    num_chunks,
)
from tokenloom.kernels.reference import attention_delta, check_qkv
from tokenloom.parallel.builders import STRATEGIES, build_schedule
from tokenloom.parallel.runtime import Dims, Held, Runner
from tokenloom.parallel.schedule import Buf, Schedule

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@functools.lru_cache(maxsize=256)
def _schedule(strategy: str, world_size: int, layout: str, causal: bool, backward: bool,
              heads: int, kv_heads: int) -> Schedule:
    return build_schedule(strategy, world_size, layout=layout, causal=causal, backward=backward,
                          num_heads=heads, num_kv_heads=kv_heads)


class _Plan:
    """Everything one attention call needs on this rank; shared by forward and backward."""

    def __init__(self, strategy: str, comm: Communicator, q: torch.Tensor, k: torch.Tensor, *,
                 layout: str, causal: bool, softmax_scale: float | None, impl: str | None) -> None:
        n = comm.world_size
        b, s_local, h, d = q.shape
        hkv = k.shape[2]
        per = len(chunks_of_rank(0, n, layout))
        if s_local <= 0 or s_local % per:
            raise ValueError(f"seq_local (q.shape[1]={s_local}) must be a positive multiple of {per}: "
                             f"layout {layout!r} holds {per} equal chunk(s) per rank")
        chunk = s_local // per
        if strategy == "ulysses" and h % n:
            raise ValueError(f"ulysses_attention: heads ({h}) must be divisible by world_size ({n}); "
                             f"use token_ring_attention or ring_attention instead")
        self.strategy, self.comm, self.layout, self.causal = strategy, comm, layout, causal
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
        self.impl = impl
        kv_repeat = n // math.gcd(hkv, n) if strategy == "ulysses" else 1
        self.dims = Dims(b, chunk, h, hkv, d, q.dtype, q.device, n, kv_repeat)
        self.rank = comm.rank
        self.local = chunks_of_rank(self.rank, n, layout)
        self.key = (strategy, n, layout, causal, h, hkv)

    def runner(self, backward: bool, keep=()) -> Runner:
        sched = _schedule(*self.key[:4], backward, *self.key[4:])
        return Runner(sched, self.comm, self.dims, softmax_scale=self.scale, impl=self.impl, keep=keep)

    def _head_bufs(self) -> tuple[Buf, Buf, Buf]:
        every = tuple(range(num_chunks(self.comm.world_size, self.layout)))
        r = self.rank
        return (Buf("q", r, every, shard=r), Buf("kv", r, every, shard=r),
                Buf("out", r, every, at=r, shard=r))

    # ------------------------------------------------------------------ forward
    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        r = self.rank
        store = {("q", r, -1, -1): Held(self.local, {"q": q.contiguous()}),
                 ("kv", r, -1, -1): Held(self.local, {"k": k.contiguous(), "v": v.contiguous()})}
        keep = [b.key for b in self._head_bufs()] if self.strategy == "ulysses" else []
        runner = self.runner(False, keep)
        runner.run(store)
        out = runner.output(store, "out", "out").to(q.dtype)
        lse = runner.output(store, "out", "lse")  # fp32 (fp64 for fp64 inputs), as the reference
        if self.strategy == "ulysses":  # keep the head-sharded tensors: backward needs no re-shard
            q_h, kv_h, out_h = (store[b.key] for b in self._head_bufs())
            saved = (q_h.fields["q"], kv_h.fields["k"], kv_h.fields["v"], out_h.fields["out"],
                     out_h.fields["lse"])
        else:
            saved = (q, k, v, out, lse)
        return out, lse.contiguous(), saved

    # ------------------------------------------------------------------ backward
    def backward(self, dout: torch.Tensor, saved) -> tuple[torch.Tensor, ...]:
        r, local = self.rank, self.local
        if self.strategy == "ulysses":
            q_h, k_h, v_h, o_h, lse_h = saved
            qb, kvb, ob = self._head_bufs()
            store = {qb.key: Held(qb.chunks, {"q": q_h}),
                     kvb.key: Held(kvb.chunks, {"k": k_h, "v": v_h}),
                     ob.key: Held(ob.chunks, {"out": o_h, "lse": lse_h}),
                     ("dout", r, -1, -1): Held(local, {"dout": dout.contiguous()})}
        else:
            q, k, v, out, lse = saved
            store = {("qg", r, -1, -1): Held(local, {"q": q, "dout": dout.contiguous(), "lse": lse,
                                                     "delta": attention_delta(out, dout)}),
                     ("kv", r, -1, -1): Held(local, {"k": k, "v": v})}
        runner = self.runner(True)
        runner.run(store)
        dq = runner.output(store, "dq", "dq")
        dk = runner.output(store, "dkv", "dk")
        dv = runner.output(store, "dkv", "dv")
        io = self.dims.dtype
        return dq.to(io), dk.to(io), dv.to(io)


class _SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        out, lse, saved = plan.forward(q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv = ctx.plan.backward(dout, ctx.saved_tensors)
        return dq, dk, dv, None


def _validate(name: str, q, k, v, layout: str) -> None:
    check_qkv(q, k, v)
    check_layout(layout)
    for t_name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: {t_name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.shape[1] != q.shape[1]:
            raise ValueError(f"{name}: {t_name} has seq_local {t.shape[1]}, q has {q.shape[1]}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype must be one of {[str(d) for d in _DTYPES]}, got {q.dtype}")


def _attention(strategy: str, q, k, v, *, group, causal, layout, softmax_scale, return_lse, impl,
               timeout=None):
    name = f"{strategy}_attention" if strategy != "tokenring" else "token_ring_attention"
    _validate(name, q, k, v, layout)
    comm = Communicator(group, timeout=timeout)
    if comm.world_size > 1:  # before any P2P: same shapes, dtype and options everywhere
        comm.check_agree(f"{name} arguments (batch, seq_local, heads, kv_heads, head_dim, dtype, "
                         f"causal, layout, strategy)",
                         [*q.shape, k.shape[2], _DTYPES.index(q.dtype), int(causal),
                          ("contiguous", "zigzag").index(layout), STRATEGIES.index(strategy)])
    plan = _Plan(strategy, comm, q, k, layout=layout, causal=causal, softmax_scale=softmax_scale,
                 impl=impl)
    out, lse = _SequenceParallelAttention.apply(q, k, v, plan)
    return (out, lse) if return_lse else out


def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                         causal: bool = False, layout: str = "zigzag",
                         softmax_scale: float | None = None, return_lse: bool = False,
                         impl: str | None = None):
    """TokenRing attention (arXiv 2412.20501): queries travel, partial outputs come back.

    K/V stay on their rank. At every step a rank sends the query block it holds one way around
    the ring and the partial output it computed in the previous step the other way, both in
    flight while it computes, so both directions of every link carry traffic. With causal zigzag
    only the query chunks a holder still needs travel. Backward keeps K/V local too: (q, dout,
    lse, delta) travel, fp32 dq partials return to their owner, dk/dv accumulate in place.

    Args:
        q: ``(batch, seq_local, heads, head_dim)``; k, v: ``(batch, seq_local, kv_heads, head_dim)``
            with ``heads % kv_heads == 0`` (GQA).
        group: ProcessGroup, 1-D DeviceMesh, or None (default group; a world of one when
            torch.distributed is not initialised).
        causal: causal mask over the global sequence.
        layout: ``"zigzag"`` (default; balanced causal work) or ``"contiguous"``.
        softmax_scale: defaults to ``1/sqrt(head_dim)``.
        return_lse: also return ``lse`` ``(batch, heads, seq_local)`` fp32.
        impl: block kernel, ``"torch"`` | ``"triton"`` | None (by device).
    Returns:
        ``out`` like q (or ``(out, lse)``).
    """
    return _attention("tokenring", q, k, v, group=group, causal=causal, layout=layout,
                      softmax_scale=softmax_scale, return_lse=return_lse, impl=impl)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                   causal: bool = False, layout: str = "zigzag", softmax_scale: float | None = None,
                   return_lse: bool = False, impl: str | None = None):
    """Ring attention: K/V blocks rotate around the ring, outputs accumulate where queries live.

    Backward rotates K/V again with an fp32 dk/dv accumulator one step behind them. Arguments as
    :func:`token_ring_attention`.
    """
    return _attention("ring", q, k, v, group=group, causal=causal, layout=layout,
                      softmax_scale=softmax_scale, return_lse=return_lse, impl=impl)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                      causal: bool = False, layout: str = "zigzag", softmax_scale: float | None = None,
                      return_lse: bool = False, impl: str | None = None):
    """DeepSpeed-Ulysses: all-to-all from sequence shards to head shards and back.

    Needs ``heads % world_size == 0``; kv heads that do not divide the world size are replicated
    (and their gradients summed back). Arguments as :func:`token_ring_attention`.
    """
    return _attention("ulysses", q, k, v, group=group, causal=causal, layout=layout,
                      softmax_scale=softmax_scale, return_lse=return_lse, impl=impl)


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str = "auto",
                 group: Any = None, causal: bool = False, layout: str = "zigzag",
                 softmax_scale: float | None = None, return_lse: bool = False,
                 impl: str | None = None, hardware: str | None = None):
    """Sequence-parallel attention with ``strategy`` "tokenring" | "ring" | "ulysses" | "auto".

    ``"auto"`` asks the simulator's advisor (:func:`tokenloom.simulator.choose_strategy`) which
    strategy is fastest for this shape on ``hardware`` (a catalog name; detected when None). The
    layout is the caller's: the data is already sharded, so only the strategy is chosen. Every rank
    gets the same answer because the advice depends only on the (agreed) shapes.
    """
    if strategy == "auto":
        from tokenloom.simulator import choose_strategy

        comm = Communicator(group)
        _validate("sp_attention", q, k, v, layout)
        strategy, _ = choose_strategy(
            world_size=comm.world_size, seq_len=q.shape[1] * comm.world_size, num_heads=q.shape[2],
            num_kv_heads=k.shape[2], head_dim=q.shape[3], causal=causal,
            dtype_bytes=q.element_size(), batch=q.shape[0], hardware=hardware,
            backward=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
            layout=layout)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}")
    return _attention(strategy, q, k, v, group=group, causal=causal, layout=layout,
                      softmax_scale=softmax_scale, return_lse=return_lse, impl=impl)


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag",
                   dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (a copy), in the order the API expects."""
    check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    dim = dim % x.dim()
    c = chunk_len(x.shape[dim], world_size, layout, field=f"x.shape[{dim}]")
    return torch.cat([x.narrow(dim, ch * c, c) for ch in chunks_of_rank(rank, world_size, layout)],
                     dim=dim)


def gather_sequence(x_local: torch.Tensor, group: Any = None, layout: str = "zigzag",
                    dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full tensor on every rank (a collective).

    Not differentiable: use it for inputs, outputs and checks.
    """
    check_layout(layout)
    comm = Communicator(group)
    dim = dim % x_local.dim()
    n = comm.world_size
    per = len(chunks_of_rank(0, n, layout))
    if x_local.shape[dim] % per:
        raise ValueError(f"gather_sequence: x_local.shape[{dim}] ({x_local.shape[dim]}) must be "
                         f"divisible by {per} (chunks per rank in layout {layout!r})")
    comm.check_agree("gather_sequence shapes", list(x_local.shape))
    every = comm.all_gather(x_local.detach())
    c = x_local.shape[dim] // per
    return torch.cat([every[j].narrow(dim, i * c, c) for j, i in global_chunk_order(n, layout)],
                     dim=dim)


__all__ = [
    "gather_sequence",
    "ring_attention",
    "shard_sequence",
    "sp_attention",
    "token_ring_attention",
    "ulysses_attention",
]
