"""The Communicator: the one object through which tokenloom code talks to other ranks.

It wraps a ``torch.distributed`` ProcessGroup (NCCL on GPU, gloo on CPU) or a 1-D DeviceMesh and
offers exactly what the strategies need: batched point-to-point returning a :class:`Handle`,
all-to-all, all-gather, and a cheap agreement check. With one rank (or no process group at all)
every operation is the identity, so single-process runs walk the same code path (STYLE.md §6).

Why an agreement check: a send/recv size mismatch hangs NCCL or fills a buffer partially
(REFERENCE.md §3). Every P2P size in tokenloom derives from the tensor shapes and the schedule, so
:meth:`Communicator.check_agree` on the shapes, once per call, turns a would-be hang into an error
naming the disagreeing ranks.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from tokenloom.comm import health, rollcall
from tokenloom.comm.health import PeerLostError
from tokenloom.common.errors import UsageError


# torch 2.13 renames the flat all-gather; older releases only have the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resolve_group(group: Any) -> dist.ProcessGroup | None:
    """Accept a ProcessGroup, a 1-D DeviceMesh or None (the default group, if any)."""
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # DeviceMesh
        if group.ndim != 1:
            raise UsageError(f"group: a DeviceMesh must be 1-D, got ndim={group.ndim}", field="group")
        return group.get_group()
    raise UsageError(f"group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}",
                     field="group")


class CommError(RuntimeError):
    """A collective or P2P operation failed or timed out; the message names the ranks involved."""


class Handle:
    """An in-flight communication; :meth:`wait` blocks until it is done (STYLE.md §7).

    On CPU backends the wait polls the work objects instead of blocking inside gloo, so that the
    rank's watchdog (:mod:`tokenloom.comm.health`) can turn a lost peer into a
    :class:`PeerLostError` naming it, and a transfer stuck longer than the timeout into an error
    saying where each peer is. NCCL works are waited on as before (a stream dependency, not a
    host block); the process-group timeout bounds them.
    """

    def __init__(self, works: Sequence[Any], what: str, timeout: datetime.timedelta | None,
                 on_done: Any = None, peers: Sequence[int] = (), poll: bool = True,
                 group: Any = None, members: Sequence[int] = ()) -> None:
        self._works = list(works)
        self._group = group
        self._members = list(members)
        self._what = what
        self._timeout = timeout
        self._on_done = on_done
        self._peers = list(peers)
        self._poll = poll
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        monitor = health.active()
        if self._works:
            health.set_comm(f"waiting: {self._what}")
        try:
            if monitor is not None and self._poll and self._works:
                self._poll_until_done(monitor)
            else:
                for work in self._works:
                    if self._timeout is None:
                        work.wait()
                    else:
                        work.wait(self._timeout)
        except (CommError, PeerLostError):
            raise
        except Exception as exc:  # gloo raises RuntimeError; NCCL may raise DistBackendError
            raise self._explain(exc, monitor) from exc
        if self._works:
            health.set_comm(f"done: {self._what}")
        if self._on_done is not None:
            self._on_done()
        self.done = True

    def _limit_s(self, monitor: Any) -> float:
        return self._timeout.total_seconds() if self._timeout is not None else monitor.timeout_s

    def _poll_until_done(self, monitor: Any) -> None:
        """Wait in the waiter thread; meanwhile watch the monitor and the time limit.

        gloo's point-to-point works report completion only from inside ``wait()``, and a wait
        that times out leaves the pair unusable, so the blocking wait runs in a helper thread
        and this thread stays free to raise as soon as the watchdog knows of a lost peer.
        """
        if monitor.failure is not None:
            raise _lost_error(self._what, monitor.failure)
        start = time.monotonic()
        limit = self._limit_s(monitor)
        pending = _waiter().submit(_wait_all, self._works)
        while True:
            try:
                pending.result(timeout=min(0.25, monitor.interval_s))
                return
            except concurrent.futures.TimeoutError:
                pass
            if monitor.failure is not None:
                raise _lost_error(self._what, monitor.failure)
            if time.monotonic() - start > limit:
                missing = self._peers or list(range(monitor.world_size))
                failure = monitor.stuck(self._what, missing, limit)
                if failure is not None:
                    raise _lost_error(self._what, failure)
                raise CommError(f"{self._what} did not complete within {limit:g} s (a rank skipped "
                                f"a call, or waits in another one); where the peers are: "
                                f"{monitor.describe_peers([p for p in missing if p != monitor.rank])}")

    def _explain(self, exc: Exception, monitor: Any) -> Exception:
        if monitor is None:
            if len(self._members) > 1:  # the user's own process group: ask who is still there
                return CommError(rollcall.explain(self._what, exc, self._group, self._members, self._peers))
            return CommError(f"{self._what} failed: {exc}")
        failure = monitor.verdict(self._peers or list(range(monitor.world_size)),
                                  grace_s=self._limit_s(monitor))
        if failure is not None:
            return _lost_error(self._what, failure)
        return CommError(f"{self._what} failed: {exc}; peers: "
                         f"{monitor.describe_peers([p for p in self._peers if p != monitor.rank])}")


_WAITER: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _waiter() -> concurrent.futures.ThreadPoolExecutor:
    """This process's waiter thread (per pid: threads do not survive fork)."""
    pid = os.getpid()
    if pid not in _WAITER:
        _WAITER.clear()
        _WAITER[pid] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenloom-wait")
    return _WAITER[pid]


