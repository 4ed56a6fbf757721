"""Fused AllReduce + residual + RMSNorm, and the stream it runs on beside compute.

TokenWeave (arXiv 2505.11329, REFERENCE.md §4) replaces ``AllReduce -> add residual -> RMSNorm``
by ``ReduceScatter -> add + RMSNorm on this rank's 1/TP of the rows -> AllGather``: the residual
stays sharded by tokens, only the normalised output is replicated, and each rank normalises
``1/TP`` of the rows. One entry point, :func:`fused_allreduce_residual_rmsnorm`, has three paths
chosen by one selector, :func:`select_path`:

- ``"multimem"`` (Hopper, torch symmetric memory with NVLink multicast, bf16, hidden % 8 == 0):
  one-shot ``multimem`` reduce into a symmetric buffer, add+RMSNorm of this rank's rows, and a
  ``multimem`` all-gather. Built and guarded; it needs sm_90+ GPUs with multicast, so it never
  runs on CPU machines and its test is GPU-marked. (The paper fuses all three into one kernel;
  here they are three torch symmetric-memory ops.)
- ``"nccl"`` (other CUDA): NCCL reduce-scatter, the Triton residual+RMSNorm kernel, NCCL
  all-gather.
- ``"gloo"`` (CPU): the same sequence over gloo with the torch reference norm.

Rows: ``partial`` is this rank's partial sum ``(rows, hidden)`` with ``rows`` a multiple of the
group size (callers pad); rank ``r`` owns rows ``[r*rows/TP, (r+1)*rows/TP)``, and its residual
shard is those rows. With one rank every collective is the identity (STYLE.md §6).

:class:`CommStream` is where the fused op runs while compute continues: a high-priority CUDA
stream on GPUs, one worker thread on CPU (gloo collectives and torch ops release the GIL, so the
thread overlaps the main thread's matmuls). :meth:`CommStream.submit` returns a :class:`Pending`
whose ``wait()`` returns the result (STYLE.md §7: asynchrony is explicit).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
import torch.distributed as dist

from tokenloom.comm.communicator import Communicator
from tokenloom.common.errors import UsageError

PATHS = ("multimem", "nccl", "gloo")

try:  # the kernels helper's dispatcher (Triton on CUDA, torch reference elsewhere)
    from tokenloom.kernels import residual_rmsnorm
except ImportError:  # pragma: no cover - only while kernels/ lacks it
    def residual_rmsnorm(x, residual, weight, eps=1e-6, *, impl=None):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        new = x if residual is None else (x.to(acc) + residual.to(acc)).to(x.dtype)
        nf = new.to(acc)
        normed = nf * torch.rsqrt(nf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
        return normed.to(x.dtype), new


# torch 2.13 renames the flat collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    _all_gather_flat(out, inp, group=group)


def multimem_usable(comm: Communicator, device: torch.device, dtype: torch.dtype, hidden: int) -> bool:
    """True when the Hopper multicast path can run: CUDA sm_90+, multicast, bf16, hidden % 8 == 0."""
    if device.type != "cuda" or comm.world_size < 2 or dtype != torch.bfloat16 or hidden % 8:
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from torch._C._distributed_c10d import _SymmetricMemory
        from torch.distributed._symmetric_memory import DeviceType

        return bool(_SymmetricMemory.has_multicast_support(DeviceType.CUDA, device.index or 0))
    except (ImportError, AttributeError, RuntimeError):
        return False


def select_path(comm: Communicator, device: torch.device, dtype: torch.dtype, hidden: int,
                path: str | None = None) -> str:
    """``path`` if given (validated), else multimem where usable, else nccl on CUDA, else gloo."""
    if path is not None:
        if path not in PATHS:
            raise UsageError(f"path must be one of {PATHS} or None, got {path!r}", field="path")
        if path == "multimem" and not multimem_usable(comm, device, dtype, hidden):
            raise UsageError("path='multimem' needs CUDA sm_90+ GPUs with NVLink multicast, bf16 and "
                             "hidden % 8 == 0 on >= 2 ranks; use path=None", field="path")
        return path
    if multimem_usable(comm, device, dtype, hidden):
        return "multimem"
    return "nccl" if device.type == "cuda" else "gloo"


def _rows_of_rank(rows: int, comm: Communicator) -> slice:
    if rows % comm.world_size:
        raise UsageError(f"partial rows ({rows}) must be a multiple of the group size ({comm.world_size}); "
                         "pad first", field="partial")
    m = rows // comm.world_size
    return slice(comm.rank * m, (comm.rank + 1) * m)


def _reduce_scatter_path(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float, comm: Communicator, norm_impl: str | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    mine = _rows_of_rank(partial.shape[0], comm)
    if comm.world_size == 1:
        reduced = partial
    else:
        reduced = torch.empty((mine.stop - mine.start, *partial.shape[1:]), dtype=partial.dtype,
                              device=partial.device)
        _reduce_scatter_flat(reduced, partial.contiguous(), group=comm.group)
    normed_mine, new_residual = residual_rmsnorm(reduced, residual, weight, eps, impl=norm_impl)
    if comm.world_size == 1:
        return normed_mine, new_residual
    normed = torch.empty_like(partial)
    _all_gather_into(normed, normed_mine.contiguous(), comm.group)
    return normed, new_residual


_SYMM_BUFFERS: dict[tuple, Any] = {}


def _symm_buffer(shape: tuple, dtype: torch.dtype, device: torch.device, group_name: str, tag: str):
    """A symmetric-memory buffer per (shape, dtype, group), allocated and rendezvoused once."""
    import torch.distributed._symmetric_memory as symm_mem

    key = (tag, shape, dtype, str(device), group_name)
    if key not in _SYMM_BUFFERS:
        buf = symm_mem.empty(shape, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, group_name)
        _SYMM_BUFFERS[key] = buf
    return _SYMM_BUFFERS[key]


def _multimem_path(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                   comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - Hopper only
    group = comm.group or dist.group.WORLD
    name = group.group_name
    mine = _rows_of_rank(partial.shape[0], comm)
    src = _symm_buffer(tuple(partial.shape), partial.dtype, partial.device, name, "in")
    src.copy_(partial)
    reduced = torch.ops.symm_mem.multimem_one_shot_all_reduce(src, "sum", name)
    normed_mine, new_residual = residual_rmsnorm(reduced[mine], residual, weight, eps)
    out = _symm_buffer(tuple(partial.shape), partial.dtype, partial.device, name, "out")
    torch.ops.symm_mem.multimem_all_gather_out(normed_mine.contiguous(), name, out)
    return out.clone(), new_residual


def fused_allreduce_residual_rmsnorm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                     eps: float, comm: Communicator, *, path: str | None = None,
                                     norm_impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)`` of ``AllReduce(partial) + residual`` for this rank's rows.

    Args:
        partial: ``(rows, hidden)`` this rank's partial sum; ``rows`` divisible by the group size.
        residual: ``(rows / world_size, hidden)`` this rank's residual shard.
        weight: ``(hidden,)`` RMSNorm weight.
    Returns:
        ``normed`` ``(rows, hidden)``, replicated on every rank, and this rank's new residual shard
        ``(rows / world_size, hidden)`` (= its rows of the reduced sum plus ``residual``).
    """
    mine = _rows_of_rank(partial.shape[0], comm)
    if residual.shape != (mine.stop - mine.start, partial.shape[1]):
        raise UsageError(f"residual shard must be {(mine.stop - mine.start, partial.shape[1])}, "
                         f"got {tuple(residual.shape)}", field="residual")
    chosen = select_path(comm, partial.device, partial.dtype, partial.shape[-1], path)
    if chosen == "multimem":
        return _multimem_path(partial, residual, weight, eps, comm)
    return _reduce_scatter_path(partial, residual, weight, eps, comm, norm_impl)


