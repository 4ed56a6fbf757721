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

import os
from collections import OrderedDict
from typing import Any, Tuple, Union

import torch

from tokenloom.common.errors import UsageError
from tokenloom.common.vocab import Strategy, Word
from tokenloom.kernels.reference import check_qkv
from tokenloom.parallel.agree import Agreed, agree
from tokenloom.parallel.attention_plan import (  # noqa: F401 -- resolve_strategy is public here
    AttentionPlan,
    CallArgs,
    SequenceParallelAttention,
    resolve_strategy,
)
from tokenloom.parallel.groups import agreement_gather, resolve_sp_group
from tokenloom.parallel.runtime import Groups
from tokenloom.parallel.sharding import gather_sequence, host_cu_seqlens, shard_sequence  # noqa: F401
from tokenloom.parallel.sinks import with_sinks

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# ``out`` like q, or ``(out, lse)`` with ``return_lse=True`` (lse ``(batch, heads, seq_local)`` fp32)
AttentionOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _check_tensors(name: str, q, k, v) -> None:
    for t_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{name}: {t_name} must be a torch.Tensor, got {type(t).__name__}", field=t_name)
    try:
        check_qkv(q, k, v)
    except ValueError as exc:
        gqa = q.dim() == 4 and k.dim() == 4 and (k.shape[2] < 1 or q.shape[2] % k.shape[2])
        # the GQA rule is ParallelDims' kv_heads rule: name the field the simulator names
        raise UsageError(f"{name}: {exc}", field="kv_heads" if gqa else "q") from exc
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
_PLANS: "OrderedDict[tuple, tuple[Agreed, AttentionPlan | None]]" = OrderedDict()
_MAX_PLANS = 256


def _plan_for(name: str, groups: Groups, group: Any, q, k, v, *, strategy, causal, layout,
              softmax_scale, impl, cu_seqlens, hardware, window_size=None, softcap=None
              ) -> tuple[Agreed, AttentionPlan | None]:
    """This rank's encoded arguments and plan, or its own argument error (cached by arguments)."""
    from tokenloom.parallel.agree import FIELDS

    try:
        _check_tensors(name, q, k, v)
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        cu = host_cu_seqlens(cu_seqlens) if cu_seqlens is not None else None
        if isinstance(window_size, list):
            window_size = tuple(window_size)
        # a Strategy/Layout member is its string: ranks passing either agree (agreement encodes repr)
        strategy, layout = (x.value if isinstance(x, Word) else x for x in (strategy, layout))
        args = CallArgs(strategy, layout, causal, softmax_scale, impl, cu, window_size, softcap, hardware, backward,
                     tuple(q.shape), tuple(k.shape), tuple(v.shape), (q.dtype, k.dtype, v.dtype),
                     q.device)
        # the process and the group's shape too: a forked child must not reuse its parent's plans
        key = (name, group, os.getpid(), groups.rank, groups.world_size, groups.ulysses, args)
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit
        plan = AttentionPlan(name, groups, args)
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
               softcap=None, sinks=None) -> AttentionOutput:
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
    out, lse = SequenceParallelAttention.apply(q, k, v, sinks, plan)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------- public functions
def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                         causal: bool = False, layout: str = "zigzag",
                         softmax_scale: float | None = None, return_lse: bool = False,
                         impl: str | None = None, cu_seqlens: Any = None, window_size: Any = None,
                         softcap: float | None = None, sinks: torch.Tensor | None = None) -> AttentionOutput:
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
                   sinks: torch.Tensor | None = None) -> AttentionOutput:
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
                      sinks: torch.Tensor | None = None) -> AttentionOutput:
    """DeepSpeed-Ulysses: all-to-all from sequence shards to head shards and back.

    Needs ``heads % world_size == 0``; kv heads that do not divide the world size are replicated
    (and their gradients summed back). Arguments as :func:`token_ring_attention` (flat groups only).
    """
    return _attention("ulysses_attention", "ulysses", q, k, v, group=group, causal=causal,
                      layout=layout, softmax_scale=softmax_scale, return_lse=return_lse, impl=impl,
                      cu_seqlens=cu_seqlens, window_size=window_size, softcap=softcap, sinks=sinks)


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str | Strategy = "auto",
                 group: Any = None, causal: bool = False, layout: str = "zigzag",
                 softmax_scale: float | None = None, return_lse: bool = False,
                 impl: str | None = None, hardware: str | None = None, cu_seqlens: Any = None,
                 window_size: Any = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None) -> AttentionOutput:
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
