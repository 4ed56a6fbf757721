"""Process-group set-up from a launcher's environment (torchrun), for scripts that manage their own
group. Jobs run through :func:`tokenloom.comm.launch.run_job` get the same set-up plus the watchdog that
names a lost rank; prefer that.

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` turns them into an initialised default process group: NCCL with one GPU per
local rank when CUDA is available, gloo on CPU. The timeout bounds every collective and transfer,
so a dead or stuck peer becomes an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when the torchrun (or compatible) environment variables are all set."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_from_env(*, backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """Initialise the default group from torchrun's environment; return (rank, world_size, device).

    ``backend`` defaults to "nccl" when CUDA is available, else "gloo". Idempotent: an already
    initialised group is reused.
    """
    if not under_torchrun():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        from tokenloom.common.errors import UsageError

        raise UsageError(f"launcher: not under torchrun (missing {', '.join(missing)}); run "
                         f"'torchrun --nproc-per-node N -m tokenloom ...' or use --launcher local",
                         field="launcher")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dist.get_rank(), dist.get_world_size(), device