_BUSY = [0]


def _wait_all(works: Sequence[Any]) -> None:
    _BUSY[0] += 1
    try:
        for work in works:
            work.wait()
    finally:
        _BUSY[0] -= 1


def waits_in_flight() -> bool:
    """True while the waiter thread is blocked on a transfer (one abandoned after a lost peer:
    destroying the process group would wait for it until the backend's own timeout)."""
    return _BUSY[0] > 0


def _lost_error(what: str, failure: dict) -> PeerLostError:
    return PeerLostError(f"{what} failed: {health.describe_abort(failure)}",
                         lost=failure.get("lost"), info=failure)


@dataclass(frozen=True)
class P2P:
    """One point-to-point transfer as the runtime posts it: send ``tensor`` to / recv into it from ``peer``."""

    op: str  # "send" | "recv"
    peer: int  # rank within the communicator's group
    tensor: torch.Tensor


class Communicator:
    """Rank-local view of a process group.

    Args:
        group: ProcessGroup, 1-D DeviceMesh, or None for the default group. When torch.distributed
            is not initialised and ``group`` is None, the communicator is a world of one.
        timeout: per-wait timeout; None uses the process group's own timeout.
    """

    def __init__(self, group: Any = None, *, timeout: datetime.timedelta | None = None) -> None:
        self.group = resolve_group(group)
        self.timeout = timeout
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            self.rank, self.world_size, self.backend = 0, 1, "local"
        else:
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
            self.backend = str(dist.get_backend(self.group))
        self._members = self._all_global()  # global ranks: collectives' peers; who to name if one is lost

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"

    @property
    def device(self) -> torch.device:
        """Device that collective scratch tensors must live on for this backend."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _all_global(self) -> list[int]:
        return [self._global(r) for r in range(self.world_size)]

    def _handle(self, works: list[Any], desc: str, peers: list[int]) -> Handle:
        return Handle(works, desc, self.timeout, peers=peers, poll=self.backend != "nccl",
                      group=self.group, members=self._members)

    # ---------------------------------------------------------------- point to point
    def batch_p2p(self, ops: Sequence[P2P], what: str = "p2p") -> Handle:
        """Post all ``ops`` at once; sends and receives progress concurrently until ``wait()``.

        Transfers to oneself are copies (the world-of-one identity). The k-th send from a to b
        matches the k-th receive at b from a, so callers must post in a consistent order (the
        schedule checker proves this for every schedule).
        """
        self_sends = [o.tensor for o in ops if o.op == "send" and o.peer == self.rank]
        self_recvs = [o.tensor for o in ops if o.op == "recv" and o.peer == self.rank]
        if len(self_sends) != len(self_recvs):
            raise CommError(f"{what}: rank {self.rank} posts {len(self_sends)} sends to itself "
                            f"but {len(self_recvs)} receives")
        for src, dst in zip(self_sends, self_recvs):
            if src.shape != dst.shape:
                raise CommError(f"{what}: rank {self.rank} self-transfer shape {tuple(src.shape)} "
                                f"!= receive buffer {tuple(dst.shape)}")
            dst.copy_(src)
        remote = [o for o in ops if o.peer != self.rank]
        for o in remote:
            if o.op not in ("send", "recv"):
                raise UsageError(f"P2P.op must be 'send' or 'recv', got {o.op!r}", field="P2P.op")
            if not 0 <= o.peer < self.world_size:
                raise CommError(f"{what}: rank {self.rank} addresses peer {o.peer} outside "
                                f"world_size {self.world_size}")
            if not o.tensor.is_contiguous():
                raise CommError(f"{what}: P2P tensors must be contiguous")
        if not remote:
            return Handle([], what, self.timeout)
        p2p_ops = [
            dist.P2POp(dist.isend if o.op == "send" else dist.irecv, o.tensor,
                       peer=self._global(o.peer), group=self.group)
            for o in remote
        ]
        peers = sorted({o.peer for o in remote})
        desc = f"{what} on rank {self.rank} with peers {peers}"
        health.set_comm(desc)
        global_peers = [self._global(p) for p in peers]
        try:
            works = dist.batch_isend_irecv(p2p_ops)
        except Exception as exc:  # a peer already gone: explained like a failed wait (who is lost)
            handle = self._handle([], f"{desc} (posting)", global_peers)
            raise handle._explain(exc, health.active()) from exc
        return self._handle(works, desc, global_peers)

    # ---------------------------------------------------------------- collectives
    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, what: str = "all_to_all") -> Handle:
        """Equal-split all-to-all along dim 0 (``input.shape[0]`` divisible by world size)."""
        if self.world_size == 1:
            output.copy_(input)
            return Handle([], what, self.timeout)
        desc = f"{what} on rank {self.rank}"
        health.set_comm(desc)
        work = dist.all_to_all_single(output, input, group=self.group, async_op=True)
        return self._handle([work], desc, self._members)

    def all_gather(self, tensor: torch.Tensor, what: str = "all_gather") -> torch.Tensor:
        """Stack every rank's ``tensor`` along a new dim 0; shape ``(world_size, *tensor.shape)``."""
        if self.world_size == 1:
            return tensor.unsqueeze(0).clone()
        flat = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        desc = f"{what} on rank {self.rank}"
        health.set_comm(desc)
        work = _all_gather_single(flat, tensor.contiguous().view(-1), group=self.group, async_op=True)
        self._handle([work], desc, self._members).wait()
        return flat.view(self.world_size, *tensor.shape)

    def all_reduce(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        """In-place sum over ranks."""
        if self.world_size > 1:
            desc = f"{what} on rank {self.rank}"
            health.set_comm(desc)
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
            self._handle([work], desc, self._members).wait()
        return tensor

    def check_agree(self, what: str, values: Sequence[int]) -> None:
        """Raise UsageError (a ValueError) unless every rank passes the same integers (e.g. tensor shapes).

        One tiny all-gather; called before any P2P so that a mismatch is an error, not a hang.
        """
        if self.world_size == 1:
            return
        mine = torch.tensor([len(values), *values], dtype=torch.int64, device=self.device)
        lengths = self.all_gather(mine[:1])
        if not bool((lengths == lengths[0]).all()):
            raise UsageError(f"{what}: ranks pass different numbers of values: "
                             f"{lengths.flatten().tolist()}", field=what)
        every = self.all_gather(mine).cpu()
        ref = every[0]
        bad = [r for r in range(self.world_size) if not torch.equal(every[r], ref)]
        if bad:
            shown = {r: every[r, 1:].tolist() for r in [0, *bad]}
            raise UsageError(f"{what} differs across ranks (rank: values) {shown}", field=what)
