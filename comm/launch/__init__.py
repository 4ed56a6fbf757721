"""tokenloom.comm.launch: the one SPMD entry, called the same way by torchrun, Ray, local ranks and scripts.

A *job* is ``job(comm, config) -> plain data`` where ``comm`` is this rank's
:class:`tokenloom.comm.communicator.Communicator` over the default process group and ``config`` a
frozen dataclass. :func:`run_job` runs it on every rank and returns each rank's result in rank
order. Every launcher shares one fault mechanism (heartbeats and a watchdog in the c10d store,
:mod:`tokenloom.comm.health`): a rank that dies, stops or fails makes every other rank raise an
error naming it, its host and its last step within ``timeout_s``, and the launcher's
:class:`JobError` names every lost and failed rank. ``timeout_s`` bounds a stuck transfer or a
silent peer, never the whole run.

Nothing heavy is imported here: torch on first use, Ray only by ``tokenloom.comm.launch.ray``.
"""

from __future__ import annotations

from typing import Any, Callable

from tokenloom.common.errors import UsageError
from tokenloom.common.checks import check_choice, check_int, check_number

LAUNCHERS = ("auto", "torchrun", "local", "ray")
# The smallest timeout a heartbeat can meet: ranks beat every max(0.05, timeout/10) s from a helper
# thread, and a busy rank's thread can be late by tens of milliseconds; below a second every rank
# would be declared "not responding" while all of them are fine.
MIN_TIMEOUT_S = 1.0

__all__ = ["LAUNCHERS", "JobError", "resolve_launcher", "run_job"]


def __getattr__(name: str) -> Any:
    if name == "JobError":
        from tokenloom.comm.launch.summary import JobError

        return JobError
    raise AttributeError(f"module 'tokenloom.comm.launch' has no attribute {name!r}")


def resolve_launcher(launcher: str, address: str | None = None) -> str:
    """"auto" is torchrun under torchrun's environment, Ray with an address, else local."""
    check_choice(launcher, "launcher", LAUNCHERS)
    if launcher != "auto":
        return launcher
    from tokenloom.comm.launch.env import under_torchrun

    if under_torchrun():
        return "torchrun"
    return "ray" if address else "local"


def run_job(job: Callable, config: Any, *, launcher: str = "auto", world_size: int | None = None,
            timeout_s: float = 60.0, address: str | None = None, backend: str | None = None,
            threads: int | None = None) -> list[Any]:
    """Run ``job(comm, config)`` on every rank; return each rank's plain-data result in rank order.

    Args:
        launcher: "torchrun" (this process is one rank; every rank gets the full list),
            "local" (fork ``world_size`` gloo ranks here), "ray" (``world_size`` rank actors on the
            cluster at ``address``, or a local one), or "auto".
        world_size: ranks for local and Ray (default 2); under torchrun it must match WORLD_SIZE.
        timeout_s: seconds before a lost peer or a stuck transfer is an error naming the rank.
        backend: "gloo" or "nccl" (default: NCCL when every rank has a GPU).
        threads: intra-op threads per local rank (default: cores / world_size).

    Raises:
        UsageError: bad arguments (or every rank refused the same input).
        JobError: ranks failed or were lost; the message names them, their node and step.
    """
    check_number(timeout_s, "timeout_s", lo=MIN_TIMEOUT_S)
    launcher = resolve_launcher(launcher, address)
    if backend is not None:
        check_choice(backend, "backend", ("gloo", "nccl"))
    if launcher == "torchrun":
        from tokenloom.comm.launch import torchrun

        return torchrun.run(job, config, timeout_s=timeout_s, world_size=world_size, backend=backend)
    world_size = check_int(2 if world_size is None else world_size, "world_size", lo=1, hi=4096)
    if launcher == "local":
        if backend == "nccl":
            raise UsageError("backend: the local launcher forks CPU ranks (gloo); use torchrun or "
                             "Ray for NCCL", field="backend")
        from tokenloom.comm.launch import local

        return local.run(job, config, world_size=world_size, timeout_s=timeout_s, threads=threads)
    from tokenloom.comm.launch import ray as ray_launcher

    return ray_launcher.run(job, config, world_size=world_size, timeout_s=timeout_s,
                            address=address, backend=backend)
