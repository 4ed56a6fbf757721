"""Attention sinks (GPT-OSS ``s_aux``): one learnable logit per head in every query's softmax.

A sink joins each query's denominator exactly once, however many blocks and ranks the query
visits, so it is applied to the *final* statistics of a query, after every partial is merged:
``lse' = logaddexp(lse, sink_h)`` and ``out' = out * exp(lse - lse')``. The backward needs nothing
new from the blocks: the FlashAttention-2 block gradients with ``lse'`` and
``delta' = rowsum(dout * out')`` are those of the attention with the sink column, and the sink's
own gradient is that column's: ``d sink_h = -sum_i exp(sink_h - lse'_i) * delta'_i``. Like every
replicated parameter under sequence parallelism, a rank's ``d sink`` covers its own tokens; sum it
over the SP group with the other parameter gradients (DDP/FSDP over the SP ranks does).
"""

from __future__ import annotations

import hashlib

import torch

from tokenloom.parallel.agree import Agreed

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def sinks_problem(sinks, heads: int, q: torch.Tensor) -> str | None:
    """Why ``sinks`` cannot be used with ``q`` (None: fine)."""
    if not isinstance(sinks, torch.Tensor):
        return f"sinks must be a tensor of shape ({heads},), got {type(sinks).__name__}"
    if tuple(sinks.shape) != (heads,):
        return f"sinks must have shape ({heads},) (one logit per query head), got {tuple(sinks.shape)}"
    if sinks.dtype not in _DTYPES:
        return f"sinks must be a floating tensor ({', '.join(map(str, _DTYPES))}), got {sinks.dtype}"
    if sinks.device != q.device:
        return f"sinks are on {sinks.device}, q on {q.device}"
    return None


def with_sinks(mine: Agreed, sinks, heads: int, q: torch.Tensor, name: str) -> Agreed:
    """``mine`` with the ``sinks`` field set (a checksum of the values: every rank must pass the
    same sinks), or this rank's refusal. One host copy of ``heads`` numbers per call."""
    from tokenloom.parallel.agree import FIELDS, code_of

    if mine.error is not None or sinks is None:
        return mine
    problem = sinks_problem(sinks, heads, q)
    if problem is not None:
        return Agreed.failed("sinks", f"{name}: {problem}")
    raw = sinks.detach().to("cpu", torch.float64).numpy().tobytes()
    digest = hashlib.blake2b(raw, digest_size=6).hexdigest()
    values = list(mine.values)
    values[FIELDS.index("sinks")] = code_of(digest)
    shown = dict(mine.shown, sinks=f"{sinks.detach().cpu().tolist()[:4]}... ({digest})")
    return Agreed(tuple(values), shown)


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, head0: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out', lse')`` for BSHD ``out`` and ``lse`` ``(b, h, s)`` whose heads are sink heads
    ``head0 .. head0 + h`` (a Ulysses head shard); ``out'`` in ``out``'s dtype."""
    h = lse.shape[1]
    sink = sinks.detach().to(lse.dtype)[head0:head0 + h].view(1, h, 1)
    new_lse = torch.logaddexp(lse, sink)
    scale = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # (b, s, h, 1)
    return (out.to(lse.dtype) * scale).to(out.dtype), new_lse


def sink_grad(out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, sinks: torch.Tensor
              ) -> torch.Tensor:
    """``d sinks`` from this rank's rows: ``out'``, ``lse'`` (after :func:`apply_sinks`), ``dout``."""
    acc = lse.dtype
    delta = (out.to(acc) * dout.to(acc)).sum(-1).transpose(1, 2)  # (b, h, s)
    weight = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)
    return (-(weight * delta).sum((0, 2))).to(sinks.dtype)
