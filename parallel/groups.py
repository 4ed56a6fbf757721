"""The ``group=`` argument of the attention API: a flat group or a 2-D ("ulysses", "ring") mesh.

:func:`resolve_sp_group` turns ``None``, a ProcessGroup, a 1-D DeviceMesh or a 2-D DeviceMesh
with dims named ``"ulysses"`` and ``"ring"`` into a :class:`~tokenloom.parallel.runtime.Groups`
(the communicators one SP rank uses). On a 2-D mesh the SP rank is
``ring_rank * ulysses + ulysses_rank`` whatever the order of the mesh dims; put the Ulysses dim on
the ranks of one node (``init_device_mesh("cuda", (nodes, 8), mesh_dim_names=("ring",
"ulysses"))``) so the all-to-all stays on NVLink. No process group is created here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from tokenloom.comm.communicator import Communicator
from tokenloom.common.errors import UsageError
from tokenloom.parallel.runtime import Groups

MESH_DIMS = ("ulysses", "ring")


def _is_mesh(group: Any) -> bool:
    return hasattr(group, "get_group") and hasattr(group, "ndim") and hasattr(group, "mesh_dim_names")


def resolve_sp_group(group: Any, *, timeout=None) -> Groups:
    """Communicators for ``group`` (see module docstring); raises UsageError for anything else."""
    if _is_mesh(group) and group.ndim == 2:
        names = tuple(group.mesh_dim_names or ())
        if sorted(names) != sorted(MESH_DIMS):
            raise UsageError(f"group: a 2-D DeviceMesh needs mesh_dim_names {MESH_DIMS} (any order), "
                             f"got {names}")
        uly = Communicator(group.get_group("ulysses"), timeout=timeout)
        ring = Communicator(group.get_group("ring"), timeout=timeout)
        u = uly.world_size
        return Groups(ring.rank * u + uly.rank, u * ring.world_size, ring, uly, u)
    if _is_mesh(group) and group.ndim != 1:
        raise UsageError(f"group: a DeviceMesh must be 1-D or 2-D ('ulysses', 'ring'), got ndim={group.ndim}")
    try:
        comm = Communicator(group, timeout=timeout)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return Groups.flat(comm)


def gather_all(groups: Groups, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Every SP rank's ``tensor`` stacked in SP-rank order: ``(world_size, *tensor.shape)``.

    One all-gather on a flat group; on a 2-D mesh one over the Ulysses dim, then one over the ring.
    """
    if groups.ulysses == 1:
        return groups.p2p.all_gather(tensor, what=what)
    inner = groups.a2a.all_gather(tensor, what=f"{what} (ulysses)")
    outer = groups.p2p.all_gather(inner, what=f"{what} (ring)")
    return outer.reshape(groups.world_size, *tensor.shape)


def agreement_gather(groups: Groups, what: str):
    """``(gather, device)`` for the argument agreement: ONE all-gather whenever possible.

    A flat group gathers over itself; a 2-D mesh that spans the default group gathers over the
    default group (ranks then named by global rank); a smaller 2-D mesh needs the two-step
    :func:`gather_all`. ``gather`` is None for a world of one.
    """
    if groups.world_size == 1:
        return None, groups.p2p.device
    if groups.ulysses > 1 and dist.is_initialized() and dist.get_world_size() == groups.world_size:
        world = Communicator(None, timeout=groups.p2p.timeout)
        return functools.partial(world.all_gather, what=what), world.device
    return functools.partial(gather_all, groups, what=what), groups.p2p.device