def allreduce_residual_rmsnorm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float, comm: Communicator, *, norm_impl: str | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: AllReduce, then add the (replicated) residual and RMSNorm every row."""
    comm.all_reduce(partial, what="tokenweave baseline all_reduce")
    return residual_rmsnorm(partial, residual, weight, eps, impl=norm_impl)


class Pending:
    """A result being computed on a :class:`CommStream`; ``wait()`` returns it (once ready)."""

    def __init__(self, future: Future | None = None, value: Any = None, event: Any = None,
                 keep: tuple = ()) -> None:
        self._future, self._value, self._event, self._keep = future, value, event, keep

    def wait(self) -> Any:
        if self._future is not None:
            self._value, self._future = self._future.result(), None
        if self._event is not None:  # the compute stream waits for the comm stream's work
            stream = torch.cuda.current_stream()
            stream.wait_event(self._event)
            for t in _tensors(self._value):
                t.record_stream(stream)
            self._event = None
        self._keep = ()
        return self._value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class CommStream:
    """Runs submitted functions in order beside the compute stream.

    CUDA: a high-priority stream that first waits for the work queued so far on the current
    stream. CPU: one worker thread with the caller's intra-op thread count (a forked rank's new
    thread must not start OpenMP with the default count: REFERENCE.md §7).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._stream = None
        self._pool = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device, priority=-1)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenweave-comm",
                                            initializer=torch.set_num_threads,
                                            initargs=(torch.get_num_threads(),))

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        if self._pool is not None:
            return Pending(future=self._pool.submit(fn, *args, **kwargs), keep=args)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            value = fn(*args, **kwargs)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Pending(value=value, event=event, keep=args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "CommStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
