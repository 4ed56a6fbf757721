"""One rank of an SPMD job, the same under every launcher.

A launcher (forked local ranks, torchrun, a Ray actor, a user's script) hands :func:`run_rank` a
c10d store shared by all ranks, this rank's number and the world size. The rank then

1. starts its heartbeat/watchdog in the store (:class:`tokenloom.comm.health.Monitor`),
2. forms the process group from the same store (gloo on CPU, NCCL with one GPU per rank),
3. runs ``job(comm, config)`` and turns its result into plain data (tensors become numpy),
4. publishes the result (``result/<rank>``) or its error (``error/<rank>``) in the store, so the
   launcher can name every failed rank, and a failure before the others notice becomes the
   ``abort`` record every survivor reads.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback
from typing import Any, Callable

from tokenloom.comm import health


def plain(obj: Any) -> Any:
    """``obj`` with tensors turned into numpy arrays (safe to pickle across processes)."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def pick_backend(backend: str | None) -> tuple[str, Any]:
    """("nccl", cuda device) when CUDA is usable and not refused, else ("gloo", cpu)."""
    import torch

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "nccl" and not use_cuda:
        from tokenloom.common.errors import UsageError

        raise UsageError("backend: nccl needs a CUDA GPU on every rank; use gloo on CPU", field="backend")
    if not use_cuda:
        return "gloo", torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return "nccl", torch.device("cuda", local)


def run_rank(job: Callable, config: Any, *, store: Any, rank: int, world_size: int,
             timeout_s: float, backend: str | None = None, gather: bool = False,
             store_host: int | None = None) -> Any:
    """Run ``job(comm, config)`` as ``rank`` of ``world_size`` over ``store``; return its plain result
    (with ``gather``: every rank's result, in rank order, on every rank).

    Raises whatever the job raised; a lost peer surfaces as :class:`health.PeerLostError`.
    ``store_host`` is the rank whose process hosts the store, if any (named when it vanishes).
    """
    import torch
    import torch.distributed as dist

    from tokenloom.comm.communicator import Communicator

    monitor = health.Monitor(store, rank, world_size, timeout_s=timeout_s,
                             store_host=store_host).start()
    health.set_step("init process group")
    state = "failed"
    try:
        backend, device = pick_backend(backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            kwargs = {"device_id": device} if backend == "nccl" else {}
            # A little above the watchdog's bound, so the watchdog's message (naming the lost
            # rank) wins over the backend's own timeout.
            # gloo waits go through the watchdog (bounded by timeout_s); the group's own timeout
            # also covers the rendezvous, where a cold rank may still be importing torch.
            slack = 2 * monitor.interval_s + 1
            bound = timeout_s if backend == "nccl" else max(timeout_s, monitor.startup_s)
            pg_timeout = datetime.timedelta(seconds=bound + slack)
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                                    world_size=world_size, timeout=pg_timeout, **kwargs)
        health.set_step("job")
        result = plain(job(Communicator(), config))
        health.set_step("job done")
        store.set(f"result/{rank}", pickle.dumps(result))
        if gather:
            result = _gather(store, monitor, world_size)
        state = "done"
        return result
    except health.Terminated as exc:
        # The launcher stops every worker when one dies (torchrun does): find out which one.
        failure = monitor.failure or monitor.verdict(list(range(world_size)), grace_s=min(timeout_s, 20.0))
        where = health.describe_abort(failure) if failure else "no peer is known to be lost"
        _report_error(store, monitor, rank, exc)
        raise health.PeerLostError(f"terminated by the launcher at '{health.current_step()}': {where}",
                                   lost=failure.get("lost") if failure else [], info=failure) from exc
    except BaseException as exc:
        _report_error(store, monitor, rank, exc)
        raise
    finally:
        monitor.stop(state)
        from tokenloom.comm.communicator import waits_in_flight

        # After a failure a transfer may still be blocked on a lost peer; destroying the group
        # would wait for it, so the group is left to the process's exit (launchers end it).
        if dist.is_initialized() and (state == "done" or not waits_in_flight()):
            dist.destroy_process_group()


def _gather(store: Any, monitor: health.Monitor, world_size: int) -> list[Any]:
    """Every rank's published result; no time limit while the peers are alive and beating."""
    health.set_step("gather results")
    missing = set(range(world_size))
    while missing:
        missing = {r for r in missing if not store.check([f"result/{r}"])}
        if missing and monitor.failure is not None:
            raise health.PeerLostError(f"gathering results: {health.describe_abort(monitor.failure)}",
                                       lost=monitor.failure.get("lost"), info=monitor.failure)
        if missing:
            time.sleep(monitor.interval_s / 2)
    return [pickle.loads(store.get(f"result/{r}")) for r in range(world_size)]


def _report_error(store: Any, monitor: health.Monitor, rank: int, exc: BaseException) -> None:
    """Leave this rank's error in the store; if it was not caused by a lost peer, this rank is
    the failure the others must hear about (they may be blocked waiting for it)."""
    try:
        store.set(f"error/{rank}", traceback.format_exc())
        if not isinstance(exc, (health.PeerLostError, health.Terminated)) and monitor.failure is None:
            text = f"{type(exc).__name__}: {health_line(exc)}"
            monitor.publish([rank], f"failed with {text}", by=f"rank {rank}")
    except Exception:  # the store is gone too: the launcher reports what it can
        pass


def health_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
