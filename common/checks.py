"""Checks for values that cross an edge (file fields, API arguments, and flags through
``tokenloom.commands.args``).

Every check raises :class:`tokenloom.common.errors.UsageError` naming the field and the valid
range. Non-finite numbers (NaN, ±inf) are never accepted where a finite number is meant: a NaN
latency once made the simulator spin forever.
"""

from __future__ import annotations

import math
from typing import Any

from tokenloom.common.errors import UsageError


def check_number(value: Any, field: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, integer: bool = False) -> float | int:
    """``value`` as a finite number (an int when ``integer``) within [lo, hi] (``lo_open``: > lo)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{field} must be {kind}, got {value!r}", field=field)
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise UsageError(f"{field} must be an integer, got {value!r}", field=field)
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{field} must be a finite number, got {value!r}", field=field)
    if integer:
        value = int(value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise UsageError(f"{field} must be {'>' if lo_open else '>='} {_num(lo)}, got {value!r}", field=field)
    if hi is not None and value > hi:
        raise UsageError(f"{field} must be <= {_num(hi)}, got {value!r}", field=field)
    return value


def _num(bound: float) -> str:
    """A bound as people write it: 4096 (not 4.096e+03), 1e+21 when huge, 0.5 as is."""
    if isinstance(bound, int) or (isinstance(bound, float) and bound.is_integer() and abs(bound) < 1e16):
        return str(int(bound))
    return f"{bound:g}"


def check_int(value: Any, field: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within [lo, hi]."""
    return int(check_number(value, field, lo=lo, hi=hi, integer=True))


def check_choice(value: Any, field: str, choices: tuple | list) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise UsageError(f"{field} must be one of {', '.join(map(str, choices))}; got {value!r}",
                         field=field)
    return value
