"""Routing traces: load, validate, derive per-layer loads and cross-layer transitions, save.

Two on-disk formats (DESIGN.md "Files"):

- raw: ``topk_ids`` int ``(num_layers, num_tokens, top_k)`` and scalar ``num_experts`` (``.npz``,
  or ``.json`` with the same keys as nested lists);
- aggregated: ``loads`` ``(num_layers, num_experts)`` and optional ``transitions``
  ``(num_layers - 1, num_experts, num_experts)`` and ``coactivation``
  ``(num_layers, num_experts, num_experts)`` (``.npz`` or ``.json``).

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

from tokenloom.common.errors import UsageError
from tokenloom.common.files import MAX_JSON_BYTES, atomic_write, check_input_file, read_json

_SUFFIXES = (".npz", ".json")
MAX_EXPERTS = 1 << 14  # 16384 experts per layer; more is refused before anything is allocated
MAX_DENSE_PAIRS = 1 << 25  # (L-1) x E x E entries: dense transitions above this are derived per layer instead
MAX_COUNT = 1e15  # a count above this is not a token count (and 1e308 would overflow the sums to inf)


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
    topk_ids: np.ndarray | None = None
    coactivations: np.ndarray | None = None

    def __post_init__(self) -> None:
        loads = _as_counts(self.loads, "loads", ndim=2)
        if loads.shape[0] == 0 or loads.shape[1] == 0:
            raise UsageError(f"loads: empty trace, shape {loads.shape}; need at least 1 layer and 1 expert")
        if not loads.any():
            raise UsageError("loads: every count is zero (empty trace); nothing to plan")
        object.__setattr__(self, "loads", loads)
        if self.transitions is not None:
            trans = _as_counts(self.transitions, "transitions", ndim=3)
            num_layers, num_experts = loads.shape
            want = (num_layers - 1, num_experts, num_experts)
            if trans.shape != want:
                raise UsageError(f"transitions: shape {trans.shape}, expected (num_layers-1, num_experts, num_experts) = {want}")
            object.__setattr__(self, "transitions", trans)
        if self.coactivations is not None:
            coact = _as_counts(self.coactivations, "coactivation", ndim=3)
            want = (self.num_layers, self.num_experts, self.num_experts)
            if coact.shape != want:
                raise UsageError(f"coactivation: shape {coact.shape}, expected (num_layers, num_experts, num_experts) = {want}")
            object.__setattr__(self, "coactivations", coact)

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.loads.shape[1])

    @property
    def has_transitions(self) -> bool:
        return self.transitions is not None and self.num_layers > 1

    @property
    def is_raw(self) -> bool:
        """True when the per-token routing is known (exact message metrics, held-out splits)."""
        return self.topk_ids is not None

    def coactivation(self, layer: int) -> np.ndarray | None:
        """(E, E) tokens routed to both e and f in ``layer`` (zero diagonal); None if unknown."""
        if self.topk_ids is not None:
            return coactivation(self.topk_ids[layer], self.num_experts)
        return None if self.coactivations is None else self.coactivations[layer]

    def split(self, fraction: float, seed: int = 0) -> tuple["Trace", "Trace"]:
        """(planning, held-out) traces: a seeded ``fraction`` of the tokens is held out (raw traces only)."""
        if self.topk_ids is None:
            raise UsageError("holdout: needs a raw trace (topk_ids); an aggregated trace cannot be split by token")
        num_tokens = self.topk_ids.shape[1]
        held = int(round(fraction * num_tokens))
        if held < 1 or held >= num_tokens:
            raise UsageError(f"holdout: {fraction:g} of {num_tokens} tokens leaves an empty side; valid: 1/T .. 1-1/T")
        order = np.random.default_rng(seed).permutation(num_tokens)
        test, train = np.sort(order[:held]), np.sort(order[held:])
        return (trace_from_topk(self.topk_ids[:, train], self.num_experts, self.source),
                trace_from_topk(self.topk_ids[:, test], self.num_experts, self.source))


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, E) float64: tokens routed to both e and f in one layer (ids (T, K)); zero diagonal."""
    pairs = (ids[:, :, None] * num_experts + ids[:, None, :]).ravel()
    out = np.bincount(pairs, minlength=num_experts * num_experts).astype(np.float64).reshape(num_experts, num_experts)
    np.fill_diagonal(out, 0.0)
    return out


