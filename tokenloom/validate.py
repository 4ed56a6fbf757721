"""Checks for values that cross an edge (flags, file fields, API arguments).

Every check raises :class:`tokenloom.errors.UsageError` naming the field and the valid range; the
``arg_*`` factories wrap the same checks as argparse ``type=`` callables so a bad flag is a
one-line argparse error (exit 2) before any work starts. Non-finite numbers (NaN, ±inf) are never
accepted where a finite number is meant: a NaN latency once made the simulator spin forever.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from tokenloom.errors import UsageError


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


def _arg(parse: Callable[[str], Any], check: Callable[[Any], Any], kind: str = "a number") -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            if len(text) > 100:  # int() of a 5000-digit string is refused anyway; say it plainly
                raise ValueError(text)
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text[:40]!r}") from None
        try:
            return check(value)
        except UsageError as exc:  # argparse adds the flag's name in front
            raise argparse.ArgumentTypeError(str(exc).split(" must ", 1)[-1].join(("must ", ""))) from None

    return convert


def arg_int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse ``type=`` for an integer within [lo, hi] ("1e3" is refused: write 1000)."""
    return _arg(int, lambda v: check_int(v, "value", lo=lo, hi=hi), "an integer (no exponent: 1e3 is 1000)")


def arg_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """argparse ``type=`` for a finite float within [lo, hi] (``lo_open``: strictly above lo)."""
    return _arg(float, lambda v: float(check_number(v, "value", lo=lo, hi=hi, lo_open=lo_open)))


def argparse_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's own errors as the error policy wants them: exit 2, ONE line on stderr (no usage
    block; a value with a newline in it cannot make a second line), pointing at ``--help``."""
    message = " ".join(message.split())
    parser.exit(2, f"{parser.prog}: error: {message} (see '{parser.prog} --help')\n")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors follow :func:`argparse_error`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        argparse_error(self, message)
