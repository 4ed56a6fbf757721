"""Public sequence-parallel attention API: TokenRing, Ring, Ulysses, the 2-D hybrid, ``sp_attention``.

Every function takes this rank's part of the sequence, ``(batch, seq_local, heads, head_dim)``
(see :func:`shard_sequence`), and returns this rank's part of the output, differentiable with
respect to q, k and v. A dense global sequence is ``seq_local * world_size`` tokens cut into
equal chunks: one per rank (``layout="contiguous"``) or two per rank (``"zigzag"``: rank r holds
chunks r and 2N-1-r, which balances causal work). A packed sequence (``cu_seqlens``) is cut per
document (:mod:`tokenloom.parallel.layout`), so ranks may hold a few tokens more or less.

This module knows no strategy: one call resolves "auto" (:func:`resolve_strategy`), agrees on
every argument across ranks (:mod:`tokenloom.parallel.agree`, one small all-gather), takes the
forward (and backward) schedule of its :class:`~tokenloom.parallel.dims.ParallelDims`, builds the
runtime's input buffers from ``Schedule.inputs``, runs it, and reads the results through
``Schedule.outputs``. What the backward needs from the forward is whatever the backward schedule
lists as inputs that are not plain local tensors: the forward run keeps exactly those.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.common.errors import UsageError
from tokenloom.kernels.masks import poison_dead_rows
from tokenloom.kernels.reference import attention_delta, check_qkv
from tokenloom.parallel.agree import Agreed, agree, check_scale, check_softcap
from tokenloom.parallel.sinks import apply_sinks, sink_grad, with_sinks
from tokenloom.parallel.builders import schedule_for
from tokenloom.parallel.dims import STRATEGIES, ParallelDims
from tokenloom.parallel.groups import agreement_gather, resolve_sp_group
from tokenloom.parallel.layout import SeqLayout, doc_lens_from_cu_seqlens, normalize_window
from tokenloom.parallel.buffers import Dims, Held
from tokenloom.parallel.runtime import Groups, Runner
from tokenloom.parallel.sharding import gather_sequence, host_cu_seqlens, shard_sequence  # noqa: F401
from tokenloom.parallel.schedule import WIRE_FIELDS, Buf, Schedule

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LOCAL_FIELDS = ("q", "k", "v", "out", "lse")  # plain local tensors a backward may need


# ---------------------------------------------------------------------- resolution (pure-ish)
@functools.lru_cache(maxsize=128)
def resolve_strategy(strategy: str, *, world_size: int, ulysses: int, seq_len: int, heads: int,
                     kv_heads: int, head_dim: int, causal: bool, dtype_bytes: int, batch: int,
                     hardware: str | None, backward: bool, layout: str) -> str:
    """The one place "auto" is decided: the simulator's advisor ranks the strategies for this shape.

    Every rank gets the same answer from the same (agreed) shapes; the agreement that follows
    checks it anyway. On a 2-D mesh the choice is the ring dim's strategy ("tokenring" or "ring"),
    ranked the same way among the hybrids.
    """
    if strategy != "auto":
        if strategy not in STRATEGIES:
            raise UsageError(f"strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}",
                             field="strategy")
        return strategy
    from tokenloom.simulator import choose_strategy

    chosen, _ = choose_strategy(world_size=world_size, seq_len=seq_len, num_heads=heads,
                                num_kv_heads=kv_heads, head_dim=head_dim, causal=causal,
                                dtype_bytes=dtype_bytes, batch=batch, hardware=hardware,
                                backward=backward, layout=layout, ulysses=ulysses)
    return chosen


@dataclass(frozen=True)
class _Args:
    """Every argument of one call that changes its result (hashable: the cache key)."""

    strategy: str
    layout: str
    causal: Any
    softmax_scale: Any
    impl: Any
    cu_seqlens: tuple[int, ...] | None
    window_size: Any
    softcap: Any
    hardware: str | None
    backward: bool
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    dtypes: tuple
    device: torch.device


class _Plan:
    """Everything one attention call needs on this rank; shared by forward and backward."""

    def __init__(self, name: str, groups: Groups, a: _Args) -> None:
        b, s_local, h, d = a.q_shape
        hkv = a.k_shape[2]
        self.groups, self.rank = groups, groups.rank
        n, u = groups.world_size, groups.ulysses
        if not isinstance(a.causal, bool):
            raise UsageError(f"causal must be True or False, got {a.causal!r}", field="causal")
        doc_lens = None
        if a.cu_seqlens is not None:
            doc_lens = doc_lens_from_cu_seqlens(a.cu_seqlens)
        SeqLayout(n, a.layout, u)  # layout first: its error names the layout
        if doc_lens is None:
            seq_len = ParallelDims("ring", n, layout=a.layout, ulysses=u).dense_seq_len(s_local)
        else:
            seq_len = sum(doc_lens)
        strategy = resolve_strategy(a.strategy, world_size=n, ulysses=u, seq_len=seq_len, heads=h,
                                    kv_heads=hkv, head_dim=d, causal=a.causal,
                                    dtype_bytes=torch.empty((), dtype=a.dtypes[0]).element_size(),
                                    batch=b, hardware=a.hardware, backward=a.backward, layout=a.layout)
        self.pdims = ParallelDims(strategy, n, layout=a.layout, ulysses=u, heads=h, kv_heads=hkv,
                                  doc_lens=doc_lens)
        seq = self.pdims.seq
        if doc_lens is not None and seq.local_len(self.rank) != s_local:
            raise UsageError(f"{name}: q.shape[1] is {s_local} but cu_seqlens gives rank {self.rank} "
                             f"{seq.local_len(self.rank)} tokens; shard with shard_sequence(..., "
                             f"cu_seqlens=...)", field="cu_seqlens")
        self.scale = check_scale(a.softmax_scale, d)
        self.impl = _resolve_impl(a.impl, a.device)
        self.softcap = check_softcap(a.softcap)
        window = normalize_window(a.window_size, a.causal)
        if window is not None:  # a side reaching past the sequence masks nothing: unbounded
            window = normalize_window(tuple(-1 if w >= seq_len - 1 else w for w in window), a.causal)
        if window is not None and self.impl == "triton":
            raise UsageError(f"{name}: impl='triton' has no sliding window yet (window_size="
                             f"{a.window_size!r}); use impl='sdpa' or 'torch'", field="window_size")
        if window is not None:
            self.pdims = dataclasses.replace(self.pdims, window=window,
                                             seq_len=seq_len if doc_lens is None else None)
            seq = self.pdims.seq
        self.dims = Dims(b, seq.chunk_lens(seq_len), h, hkv, d, a.dtypes[0], a.device,
                         self.pdims.head_shards, self.pdims.kv_repeat, seq if seq.varlen else None)
        self.fwd = schedule_for(self.pdims, causal=a.causal, backward=False)
        self.bwd = schedule_for(self.pdims, causal=a.causal, backward=True) if a.backward else None
        self.agreed = Agreed.of({
            "strategy": self.pdims.name, "layout": a.layout, "causal": a.causal,
            "softmax_scale": self.scale, "impl": self.impl, "dtype": str(a.dtypes[0]), "batch": b,
            "seq": seq_len if doc_lens is not None else s_local, "heads": h, "kv_heads": hkv,
            "head_dim": d, "cu_seqlens": doc_lens, "mesh": f"{u}x{n // u}", "backward": a.backward,
            "call": "attention", "window_size": window, "softcap": self.softcap})

    def runner(self, sched: Schedule, keep=()) -> Runner:
        return Runner(sched, self.groups, self.dims, softmax_scale=self.scale, impl=self.impl, keep=keep,
                      softcap=self.softcap)

    # ------------------------------------------------------------------ buffers
    def _local(self, buf: Buf) -> bool:
        return buf.shard < 0 and tuple(buf.chunks) == self.pdims.seq.chunks_of(self.rank)

    @staticmethod
    def _bind(buf: Buf, tensors: dict[str, torch.Tensor]) -> Held:
        fields = {}
        for name, *_ in WIRE_FIELDS[buf.kind]:
            if name == "delta":
                fields[name] = attention_delta(tensors["out"], tensors["dout"])
            else:
                fields[name] = tensors[name].contiguous()
        return Held(tuple(buf.chunks), fields)

    def forward(self, q, k, v, sinks=None) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
        r = self.rank
        tensors = {"q": q, "k": k, "v": v}
        store = {b.key: self._bind(b, tensors) for b in self.fwd.inputs[r]}
        bwd_inputs = self.bwd.inputs[r] if self.bwd is not None else ()
        keep = [b.key for b in bwd_inputs if not self._local(b)]
        runner = self.runner(self.fwd, keep)
        runner.run(store)
        out = runner.output(store, "out", "out")
        lse = runner.output(store, "out", "lse").contiguous()  # fp32 (fp64 for fp64), as the reference
        if sinks is None:
            out, lse = poison_dead_rows(out, lse)  # rows whose every score was -inf (infinite inputs)
        else:  # once per query, after every partial merged; the kept head shards too (Ulysses)
            out, lse = apply_sinks(out, lse, sinks)
            for key in keep:
                held = store[key]
                if key[0] == "out":
                    h = held.fields["lse"].shape[1]
                    held.fields["out"], held.fields["lse"] = apply_sinks(
                        held.fields["out"], held.fields["lse"], sinks, max(key[3], 0) * h)
        out = out.to(q.dtype)
        tensors.update(out=out, lse=lse)
        need = {f for b in bwd_inputs if self._local(b) for f, *_ in WIRE_FIELDS[b.kind]}
        need |= {"q", "out", "lse"} if "delta" in need else set()
        need |= {"out", "lse"} if sinks is not None else set()
        saved, meta = [], {"local": [], "held": []}
        for name in _LOCAL_FIELDS:
            if name in need:
                meta["local"].append(name)
                saved.append(tensors[name])
        for key in keep:
            held = store[key]
            meta["held"].append((key, held.chunks, list(held.fields)))
            saved.extend(held.fields.values())
        return out, lse, saved, meta

    def backward(self, dout: torch.Tensor, saved, meta, sinks=None) -> tuple[torch.Tensor, ...]:
        assert self.bwd is not None, "backward of a call agreed without backward"
        it = iter(saved)
        tensors = {name: next(it) for name in meta["local"]}
        tensors["dout"] = dout
        kept = {key: Held(chunks, {f: next(it) for f in names}) for key, chunks, names in meta["held"]}
        store = {b.key: (self._bind(b, tensors) if self._local(b) else kept[b.key])
                 for b in self.bwd.inputs[self.rank]}
        runner = self.runner(self.bwd)
        runner.run(store)
        io = self.dims.dtype
        grads = tuple(runner.output(store, kind, name).to(io)
                      for kind, name in (("dq", "dq"), ("dkv", "dk"), ("dkv", "dv")))
        if sinks is None:
            return grads + (None,)
        return grads + (sink_grad(tensors["out"], tensors["lse"], dout, sinks),)


def _resolve_impl(impl: Any, device: torch.device) -> str:
    from tokenloom.kernels import select_impl

    try:
        return select_impl(device, impl)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc), field="impl") from exc


class _SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: _Plan):
        out, lse, saved, meta = plan.forward(q, k, v, sinks)
        ctx.plan, ctx.meta, ctx.sinks = plan, meta, sinks
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv, dsinks = ctx.plan.backward(dout.contiguous(), ctx.saved_tensors, ctx.meta, ctx.sinks)
        return dq, dk, dv, dsinks, None


# ---------------------------------------------------------------------- validation + agreement
def _check_tensors(name: str, q, k, v) -> None:
    for t_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{name}: {t_name} must be a torch.Tensor, got {type(t).__name__}", field=t_name)
    try:
        check_qkv(q, k, v)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}", field="q") from exc
    if q.dtype not in _DTYPES:
        raise UsageError(f"{name}: dtype must be one of {[str(d) for d in _DTYPES]}, got {q.dtype}",
                         field="dtype")
    for t_name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise UsageError(f"{name}: {t_name} dtype {t.dtype} differs from q dtype {q.dtype}", field="dtype")
        if t.shape[1] != q.shape[1]:
            raise UsageError(f"{name}: {t_name} has seq_local {t.shape[1]}, q has {q.shape[1]}", field="seq")
        if t.device != q.device:
            raise UsageError(f"{name}: {t_name} is on {t.device}, q on {q.device}", field=t_name)


_FIELD_OF = {"q": "arguments", "k": "arguments", "v": "arguments", "group": "arguments"}
_PLANS: "OrderedDict[tuple, tuple[Agreed, _Plan | None]]" = OrderedDict()
_MAX_PLANS = 256


def _plan_for(name: str, groups: Groups, group: Any, q, k, v, *, strategy, causal, layout,
              softmax_scale, impl, cu_seqlens, hardware, window_size=None, softcap=None
              ) -> tuple[Agreed, _Plan | None]:
    """This rank's encoded arguments and plan, or its own argument error (cached by arguments)."""
    from tokenloom.parallel.agree import FIELDS

    try:
        _check_tensors(name, q, k, v)
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        cu = host_cu_seqlens(cu_seqlens) if cu_seqlens is not None else None
        if isinstance(window_size, list):
            window_size = tuple(window_size)
        args = _Args(strategy, layout, causal, softmax_scale, impl, cu, window_size, softcap, hardware, backward,
                     tuple(q.shape), tuple(k.shape), tuple(v.shape), (q.dtype, k.dtype, v.dtype),
                     q.device)
        # the process and the group's shape too: a forked child must not reuse its parent's plans
        key = (name, group, os.getpid(), groups.rank, groups.world_size, groups.ulysses, args)
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit
        plan = _Plan(name, groups, args)
        result = (plan.agreed, plan)
    except UsageError as exc:
        field = exc.field if exc.field in FIELDS else _FIELD_OF.get(exc.field or "", "arguments")
        msg = str(exc) if str(exc).startswith(name) else f"{name}: {exc}"
        return Agreed.failed(field, msg), None
    except TypeError as exc:  # unhashable argument values (e.g. a list as softmax_scale)
        return Agreed.failed("arguments", f"{name}: bad argument type: {exc}"), None
    _PLANS[key] = result
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return result


