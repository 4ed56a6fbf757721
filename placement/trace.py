"""Routing traces: load, validate, derive per-layer loads and cross-layer transitions, save.

Two on-disk formats (DESIGN.md "Files"):

- raw: ``topk_ids`` int ``(num_layers, num_tokens, top_k)`` and scalar ``num_experts`` (``.npz``,
  or ``.json`` with the same keys as nested lists);
- aggregated: ``loads`` ``(num_layers, num_experts)`` and optional ``transitions``
  ``(num_layers - 1, num_experts, num_experts)`` (``.npz`` or ``.json``).

How pairs are counted when ``top_k > 1``: a token routed to experts ``{a_1..a_K}`` in layer ``l``
and ``{b_1..b_K}`` in layer ``l+1`` contributes ``1/K`` to ``transitions[l, a_i, b_j]`` for each of
the ``K*K`` pairs. Each routed copy of the token therefore spreads one unit of flow evenly over the
token's next experts, so ``transitions[l].sum(axis=1) == loads[l]`` and
``transitions[l].sum(axis=0) == loads[l+1]``, and the total flow per layer boundary equals the
number of routed copies ``num_tokens * top_k``. Duplicate ids inside one token's top-k are counted
as given.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenloom.io import atomic_write

_SUFFIXES = (".npz", ".json")


@dataclass(frozen=True)
class Trace:
    """Routing statistics of one model on one workload.

    ``loads``: float64 ``(num_layers, num_experts)``, routed token copies per expert.
    ``transitions``: float64 ``(num_layers - 1, num_experts, num_experts)`` or ``None`` (no
    cross-layer information: traffic metrics and the cross-layer stage are then skipped).
    ``top_k`` and ``num_tokens`` are known only for raw traces.
    """

    loads: np.ndarray
    transitions: np.ndarray | None = None
    top_k: int | None = None
    num_tokens: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        loads = _as_counts(self.loads, "loads", ndim=2)
        if loads.shape[0] == 0 or loads.shape[1] == 0:
            raise ValueError(f"loads: empty trace, shape {loads.shape}; need at least 1 layer and 1 expert")
        if not loads.any():
            raise ValueError("loads: every count is zero (empty trace); nothing to plan")
        object.__setattr__(self, "loads", loads)
        if self.transitions is not None:
            trans = _as_counts(self.transitions, "transitions", ndim=3)
            num_layers, num_experts = loads.shape
            want = (num_layers - 1, num_experts, num_experts)
            if trans.shape != want:
                raise ValueError(f"transitions: shape {trans.shape}, expected (num_layers-1, num_experts, num_experts) = {want}")
            object.__setattr__(self, "transitions", trans)

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.loads.shape[1])

    @property
    def has_transitions(self) -> bool:
        return self.transitions is not None and self.num_layers > 1


def _as_counts(value: object, field: str, ndim: int) -> np.ndarray:
    """Convert to float64 and check shape rank, finiteness and sign; errors name ``field``."""
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists from JSON
        raise ValueError(f"{field}: not a rectangular array ({str(exc).splitlines()[0]})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{field}: dtype {arr.dtype} is not numeric; expected a {ndim}-D array of counts")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{field}: dtype {arr.dtype}; expected integer or float counts")
    if arr.ndim != ndim:
        raise ValueError(f"{field}: {arr.ndim}-D array of shape {arr.shape}; expected {ndim}-D")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{field}: contains NaN or infinite values; counts must be finite")
    if (arr < 0).any():
        raise ValueError(f"{field}: contains negative counts (min {arr.min():g}); counts must be >= 0")
    return arr


def trace_from_topk(topk_ids: object, num_experts: object, source: str = "") -> Trace:
    """Derive loads and transitions from raw routing ids.

    ``topk_ids``: integer ``(num_layers, num_tokens, top_k)``; ``num_experts``: positive int scalar.
    Pairs for ``top_k > 1`` are counted as the module docstring says (``1/K`` per pair).
    """
    try:
        ids = np.asarray(topk_ids)
    except ValueError:  # ragged nested lists from JSON
        raise ValueError("topk_ids: not a rectangular array; expected (num_layers, num_tokens, top_k)") from None
    if ids.size == 0:
        raise ValueError(f"topk_ids: empty trace, shape {ids.shape}; need >= 1 layer, token and top-k entry")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids: dtype {ids.dtype}; expected an integer array of expert ids")
    if ids.ndim != 3:
        raise ValueError(f"topk_ids: {ids.ndim}-D array of shape {ids.shape}; expected (num_layers, num_tokens, top_k)")
    if 0 in ids.shape:
        raise ValueError(f"topk_ids: empty trace, shape {ids.shape}; need >= 1 layer, token and top-k entry")
    num_experts_int = _scalar_int(num_experts, "num_experts")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_experts_int:
        bad = low if low < 0 else high
        raise ValueError(f"topk_ids: expert id {bad} out of range; valid ids are 0..{num_experts_int - 1} (num_experts={num_experts_int})")
    num_layers, num_tokens, top_k = ids.shape
    ids = ids.astype(np.int64)
    loads = np.stack([np.bincount(ids[l].ravel(), minlength=num_experts_int) for l in range(num_layers)])
    transitions = None
    if num_layers > 1:
        transitions = np.empty((num_layers - 1, num_experts_int, num_experts_int))
        for l in range(num_layers - 1):
            transitions[l] = _pair_counts(ids[l], ids[l + 1], num_experts_int)
    return Trace(loads=loads, transitions=transitions, top_k=top_k, num_tokens=num_tokens, source=source)


def _pair_counts(cur: np.ndarray, nxt: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, E) flow between two layers' ids, each (T, K); every pair weighs 1/K."""
    top_k = cur.shape[1]
    pair_index = cur[:, :, None] * num_experts + nxt[:, None, :]  # (T, K, K)
    counts = np.bincount(pair_index.ravel(), minlength=num_experts * num_experts)
    return counts.reshape(num_experts, num_experts) / top_k


