"""tokenloom: long-context parallelism for PyTorch.

Subpackages (each a top-level folder of the repository, mapped here by pyproject.toml):

- ``tokenloom.comm``       rank math, the Communicator over torch.distributed, launchers
- ``tokenloom.parallel``   schedules and runtimes for TokenRing / Ring / Ulysses attention
- ``tokenloom.kernels``    pure-torch reference kernels (also the CPU path) and Triton kernels
- ``tokenloom.placement``  MoE expert placement planner
- ``tokenloom.simulator``  cost model and discrete-event simulator over the same schedules
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