def _as_counts(value: object, field: str, ndim: int) -> np.ndarray:
    """Convert to float64 and check shape rank, finiteness and sign; errors name ``field``."""
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists from JSON
        raise UsageError(f"{field}: not a rectangular array ({str(exc).splitlines()[0]})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise UsageError(f"{field}: dtype {arr.dtype} is not numeric; expected a {ndim}-D array of counts")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.complexfloating):
        raise UsageError(f"{field}: dtype {arr.dtype}; expected integer or float counts")
    if arr.ndim != ndim:
        raise UsageError(f"{field}: {arr.ndim}-D array of shape {arr.shape}; expected {ndim}-D")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise UsageError(f"{field}: contains NaN or infinite values; counts must be finite")
    if (arr < 0).any():
        raise UsageError(f"{field}: contains negative counts (min {arr.min():g}); counts must be >= 0")
    if arr.size and arr.max() > MAX_COUNT:
        raise UsageError(f"{field}: count {arr.max():g} exceeds {MAX_COUNT:g}; counts must be token counts")
    return arr


def trace_from_topk(topk_ids: object, num_experts: object, source: str = "") -> Trace:
    """Derive loads and transitions from raw routing ids.

    ``topk_ids``: integer ``(num_layers, num_tokens, top_k)``; ``num_experts``: positive int scalar.
    Pairs for ``top_k > 1`` are counted as the module docstring says (``1/K`` per pair).
    """
    try:
        ids = np.asarray(topk_ids)
    except ValueError:  # ragged nested lists from JSON
        raise UsageError("topk_ids: not a rectangular array; expected (num_layers, num_tokens, top_k)") from None
    if ids.size == 0:
        raise UsageError(f"topk_ids: empty trace, shape {ids.shape}; need >= 1 layer, token and top-k entry")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"topk_ids: dtype {ids.dtype}; expected an integer array of expert ids")
    if ids.ndim != 3:
        raise UsageError(f"topk_ids: {ids.ndim}-D array of shape {ids.shape}; expected (num_layers, num_tokens, top_k)")
    if 0 in ids.shape:
        raise UsageError(f"topk_ids: empty trace, shape {ids.shape}; need >= 1 layer, token and top-k entry")
    num_experts_int = _scalar_int(num_experts, "num_experts")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_experts_int:
        bad = low if low < 0 else high
        raise UsageError(f"topk_ids: expert id {bad} out of range; valid ids are 0..{num_experts_int - 1} (num_experts={num_experts_int})")
    num_layers, num_tokens, top_k = ids.shape
    ids = ids.astype(np.int64)
    loads = np.stack([np.bincount(ids[l].ravel(), minlength=num_experts_int) for l in range(num_layers)])
    transitions = None
    if num_layers > 1 and (num_layers - 1) * num_experts_int**2 <= MAX_DENSE_PAIRS:
        transitions = np.empty((num_layers - 1, num_experts_int, num_experts_int))
        for l in range(num_layers - 1):
            transitions[l] = _pair_counts(ids[l], ids[l + 1], num_experts_int)
    return Trace(loads=loads, transitions=transitions, top_k=top_k, num_tokens=num_tokens, source=source, topk_ids=ids)


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
        raise UsageError(f"{field}: expected a scalar, got shape {arr.shape}")
    item = arr.reshape(-1)[0]
    item = item.item() if isinstance(item, np.generic) else item  # an int beyond int64 stays a Python object
    integral = isinstance(item, int) or (isinstance(item, float) and item.is_integer())
    if isinstance(item, bool) or not integral:
        raise UsageError(f"{field}: expected a positive integer, got {item!r}")
    if int(item) < 1:
        raise UsageError(f"{field}: must be >= 1, got {int(item)}")
    if field == "num_experts" and int(item) > MAX_EXPERTS:
        raise UsageError(f"num_experts: {int(item)} exceeds the limit {MAX_EXPERTS}")
    return int(item)


