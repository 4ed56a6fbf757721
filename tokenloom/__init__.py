"""tokenloom: long-context parallelism for PyTorch.

Subpackages (each a top-level folder of the repository, mapped here by pyproject.toml):

- ``tokenloom.common``     the ground floor: errors, value checks, file I/O (pure Python)
- ``tokenloom.comm``       rank math, the Communicator over torch.distributed, node discovery,
                           launchers (``tokenloom.comm.launch.run_job``)
- ``tokenloom.parallel``   schedules and runtimes for TokenRing / Ring / Ulysses attention
- ``tokenloom.kernels``    pure-torch reference kernels (also the CPU path) and Triton kernels
- ``tokenloom.placement``  MoE expert placement planner
- ``tokenloom.simulator``  cost model and discrete-event simulator over the same schedules

The most used names are re-exported here and imported on first use (so ``tokenloom --help`` and
the simulator stay quick): ``tokenloom.sp_attention``, ``tokenloom.plan_placement``, ...
"""

from __future__ import annotations

from tokenloom.common.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "token_ring_attention": "tokenloom.parallel",
    "ring_attention": "tokenloom.parallel",
    "ulysses_attention": "tokenloom.parallel",
    "sp_attention": "tokenloom.parallel",
    "shard_sequence": "tokenloom.parallel",
    "gather_sequence": "tokenloom.parallel",
    "build_schedule": "tokenloom.parallel",
    "block_attention": "tokenloom.kernels",
    "load_trace": "tokenloom.placement",
    "plan_placement": "tokenloom.placement",
    "evaluate_plan": "tokenloom.placement",
    "choose_strategy": "tokenloom.simulator",
    "detect_hardware": "tokenloom.simulator",
    "run_job": "tokenloom.comm.launch",
}

__all__ = ["__version__", *sorted(_LAZY)]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
