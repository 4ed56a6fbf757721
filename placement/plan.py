"""A placement plan in DeepSeek EPLB / SGLang shapes, its JSON file, and its validation.

``phy2log`` (L, num_slots): the logical expert in each physical slot; slot ``s`` lives on GPU
``s // slots_per_gpu``. ``log2phy`` (L, E, max_rep): the slots of each expert, ascending, padded
with -1. ``logcnt`` (L, E): replicas per expert. The last two are derived from ``phy2log`` and are
checked against it when a plan is read back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.common.files import atomic_write, read_json
from tokenloom.common.checks import check_number
from tokenloom.placement.problem import DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS, PlacementProblem

PLAN_FORMAT = "tokenloom.plan/1"
MAX_GPUS = 4096  # expert-parallel GPUs a plan may declare (EP runs from 4 to a few hundred GPUs)
MAX_EXPERTS = 1 << 14


@dataclass
class Plan:
    """Where every physical expert slot lives, how it was found, and how good it is."""

    phy2log: np.ndarray
    num_experts: int
    num_gpus: int
    gpus_per_node: int
    method: str
    solver: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS
    token_home: str = "dp"
    replica_choice: str = "uniform"

    def __post_init__(self) -> None:
        self.phy2log = check_phy2log(self.phy2log, self.num_experts, self.num_gpus)

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def logcnt(self) -> np.ndarray:
        """(L, E) replicas per expert."""
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.phy2log])

    @property
    def log2phy(self) -> np.ndarray:
        """(L, E, max_rep) slot indices of each expert's replicas, ascending, -1 padded."""
        max_rep = int(self.logcnt.max())
        out = np.full((self.num_layers, self.num_experts, max_rep), -1, dtype=np.int64)
        for l, row in enumerate(self.phy2log):
            order = np.argsort(row, kind="stable")  # slots grouped by expert, ascending inside
            rank = np.arange(row.shape[0]) - np.searchsorted(row[order], row[order])
            out[l, row[order], rank] = order
        return out

    def problem(self) -> PlacementProblem:
        return PlacementProblem(
            self.num_layers, self.num_experts, self.num_gpus, self.gpus_per_node,
            self.num_slots - self.num_experts, self.intra_node_gbps, self.inter_node_gbps,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "format": PLAN_FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "num_slots": self.num_slots,
            "slots_per_gpu": self.num_slots // self.num_gpus,
            "intra_node_gbps": self.intra_node_gbps,
            "inter_node_gbps": self.inter_node_gbps,
            "method": self.method,
            "token_home": self.token_home,
            "replica_choice": self.replica_choice,
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
            "solver": self.solver,
            "metrics": self.metrics,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan JSON atomically (a failed run leaves no file)."""
        with atomic_write(path, "w") as handle:
            json.dump(self.to_dict(), handle)


def check_phy2log(phy2log: object, num_experts: int, num_gpus: int) -> np.ndarray:
    """Validate a (L, num_slots) phy2log: ids in range, full GPUs, every expert present, no duplicate on a GPU."""
    arr = np.asarray(phy2log)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 2 or 0 in arr.shape:
        raise UsageError(f"phy2log: expected a non-empty 2-D integer array (num_layers, num_slots), got dtype {arr.dtype} shape {arr.shape}")
    arr = arr.astype(np.int64)
    num_slots = arr.shape[1]
    if num_slots % num_gpus:
        raise UsageError(f"phy2log: {num_slots} slots do not divide over num_gpus={num_gpus}")
    if arr.min() < 0 or arr.max() >= num_experts:
        raise UsageError(f"phy2log: expert id out of range; valid ids are 0..{num_experts - 1}")
    for l, row in enumerate(arr):
        missing = np.flatnonzero(np.bincount(row, minlength=num_experts) == 0)
        if missing.size:
            raise UsageError(f"phy2log: layer {l} has no replica of expert {int(missing[0])}")
        per_gpu = np.sort(row.reshape(num_gpus, -1), axis=1)
        dup = np.flatnonzero((per_gpu[:, 1:] == per_gpu[:, :-1]).any(axis=1))
        if dup.size:
            raise UsageError(f"phy2log: layer {l} puts two replicas of one expert on GPU {int(dup[0])}")
    return arr


_REQUIRED = ("num_experts", "num_gpus", "gpus_per_node", "num_slots", "phy2log", "method")


def load_plan(path: str | os.PathLike, field: str = "plan") -> Plan:
    """Read and validate a plan JSON; every problem is a UsageError naming the flag, file and key."""
    p = Path(path)
    try:
        return _plan_from_dict(read_json(p, field, max_bytes=64 << 20), p, field)  # plans are KiB
    except UsageError as exc:
        text = str(exc)
        if text.startswith(f"{field}:"):
            raise
        raise UsageError(f"{field} {p}: {text}", field=field) from None


def _plan_from_dict(data: object, p: Path, field: str) -> Plan:
    if not isinstance(data, dict):
        raise UsageError(f"{field}: {str(p)!r} must hold a JSON object")
    for key in _REQUIRED:
        if key not in data:
            raise UsageError(f"{key}: missing key in plan {str(p)!r}")
    ints = {k: _positive_int(data[k], k) for k in ("num_experts", "num_gpus", "gpus_per_node", "num_slots")}
    for key, limit in (("num_experts", MAX_EXPERTS), ("num_gpus", MAX_GPUS), ("gpus_per_node", MAX_GPUS)):
        if ints[key] > limit:
            raise UsageError(f"{key}: {ints[key]} exceeds the limit {limit}")
    try:
        phy2log = np.asarray(data["phy2log"])
    except ValueError:
        raise UsageError("phy2log: not a rectangular array") from None
    if not isinstance(data["method"], str):
        raise UsageError(f"method: expected a string, got {data['method']!r}")
    for key in ("solver", "metrics"):
        if not isinstance(data.get(key) or {}, dict):
            raise UsageError(f"{key}: expected a JSON object, got {type(data[key]).__name__}")
    model = {}
    for key, valid in (("token_home", ("dp", "expert")), ("replica_choice", ("uniform", "local"))):
        if key in data and data[key] not in valid:
            raise UsageError(f"{key}: {data[key]!r} is not one of {', '.join(valid)}")
        if key in data:
            model[key] = data[key]
    bandwidth = {k: float(check_number(data.get(k, d), k, lo=0, lo_open=True, hi=1e6))
                 for k, d in (("intra_node_gbps", DEFAULT_INTRA_NODE_GBPS), ("inter_node_gbps", DEFAULT_INTER_NODE_GBPS))}
    plan = Plan(
        phy2log=phy2log, num_experts=ints["num_experts"], num_gpus=ints["num_gpus"],
        gpus_per_node=ints["gpus_per_node"], method=str(data["method"]),
        solver=data.get("solver") or {}, metrics=data.get("metrics") or {},
        **bandwidth, **model,
    )
    if plan.num_slots != ints["num_slots"]:
        raise UsageError(f"num_slots: {ints['num_slots']} but phy2log has {plan.num_slots} columns")
    for key in ("logcnt", "log2phy"):
        try:
            given = np.asarray(data[key]) if key in data else None
        except ValueError:
            raise UsageError(f"{key}: not a rectangular array") from None
        if given is not None and (given.dtype == object or not np.array_equal(given, getattr(plan, key))):
            raise UsageError(f"{key}: does not match phy2log")
    plan.problem()  # validates gpus_per_node and the bandwidths
    return plan


def _positive_int(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{field_name}: expected a positive integer, got {value!r}")
    return value