def _scalar_int(value: object, field: str) -> int:
    """A positive integer from a 0-d / 1-element array, an int, or an integral float."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"{field}: expected a scalar, got shape {arr.shape}")
    item = arr.reshape(-1)[0].item()
    integral = isinstance(item, int) or (isinstance(item, float) and item.is_integer())
    if isinstance(item, bool) or not integral:
        raise ValueError(f"{field}: expected a positive integer, got {item!r}")
    if int(item) < 1:
        raise ValueError(f"{field}: must be >= 1, got {int(item)}")
    return int(item)


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a raw or aggregated trace from ``.npz`` or ``.json``; every problem is a ValueError.

    Returns a validated :class:`Trace` (loads ``(L, E)``, transitions ``(L-1, E, E)`` or None).
    """
    p = Path(path)
    if p.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"trace: unsupported file type {p.suffix or '(none)'!r} for {str(p)!r}; valid: .npz, .json")
    if not p.is_file():
        raise ValueError(f"trace: cannot read {str(p)!r}: no such file")
    data = _read_npz(p) if p.suffix.lower() == ".npz" else _read_json(p)
    return _trace_from_mapping(data, str(p))


def _read_npz(path: Path) -> dict[str, object]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ValueError(f"trace: cannot read {str(path)!r} as .npz ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"trace: cannot read {str(path)!r} as JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"trace: {str(path)!r} must hold a JSON object with keys 'loads' or 'topk_ids'")
    return data


def _trace_from_mapping(data: dict[str, object], source: str) -> Trace:
    if "topk_ids" in data:
        if "num_experts" not in data:
            raise ValueError("num_experts: missing key; a raw trace needs 'topk_ids' and 'num_experts'")
        return trace_from_topk(data["topk_ids"], data["num_experts"], source=source)
    if "loads" not in data:
        keys = ", ".join(sorted(data)) or "none"
        raise ValueError(f"loads: missing key (found: {keys}); a trace needs 'topk_ids'+'num_experts' or 'loads'[+'transitions']")
    trace = Trace(loads=data["loads"], transitions=data.get("transitions"), source=source)
    if "num_experts" in data and _scalar_int(data["num_experts"], "num_experts") != trace.num_experts:
        raise ValueError(f"num_experts: {data['num_experts']} but loads has {trace.num_experts} columns")
    return trace


def save_topk(path: str | os.PathLike, topk_ids: np.ndarray, num_experts: int) -> None:
    """Write a raw trace (``.npz``, compressed; ids stored as the smallest fitting int type)."""
    dtype = np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, topk_ids=np.asarray(topk_ids, dtype=dtype), num_experts=np.int64(num_experts))


def save_aggregated(path: str | os.PathLike, trace: Trace) -> None:
    """Write an aggregated trace as ``.npz`` or ``.json`` (chosen by the suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"out: unsupported file type {suffix or '(none)'!r}; valid: .npz, .json")
    if suffix == ".json":
        payload = {"num_experts": trace.num_experts, "loads": trace.loads.tolist()}
        if trace.transitions is not None:
            payload["transitions"] = trace.transitions.tolist()
        with atomic_write(path, "w") as handle:
            json.dump(payload, handle)
        return
    arrays = {"loads": trace.loads}
    if trace.transitions is not None:
        arrays["transitions"] = trace.transitions
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
