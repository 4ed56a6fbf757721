"""This process as one rank of a job started by torchrun (or by hand with the same variables).

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``torch.distributed.rendezvous("env://")`` turns them into a store: torchrun's agent store (it
outlives any worker; tokenloom prefixes its keys with the restart attempt, so ``--max-restarts``
starts clean), or, for ranks started by hand, a TCPStore hosted by rank 0. Every rank gets every
rank's result.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from typing import Any, Callable

from tokenloom.common.errors import UsageError


def run(job: Callable, config: Any, *, timeout_s: float = 60.0, world_size: int | None = None,
        backend: str | None = None) -> list[Any]:
    """Run this process's rank of ``job(comm, config)``; return every rank's result in rank order."""
    import torch.distributed as dist

    from tokenloom.comm.launch.env import TORCHRUN_VARS, under_torchrun
    from tokenloom.comm.launch.rank import run_rank

    if not under_torchrun():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        raise UsageError(f"launcher: not under torchrun (missing {', '.join(missing)}); run "
                         f"'torchrun --nproc-per-node N -m tokenloom ...' or use --launcher local",
                         field="launcher")
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size is not None and world_size != env_world:
        raise UsageError(f"world_size ({world_size}) differs from torchrun's WORLD_SIZE ({env_world})",
                         field="world_size")
    rdzv_timeout = datetime.timedelta(seconds=max(timeout_s, 300.0))
    store, rank, world = next(dist.rendezvous("env://", timeout=rdzv_timeout))
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    # The agent's store outlives a restart (--max-restarts): keys of attempt k must not be read
    # by attempt k+1 (a stale gloo address there fails the rendezvous with "connection refused").
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    previous = _raise_on_sigterm()
    try:
        return run_rank(job, config, store=dist.PrefixStore(f"tokenloom/attempt{attempt}", store), rank=rank,
                        world_size=world, timeout_s=timeout_s, backend=backend, gather=True,
                        store_host=None if agent else 0)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm() -> Any:
    """torchrun's agent SIGTERMs every worker as soon as one dies (and SIGKILLs them ~30 s later):
    turn it into an exception so the survivor still names the lost rank before it exits."""
    from tokenloom.comm import health

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise health.Terminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)
