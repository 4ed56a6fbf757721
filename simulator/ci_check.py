"""``tokenloom simulate check FILE``: predictions a user accepted, re-priced, regressions flagged.

The file is JSON: ``{"tolerance": 0.05, "configs": [{...}, ...]}`` (or just the list). Each config
names one simulation and the time its owner accepts::

    {"name": "prod-128k", "strategy": "tokenring", "hardware": "h100-sxm", "gpus": 8, "nodes": 1,
     "seq": "128K", "heads": 32, "kv_heads": 8, "head_dim": 128, "causal": true, "backward": true,
     "layout": "zigzag", "batch": 1, "dtype": "bf16", "accepted_ms": 200.0, "tolerance": 0.05}

Required: ``strategy``, ``hardware``, ``gpus``, ``seq``, ``heads``, ``head_dim``, ``accepted_ms``;
``tolerance`` (a fraction) per config or at the top. A config *regresses* when its predicted time
exceeds ``accepted_ms * (1 + tolerance)``; it is *faster* when below ``accepted_ms * (1 -
tolerance)`` (not a failure: the accepted number may be updated). Every problem with the file is a
:class:`UsageError` naming the field (``configs[2].seq``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenloom.common.errors import UsageError
from tokenloom.common.files import read_json
from tokenloom.common.checks import check_choice, check_int, check_number
from tokenloom.common.vocab import PREFERRED_LAYOUTS

DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
_REQUIRED = ("strategy", "hardware", "gpus", "seq", "heads", "head_dim", "accepted_ms")
_OPTIONAL = ("name", "nodes", "kv_heads", "batch", "dtype", "causal", "backward", "layout", "tolerance")
MAX_CONFIGS = 1000
MAX_CHECK_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class CheckConfig:
    name: str
    strategy: str
    hardware: str
    gpus: int
    nodes: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: str
    causal: bool
    backward: bool
    layout: str
    accepted_ms: float
    tolerance: float


def _seq(value: object, field: str) -> int:
    if isinstance(value, str):
        text = value.strip()
        scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
        digits = text[:-1] if scale > 1 else text
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 15):
            raise UsageError(f"{field} must be a token count like 4096, \"128K\" or \"1M\", got {value[:40]!r}",
                             field=field)
        value = int(digits) * scale
    return check_int(value, field, lo=1, hi=1 << 40)


def _bool(spec: dict, key: str, where: str, default: bool) -> bool:
    value = spec.get(key, default)
    if not isinstance(value, bool):
        raise UsageError(f"{where}.{key} must be true or false, got {value!r}", field=f"{where}.{key}")
    return value


def _str(spec: dict, key: str, where: str, default: str | None = None) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise UsageError(f"{where}.{key} must be a non-empty string, got {value!r}", field=f"{where}.{key}")
    return value


def parse_config(spec: object, where: str, default_tolerance: float | None) -> CheckConfig:
    """One typed config; :class:`UsageError` naming ``where.field`` otherwise."""
    if not isinstance(spec, dict):
        raise UsageError(f"{where} must be a JSON object, got {type(spec).__name__}", field=where)
    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r}; valid: {', '.join(_REQUIRED + _OPTIONAL)}",
                         field=f"{where}.{unknown[0]}")
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise UsageError(f"{where}.{missing[0]} is missing (required: {', '.join(_REQUIRED)})",
                         field=f"{where}.{missing[0]}")
    if "tolerance" not in spec and default_tolerance is None:
        raise UsageError(f"{where}.tolerance is missing (give it per config or at the top of the file)",
                         field=f"{where}.tolerance")
    heads = check_int(spec["heads"], f"{where}.heads", lo=1, hi=1 << 16)
    tolerance = spec.get("tolerance", default_tolerance)
    return CheckConfig(
        name=_str(spec, "name", where, where), strategy=_str(spec, "strategy", where),
        hardware=_str(spec, "hardware", where), gpus=check_int(spec["gpus"], f"{where}.gpus", lo=1, hi=1 << 20),
        nodes=check_int(spec.get("nodes", 1), f"{where}.nodes", lo=1, hi=1 << 20),
        seq=_seq(spec["seq"], f"{where}.seq"), heads=heads,
        kv_heads=check_int(spec.get("kv_heads", heads), f"{where}.kv_heads", lo=1, hi=1 << 16),
        head_dim=check_int(spec["head_dim"], f"{where}.head_dim", lo=1, hi=1 << 16),
        batch=check_int(spec.get("batch", 1), f"{where}.batch", lo=1, hi=1 << 20),
        dtype=check_choice(spec.get("dtype", "bf16"), f"{where}.dtype", tuple(DTYPES)),
        causal=_bool(spec, "causal", where, True), backward=_bool(spec, "backward", where, False),
        layout=check_choice(spec.get("layout", "zigzag"), f"{where}.layout", PREFERRED_LAYOUTS),
        accepted_ms=float(check_number(spec["accepted_ms"], f"{where}.accepted_ms", lo=0, lo_open=True, hi=1e15)),
        tolerance=float(check_number(tolerance, f"{where}.tolerance", lo=0, hi=10)))


def load_check_file(path: str | os.PathLike, field: str = "FILE") -> list[CheckConfig]:
    data = read_json(path, field, max_bytes=MAX_CHECK_FILE_BYTES)
    default = None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"tolerance", "configs"})
        if unknown:
            raise UsageError(f"{field} {path}: unknown top-level field {unknown[0]!r}; valid: tolerance, configs",
                             field=unknown[0])
        if "tolerance" in data:
            default = float(check_number(data["tolerance"], "tolerance", lo=0, hi=10))
        data = data.get("configs")
    if not isinstance(data, list) or not data:
        raise UsageError(f"{field} {path}: configs must be a non-empty list of objects", field="configs")
    if len(data) > MAX_CONFIGS:
        raise UsageError(f"configs: at most {MAX_CONFIGS} entries, got {len(data)}", field="configs")
    configs = [parse_config(spec, f"configs[{i}]", default) for i, spec in enumerate(data)]
    names = [c.name for c in configs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"configs: name {dup!r} appears twice", field="configs")
    return configs


def run_check(configs: list[CheckConfig], hardware_file: str | None = None) -> dict:
    """Price every config; ``{"ok", "regressions", "results": [...]}`` (JSON-ready)."""
    from tokenloom.simulator.cost import AttentionShape
    from tokenloom.simulator.hardware import make_cluster
    from tokenloom.simulator.scenario import simulate_attention

    results = []
    for i, c in enumerate(configs):
        where = f"configs[{i}]"
        try:
            cluster = make_cluster(c.hardware, c.gpus, c.nodes, hardware_file)
            shape = AttentionShape(c.seq, c.heads, c.head_dim, c.kv_heads, c.batch, DTYPES[c.dtype])
            got = simulate_attention(c.strategy, cluster, shape, causal=c.causal, backward=c.backward,
                                     layout=c.layout).total_s * 1e3
        except UsageError as exc:
            field = f"{where}.{exc.field}" if getattr(exc, "field", None) else where
            raise UsageError(f"{where} ({c.name}): {exc}", field=field) from None
        change = got / c.accepted_ms - 1
        status = "regressed" if change > c.tolerance else "faster" if change < -c.tolerance else "ok"
        results.append({"name": c.name, "strategy": c.strategy, "hardware": cluster.describe(), "seq": c.seq,
                        "accepted_ms": c.accepted_ms, "predicted_ms": got, "change": change,
                        "tolerance": c.tolerance, "status": status})
    regressions = sum(r["status"] == "regressed" for r in results)
    return {"ok": regressions == 0, "regressions": regressions, "checked": len(results), "results": results}


def format_check(report: dict) -> str:
    rows = [f"{'name':<24} {'strategy':<20} {'hardware':<24} {'accepted ms':>12} {'predicted ms':>13} "
            f"{'change':>8} {'tol':>6}  status"]
    for r in report["results"]:
        rows.append(f"{r['name'][:24]:<24} {r['strategy'][:20]:<20} {r['hardware'][:24]:<24} "
                    f"{r['accepted_ms']:>12.3f} {r['predicted_ms']:>13.3f} {r['change']:>+8.1%} "
                    f"{r['tolerance']:>6.1%}  {r['status'].upper() if r['status'] == 'regressed' else r['status']}")
    verdict = (f"{report['regressions']} of {report['checked']} predictions regressed beyond their tolerance"
               if report["regressions"] else f"all {report['checked']} predictions within tolerance")
    return "\n".join(rows + [verdict])
