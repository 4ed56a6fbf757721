"""Which part of a full sequence each rank holds: :func:`shard_sequence` and its inverse
:func:`gather_sequence`, for dense and packed (``cu_seqlens``) sequences, on a flat group or a
2-D ("ulysses", "ring") mesh. The layout itself is :class:`~tokenloom.parallel.layout.SeqLayout`.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenloom.common.errors import UsageError
from tokenloom.parallel.agree import FIELDS, Agreed, agree
from tokenloom.parallel.groups import agreement_gather, gather_all, resolve_sp_group
from tokenloom.parallel.layout import SeqLayout, doc_lens_from_cu_seqlens
from tokenloom.parallel.buffers import take


def host_cu_seqlens(cu_seqlens: Any) -> tuple[int, ...]:
    """``cu_seqlens`` (int32/int64 1-D tensor or list of ints) as a tuple on the host."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise UsageError(f"cu_seqlens must be a 1-D int32 tensor (num_docs + 1,), got "
                             f"{cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}", field="cu_seqlens")
        return tuple(cu_seqlens.tolist())  # a GPU tensor costs one sync: pass a CPU one
    if isinstance(cu_seqlens, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                     for x in cu_seqlens):
        return tuple(cu_seqlens)
    raise UsageError(f"cu_seqlens must be an int32 tensor or a list of ints, got "
                     f"{type(cu_seqlens).__name__}", field="cu_seqlens")


def _seq_layout(world_size: int, layout: str, ulysses: int, cu_seqlens: Any, total: int,
                what: str) -> SeqLayout:
    doc_lens = None
    if cu_seqlens is not None:
        doc_lens = doc_lens_from_cu_seqlens(host_cu_seqlens(cu_seqlens), total=total)
    seq = SeqLayout(world_size, layout, ulysses, doc_lens)
    if doc_lens is None:
        try:
            seq.chunk_lens(total)
        except UsageError as exc:
            raise UsageError(f"{what}: {exc}", field=what) from exc
    return seq


def shard_sequence(x: torch.Tensor, rank: int | None = None, world_size: int | None = None,
                   layout: str = "zigzag", dim: int = 1, *, cu_seqlens: Any = None,
                   group: Any = None) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (a copy), in the order the API expects.

    ``rank``/``world_size`` may be left out when ``group`` is given (needed for a 2-D mesh,
    whose SP ranks hold sub-chunks of their ring rank's chunks). With ``cu_seqlens`` (boundaries
    of the packed sequence along ``dim``) every document is cut separately (per-document zigzag,
    see :mod:`tokenloom.parallel.layout`), so ranks may get a token or two more than others.
    """
    ulysses = 1
    if group is not None:
        groups = resolve_sp_group(group)
        if rank is not None and rank != groups.rank or world_size not in (None, groups.world_size):
            raise UsageError(f"shard_sequence: rank/world_size ({rank}, {world_size}) contradict the "
                             f"group's ({groups.rank}, {groups.world_size}); pass one or the other",
                             field="rank")
        rank, world_size, ulysses = groups.rank, groups.world_size, groups.ulysses
    if rank is None or world_size is None:
        raise UsageError("shard_sequence needs rank and world_size, or group=", field="rank")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be an integer >= 1, got {world_size!r}", field="world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UsageError(f"rank must be in [0, {world_size}), got {rank!r}", field="rank")
    dim = _check_dim(x, dim)
    seq = _seq_layout(world_size, layout, ulysses, cu_seqlens, x.shape[dim], f"x.shape[{dim}]")
    return take(x, dim, seq.global_ranges(rank, x.shape[dim])).clone()


def _check_dim(x: Any, dim: Any) -> int:
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"x must be a torch.Tensor, got {type(x).__name__}", field="x")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise UsageError(f"dim must be an int in [-{x.dim()}, {x.dim()}), got {dim!r}", field="dim")
    return dim % x.dim()


def gather_sequence(x_local: torch.Tensor, group: Any = None, layout: str = "zigzag",
                    dim: int = 1, *, cu_seqlens: Any = None) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full tensor on every rank (a collective).

    ``group`` as for the attention functions (a 2-D mesh too). Not differentiable: use it for
    inputs, outputs and checks. Ranks agree on layout, cu_seqlens, dtype and shapes first.
    """
    groups = resolve_sp_group(group)
    n, rank = groups.world_size, groups.rank
    try:
        dim = _check_dim(x_local, dim)
        if cu_seqlens is None:
            per = len(SeqLayout(n, layout, groups.ulysses).chunks_of(rank))
            if x_local.shape[dim] % per:
                raise UsageError(f"gather_sequence: x_local.shape[{dim}] ({x_local.shape[dim]}) must "
                                 f"be divisible by {per} (chunks per rank in layout {layout!r})",
                                 field="seq")
            total = x_local.shape[dim] * n
        else:
            cu = host_cu_seqlens(cu_seqlens)
            total = cu[-1] if cu else 0
        seq = _seq_layout(n, layout, groups.ulysses, cu_seqlens, total, "cu_seqlens")
        if seq.local_len(rank, total) != x_local.shape[dim]:
            raise UsageError(f"gather_sequence: x_local.shape[{dim}] is {x_local.shape[dim]} but "
                             f"cu_seqlens gives rank {rank} {seq.local_len(rank, total)} tokens",
                             field="cu_seqlens")
        other = tuple(s for i, s in enumerate(x_local.shape) if i != dim)
        mine = Agreed.of({"layout": layout, "cu_seqlens": seq.doc_lens, "dtype": str(x_local.dtype),
                          "seq": total, "shape": f"dim {dim} of {other}", "mesh": f"{groups.ulysses}x{n}",
                          "call": "gather_sequence"})
    except UsageError as exc:
        mine, seq = Agreed.failed(exc.field if exc.field in FIELDS else "arguments", str(exc)), None
    agree("gather_sequence", mine, *agreement_gather(groups, "gather_sequence agreement"))
    assert seq is not None
    lens = [seq.local_len(r, total) for r in range(n)]
    pad = max(lens)
    x = x_local.detach()
    if x.shape[dim] < pad:
        shape = list(x.shape)
        shape[dim] = pad - x.shape[dim]
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    every = gather_all(groups, x.contiguous(), what="gather_sequence") if n > 1 else x.unsqueeze(0)
    full_shape = list(x_local.shape)
    full_shape[dim] = total
    full = x_local.new_empty(full_shape)
    for r in range(n):
        j = 0
        for start, length in seq.global_ranges(r, total):
            full.narrow(dim, start, length).copy_(every[r].narrow(dim, j, length))
            j += length
    return full


__all__ = ["gather_sequence", "host_cu_seqlens", "shard_sequence"]
