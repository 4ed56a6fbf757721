"""The placement problem: cluster shape, redundant slots, link bandwidths.

A plan puts ``num_slots = num_experts + num_redundant`` physical experts per layer on
``num_gpus`` GPUs, ``slots_per_gpu`` each; slot ``s`` lives on GPU ``s // slots_per_gpu`` and GPU
``g`` on node ``g // gpus_per_node`` (EPLB / SGLang convention).

Impossible requests are errors, with one documented padding: when ``num_redundant`` is not given
it defaults to the fewest extra slots that make ``num_slots`` a multiple of ``num_gpus``
(``(-num_experts) % num_gpus``), so 8 experts on 16 GPUs become 16 slots, one per GPU, every
expert replicated twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenloom.common.errors import UsageError

DEFAULT_INTRA_NODE_GBPS = 450.0  # NVLink4 through NVSwitch, one direction (REFERENCE.md §6)
DEFAULT_INTER_NODE_GBPS = 50.0  # one 400 Gb/s NIC per GPU
DEFAULT_TOKEN_BYTES = 7168 * 2  # DeepSeek-V3 hidden size in bf16
MAX_GPUS = 4096  # expert-parallel GPUs (deployments run 4 to a few hundred); more is refused up front
MAX_SLOTS_PER_GPU = 1024


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a planner needs besides the trace. Validated on construction."""

    num_layers: int
    num_experts: int
    num_gpus: int
    gpus_per_node: int
    num_redundant: int
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS
    token_bytes: int = DEFAULT_TOKEN_BYTES

    def __post_init__(self) -> None:
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_experts", self.num_experts, 1)
        _check_int("num_gpus", self.num_gpus, 1)
        _check_int("gpus_per_node", self.gpus_per_node, 1)
        _check_int("num_redundant", self.num_redundant, 0)
        _check_int("token_bytes", self.token_bytes, 1)
        if self.num_gpus > MAX_GPUS:
            raise UsageError(f"num_gpus: {self.num_gpus} exceeds the limit {MAX_GPUS}", field="num_gpus")
        if self.num_gpus % self.gpus_per_node:
            valid = ", ".join(map(str, _divisors(self.num_gpus)))
            raise UsageError(f"gpus_per_node: {self.gpus_per_node} does not divide num_gpus={self.num_gpus}; valid: {valid}")
        num_slots = self.num_experts + self.num_redundant
        if num_slots % self.num_gpus:
            fix = (-num_slots) % self.num_gpus
            raise UsageError(
                f"num_redundant: {self.num_experts} experts + {self.num_redundant} redundant = {num_slots} slots "
                f"do not divide evenly over num_gpus={self.num_gpus}; valid: num_redundant = "
                f"{(-self.num_experts) % self.num_gpus} + a multiple of {self.num_gpus} (e.g. {self.num_redundant + fix})"
            )
        if num_slots // self.num_gpus > min(self.num_experts, MAX_SLOTS_PER_GPU):
            raise UsageError(
                f"num_redundant: {num_slots // self.num_gpus} slots per GPU but only {self.num_experts} experts, "
                f"so some GPU would hold two replicas of one expert; valid: num_redundant <= "
                f"{self.num_experts * self.num_gpus - self.num_experts}"
            )
        for name in ("intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) or value <= 0:
                raise UsageError(f"{name}: must be a positive number, got {value!r}")

    @classmethod
    def build(
        cls,
        num_layers: int,
        num_experts: int,
        num_gpus: int,
        gpus_per_node: int | None = None,
        num_redundant: int | None = None,
        **bandwidths: float,
    ) -> "PlacementProblem":
        """Fill the defaults: ``gpus_per_node = min(num_gpus, 8)``; redundant slots as the module says."""
        _check_int("num_gpus", num_gpus, 1)
        _check_int("num_experts", num_experts, 1)
        if num_gpus > MAX_GPUS:
            raise UsageError(f"num_gpus: {num_gpus} exceeds the limit {MAX_GPUS}", field="num_gpus")
        if gpus_per_node is None:
            gpus_per_node = min(int(num_gpus), 8)
            if num_gpus % gpus_per_node:  # e.g. 12 GPUs: fall back to one node rather than fail
                gpus_per_node = int(num_gpus)
        if num_redundant is None:
            num_redundant = (-int(num_experts)) % int(num_gpus)
        return cls(num_layers, num_experts, num_gpus, gpus_per_node, num_redundant, **bandwidths)

    @property
    def num_slots(self) -> int:
        return self.num_experts + self.num_redundant

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def node_of_gpu(self) -> np.ndarray:
        """(num_gpus,) node index of each GPU."""
        return np.arange(self.num_gpus) // self.gpus_per_node

    def link_weights(self) -> np.ndarray:
        """(G, G) cost of one token moving from GPU g to GPU h, in units of an intra-node hop.

        0 on the same GPU, 1 inside a node, ``intra/inter`` bandwidth ratio across nodes
        (MoETuner weights traffic by 1/bandwidth).
        """
        node = self.node_of_gpu()
        same_node = node[:, None] == node[None, :]
        weights = np.where(same_node, 1.0, self.intra_node_gbps / self.inter_node_gbps)
        np.fill_diagonal(weights, 0.0)
        return weights

    def to_dict(self) -> dict[str, float | int]:
        return {
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "num_slots": self.num_slots,
            "intra_node_gbps": float(self.intra_node_gbps),
            "inter_node_gbps": float(self.inter_node_gbps),
            "token_bytes": self.token_bytes,
        }
