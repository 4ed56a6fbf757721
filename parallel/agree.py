"""Cross-rank agreement of every argument that changes an attention result (issue 9, class 1).

Before any transfer, every rank contributes one fixed-length int64 vector — strategy, layout,
causal, softmax_scale, kernel impl, dtype, shapes, packed-document boundaries, mesh, the masks
(window_size, softcap, a checksum of the sinks), whether a
backward will follow — and a code for a local argument error, in ONE small all-gather. Then every
rank sees every rank's values and all of them raise the same way: a rank's own bad argument raises
its own message, the others say which ranks refused which argument; a disagreement names the
argument, the values and the ranks. Nobody hangs waiting for a rank that raised early, because
local checks are only reported here, after the collective.

Why not skip the collective when the arguments were agreed before (a cache hit)? Because a rank
cannot know, without communicating, that another rank changed its arguments: if rank 0 hits its
cache and skips while rank 1 misses and enters the all-gather, rank 0 goes on to the P2P transfers
and both wait forever. So the one collective is unconditional, and what is cached (by shape and
arguments, see :mod:`tokenloom.parallel.attention`) is everything else: the encoded vector, the
validation, the schedules and the plan. Repeated calls cost that one 20-int all-gather and nothing
more; the backward pass costs none (it was agreed with its forward: ``backward`` is a field).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokenloom.common.errors import UsageError

FIELDS = ("arguments", "strategy", "layout", "causal", "softmax_scale", "impl", "dtype", "batch",
          "seq", "heads", "kv_heads", "head_dim", "cu_seqlens", "mesh", "backward", "shape", "call",
          "window_size", "softcap", "sinks")


def code_of(text: str) -> int:
    """A stable 62-bit code for a string (same on every rank, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def float_code(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_code(*tensors: "torch.Tensor") -> "torch.Tensor":
    """A code of the tensors' exact bits, equal on every rank that holds bitwise the same values:
    a 0-dim int64 tensor on their device, with no host sync (the agreement message carries it).
    Integer sums of the bit patterns (read as int32, int16 for 2-byte types: no overflow below
    2^32 elements), the same whatever order or thread count sums them, where a float sum is not;
    combined by shift and xor."""
    code = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for t in tensors:
        bits = t.detach().contiguous().view(torch.int32 if t.element_size() >= 4 else torch.int16
                                            if t.element_size() == 2 else torch.int8)
        code = (code << 1) ^ bits.sum(dtype=torch.int64)
    return code


@dataclass(frozen=True)
class Agreed:
    """One rank's encoded arguments, ready to compare (``values`` in :data:`FIELDS` order)."""

    values: tuple[int, ...]
    shown: dict  # field -> readable value (for messages)
    error: tuple[str, str] | None = None  # (field, message) of this rank's own bad argument

    @staticmethod
    def failed(field: str, message: str) -> "Agreed":
        return Agreed((FIELDS.index(field) + 1,) + (0,) * (len(FIELDS) - 1), {}, (field, message))

    @staticmethod
    def of(shown: dict[str, Any]) -> "Agreed":
        """Encode readable values: ints stay, floats by their bits, strings and tuples by code."""
        values = [0]
        for name in FIELDS[1:]:
            v = shown.get(name)
            if isinstance(v, bool) or v is None:
                values.append(int(bool(v)) if v is not None else -1)
            elif isinstance(v, int):
                values.append(v)
            elif isinstance(v, float):
                values.append(float_code(v))
            else:
                values.append(code_of(repr(v)))
        return Agreed(tuple(values), dict(shown))


def check_scale(value: Any, head_dim: int) -> float:
    """``softmax_scale`` resolved (None: 1/sqrt(head_dim)); refuse NaN, inf and non-numbers."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise UsageError(f"softmax_scale must be a finite number or None, got {value!r}",
                             field="softmax_scale")
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"softmax_scale must be finite, got {value}", field="softmax_scale")
    return value


def check_softcap(value: Any) -> float | None:
    """``softcap`` (scores -> c * tanh(s / c)): None, or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise UsageError(f"softcap must be a finite number > 0 or None, got {value!r}", field="softcap")
    return float(value)


def agree(name: str, mine: Agreed, gather: Callable[[torch.Tensor], torch.Tensor] | None,
          device: torch.device) -> None:
    """Raise on every rank unless every rank passed valid and equal arguments.

    ``gather`` stacks every rank's int64 vector (one collective); None means a world of one.
    """
    if gather is None:
        if mine.error is not None:
            raise UsageError(mine.error[1], field=mine.error[0])
        return
    every = gather(torch.tensor(mine.values, dtype=torch.int64, device=device)).cpu().tolist()
    failed = {r: FIELDS[row[0] - 1] for r, row in enumerate(every) if row[0]}
    if failed:
        if mine.error is not None:
            raise UsageError(mine.error[1], field=mine.error[0])
        what = ", ".join(f"rank {r}: {f}" for r, f in sorted(failed.items()))
        raise UsageError(f"{name}: other ranks refused their arguments ({what}); see their errors",
                         field=next(iter(failed.values())))
    for i, field in enumerate(FIELDS[1:], start=1):
        column = [row[i] for row in every]
        if len(set(column)) > 1:
            # every rank is here (all saw the same vectors): one more gather for readable values
            texts = _gather_text(gather, _readable(field, mine.shown.get(field)), device)
            raise UsageError(_disagreement(name, field, texts), field=field)


def _readable(field: str, value: Any) -> str:
    if field == "cu_seqlens" and value is not None:
        lens = list(value)
        head = ",".join(map(str, lens[:6])) + (",..." if len(lens) > 6 else "")
        return f"{len(lens)} docs [{head}] (hash {code_of(repr(value)) % 10**6:06d})"
    return repr(value)


def _gather_text(gather: Callable[[torch.Tensor], torch.Tensor], text: str, device) -> list[str]:
    raw = text.encode()[:_TEXT]
    buf = torch.zeros(_TEXT, dtype=torch.uint8, device=device)
    buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    rows = gather(buf).cpu()
    return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in rows]


_TEXT = 96


def _disagreement(name: str, field: str, texts: list[str]) -> str:
    ranks: dict[str, list[int]] = {}
    for r, t in enumerate(texts):
        ranks.setdefault(t, []).append(r)
    shown = [f"{'ranks ' + str(rs) if len(rs) > 1 else 'rank ' + str(rs[0])}: {t}"
             for t, rs in sorted(ranks.items(), key=lambda kv: kv[1][0])]
    return (f"{name}: ranks disagree on {field} ({'; '.join(shown)}); every rank must pass the "
            f"same {field}")