def load_trace(path: str | os.PathLike, field: str = "trace") -> Trace:
    """Read a raw or aggregated trace from ``.npz`` or ``.json``; every problem is a UsageError
    whose message names ``field`` (the flag), the file and the key at fault.

    Returns a validated :class:`Trace` (loads ``(L, E)``, transitions ``(L-1, E, E)`` or None).
    """
    p = Path(path)
    check_input_file(p, field)
    if p.suffix.lower() not in _SUFFIXES:
        raise UsageError(f"{field}: unsupported file type {p.suffix or '(none)'!r} for {str(p)!r}; valid: .npz, .json")
    try:
        data = _read_npz(p, field) if p.suffix.lower() == ".npz" else _read_json(p, field)
        return _trace_from_mapping(data, str(p))
    except UsageError as exc:
        text = str(exc)
        if text.startswith(f"{field}:"):
            raise
        raise UsageError(f"{field} {p}: {text}", field=field) from None
    except MemoryError:
        raise UsageError(f"{field} {p}: too large to hold in memory", field=field) from None


def _read_npz(path: Path, field: str) -> dict[str, object]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise UsageError(f"{field}: cannot read {str(path)!r} as .npz ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _read_json(path: Path, field: str) -> dict[str, object]:
    data = read_json(path, field, max_bytes=MAX_JSON_BYTES)  # ~10x in memory once parsed
    if not isinstance(data, dict):
        raise UsageError(f"{field}: {str(path)!r} must hold a JSON object with keys 'loads' or 'topk_ids'")
    return data


def _trace_from_mapping(data: dict[str, object], source: str) -> Trace:
    if "topk_ids" in data:
        if "num_experts" not in data:
            raise UsageError("num_experts: missing key; a raw trace needs 'topk_ids' and 'num_experts'")
        return trace_from_topk(data["topk_ids"], data["num_experts"], source=source)
    if "loads" not in data:
        keys = ", ".join(sorted(data)) or "none"
        raise UsageError(f"loads: missing key (found: {keys}); a trace needs 'topk_ids'+'num_experts' or 'loads'[+'transitions']")
    if "num_experts" in data:
        _scalar_int(data["num_experts"], "num_experts")
    trace = Trace(loads=data["loads"], transitions=data.get("transitions"), source=source,
                  coactivations=data.get("coactivation"))
    if "num_experts" in data and _scalar_int(data["num_experts"], "num_experts") != trace.num_experts:
        raise UsageError(f"num_experts: {data['num_experts']} but loads has {trace.num_experts} columns")
    return trace


def save_topk(path: str | os.PathLike, topk_ids: np.ndarray, num_experts: int) -> None:
    """Write a raw trace (``.npz``, compressed; ids stored as the smallest fitting int type)."""
    dtype = np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, topk_ids=np.asarray(topk_ids, dtype=dtype), num_experts=np.int64(num_experts))


def save_aggregated(path: str | os.PathLike, trace: Trace, suffix: str | None = None) -> None:
    """Write an aggregated trace as ``.npz`` or ``.json`` (``suffix``, default: the path's).

    Carries loads, transitions and, when the trace knows them and they fit
    (``MAX_DENSE_PAIRS``), the per-layer co-activation the ``dp`` planner needs.
    """
    suffix = (Path(path).suffix if suffix is None else suffix).lower()
    if suffix not in _SUFFIXES:
        raise UsageError(f"out: unsupported file type {suffix or '(none)'!r}; valid: .npz, .json")
    arrays = {"loads": trace.loads}
    if trace.transitions is not None:
        arrays["transitions"] = trace.transitions
    if trace.num_layers * trace.num_experts**2 <= MAX_DENSE_PAIRS and trace.coactivation(0) is not None:
        arrays["coactivation"] = np.stack([trace.coactivation(l) for l in range(trace.num_layers)])
    if suffix == ".json":
        payload = {"num_experts": trace.num_experts, **{k: v.tolist() for k, v in arrays.items()}}
        with atomic_write(path, "w") as handle:
            json.dump(payload, handle)
        return
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