def _attention(name: str, strategy: str, q, k, v, *, group, causal, layout, softmax_scale,
               return_lse, impl, cu_seqlens=None, hardware=None, timeout=None, window_size=None,
               softcap=None, sinks=None):
    groups = resolve_sp_group(group, timeout=timeout)
    mine, plan = _plan_for(name, groups, group, q, k, v, strategy=strategy, causal=causal,
                           layout=layout, softmax_scale=softmax_scale, impl=impl,
                           cu_seqlens=cu_seqlens, hardware=hardware, window_size=window_size,
                           softcap=softcap)
    if sinks is not None:
        mine = with_sinks(mine, sinks, q.shape[2], q, name)
    gather, device = agreement_gather(groups, f"{name} argument agreement")
    agree(name, mine, gather, device)  # before any P2P: raises on every rank or none
    assert plan is not None
    out, lse = _SequenceParallelAttention.apply(q, k, v, sinks, plan)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------- public functions
def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                         causal: bool = False, layout: str = "zigzag",
                         softmax_scale: float | None = None, return_lse: bool = False,
                         impl: str | None = None, cu_seqlens: Any = None, window_size: Any = None,
                         softcap: float | None = None, sinks: torch.Tensor | None = None):
    """TokenRing attention (arXiv 2412.20501): queries travel, partial outputs come back.

    K/V stay on their rank. At every step a rank sends the query block it holds one way around
    the ring and the partial output it computed in the previous step the other way, both in
    flight while it computes, so both directions of every link carry traffic. With causal zigzag
    only the query chunks a holder still needs travel. Backward keeps K/V local too: (q, dout,
    lse, delta) travel, fp32 dq partials return to their owner, dk/dv accumulate in place.

    Args:
        q: ``(batch, seq_local, heads, head_dim)``; k, v: ``(batch, seq_local, kv_heads, head_dim)``
            with ``heads % kv_heads == 0`` (GQA).
        group: ProcessGroup, 1-D DeviceMesh, 2-D DeviceMesh with dims ("ulysses", "ring") (then
            Ulysses inside each group, this strategy across), or None (default group; a world of
            one when torch.distributed is not initialised).
        causal: causal mask over the global sequence (per document with ``cu_seqlens``).
        layout: ``"zigzag"`` (default; balanced causal work) or ``"contiguous"``.
        softmax_scale: defaults to ``1/sqrt(head_dim)``; must be finite.
        return_lse: also return ``lse`` ``(batch, heads, seq_local)`` fp32.
        impl: block kernel, ``"torch"`` | ``"sdpa"`` | ``"triton"`` | None (by device).
        cu_seqlens: packed documents, int32 ``(num_docs + 1,)`` boundaries of the *global* packed
            sequence (flash-attn convention), the same on every rank; every batch row uses them.
            The local tensors must come from :func:`shard_sequence` with the same cu_seqlens.
        window_size: sliding window ``(left, right)`` (flash-attn's convention, -1 unbounded):
            query at global position i sees keys i - left .. i + right (causal: right = 0), inside
            its document. Blocks the window hides are never computed nor sent.
        softcap: logit soft-capping, scores -> ``softcap * tanh(scores / softcap)`` (Gemma 2).
        sinks: ``(heads,)`` one learnable logit per query head in every row's softmax denominator
            (GPT-OSS ``s_aux``); differentiable (a rank's gradient covers its own tokens).
    Returns:
        ``out`` like q (or ``(out, lse)``).
    """
    return _attention("token_ring_attention", "tokenring", q, k, v, group=group, causal=causal,
                      layout=layout, softmax_scale=softmax_scale, return_lse=return_lse, impl=impl,
                      cu_seqlens=cu_seqlens, window_size=window_size, softcap=softcap, sinks=sinks)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                   causal: bool = False, layout: str = "zigzag", softmax_scale: float | None = None,
                   return_lse: bool = False, impl: str | None = None, cu_seqlens: Any = None,
                   window_size: Any = None, softcap: float | None = None,
                   sinks: torch.Tensor | None = None):
    """Ring attention: K/V blocks rotate around the ring, outputs accumulate where queries live.

    Backward rotates K/V again with an fp32 dk/dv accumulator one step behind them. Arguments as
    :func:`token_ring_attention`.
    """
    return _attention("ring_attention", "ring", q, k, v, group=group, causal=causal, layout=layout,
                      softmax_scale=softmax_scale, return_lse=return_lse, impl=impl,
                      cu_seqlens=cu_seqlens, window_size=window_size, softcap=softcap, sinks=sinks)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                      causal: bool = False, layout: str = "zigzag", softmax_scale: float | None = None,
                      return_lse: bool = False, impl: str | None = None, cu_seqlens: Any = None,
                      window_size: Any = None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None):
    """DeepSpeed-Ulysses: all-to-all from sequence shards to head shards and back.

    Needs ``heads % world_size == 0``; kv heads that do not divide the world size are replicated
    (and their gradients summed back). Arguments as :func:`token_ring_attention` (flat groups only).
    """
    return _attention("ulysses_attention", "ulysses", q, k, v, group=group, causal=causal,
                      layout=layout, softmax_scale=softmax_scale, return_lse=return_lse, impl=impl,
                      cu_seqlens=cu_seqlens, window_size=window_size, softcap=softcap, sinks=sinks)


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str = "auto",
                 group: Any = None, causal: bool = False, layout: str = "zigzag",
                 softmax_scale: float | None = None, return_lse: bool = False,
                 impl: str | None = None, hardware: str | None = None, cu_seqlens: Any = None,
                 window_size: Any = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None):
    """Sequence-parallel attention with ``strategy`` "tokenring" | "ring" | "ulysses" | "auto".

    ``"auto"`` asks the simulator's advisor (:func:`tokenloom.simulator.choose_strategy`) which
    strategy is fastest for this shape on ``hardware`` (a catalog name; detected when None). The
    layout is the caller's: the data is already sharded, so only the strategy is chosen. With a
    2-D ("ulysses", "ring") mesh as ``group``, ``strategy`` is the ring dim's ("auto": the faster
    hybrid by the same advisor).
    Other arguments as :func:`token_ring_attention`.
    """
    return _attention("sp_attention", strategy, q, k, v, group=group, causal=causal, layout=layout,
                      softmax_scale=softmax_scale, return_lse=return_lse, impl=impl,
                      cu_seqlens=cu_seqlens, hardware=hardware, window_size=window_size,
                      softcap=softcap, sinks=sinks)


__all__ = [
    "gather_sequence",
    "resolve_strategy",
    "ring_attention",
    "shard_sequence",
    "sp_attention",
    "token_ring_attention",
    "ulysses_attention",
]
