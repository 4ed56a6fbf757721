"""argparse ``type=`` factories over the library checks, and the one-line parser.

A bad flag is a one-line argparse error (exit 2) before any work starts; the checks themselves
live in :mod:`tokenloom.common.checks`, shared with file fields and API arguments.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from tokenloom.common.checks import check_int, check_number
from tokenloom.common.errors import UsageError


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


def flag_error(exc: UsageError, flags: dict[str, str] | None = None) -> UsageError:
    """A library UsageError (field ``kv_heads``) as the CLI says it: the flag in front (``--kv-heads:
    ...``); ``flags`` maps a field to the flag that sets it when the name differs."""
    field = exc.field or "arguments"
    flag = (flags or {}).get(field, "--" + field.replace("_", "-"))
    return UsageError(f"{flag}: {exc}", field=flag)


WINDOW_HELP = ("sliding window LEFT[,RIGHT] in tokens, flash-attn's window_size=(LEFT, RIGHT): query i sees keys "
               "i-LEFT .. i+RIGHT; -1 is unbounded; RIGHT defaults to -1 (with --causal the right side is 0); "
               "e.g. --causal --window 4096 (Mistral/Gemma-style local layers); write --window=-1,0 when LEFT is -1")


def arg_window(text: str) -> tuple[int, int]:
    """argparse ``type=`` for ``--window LEFT[,RIGHT]`` (integers >= -1, -1 unbounded)."""
    parts = text.split(",")
    try:
        if len(text) > 60 or not 1 <= len(parts) <= 2:
            raise ValueError(text)
        vals = [int(p.strip()) for p in parts]
    except ValueError:
        vals = []
    if not vals or any(v < -1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected LEFT or LEFT,RIGHT, integers >= -1 (-1: unbounded), e.g. "
                                         f"4096 or 256,256; got {text[:40]!r}")
    return (vals[0], vals[1] if len(vals) == 2 else -1)


def argparse_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's own errors as the error policy wants them: exit 2, ONE line on stderr (no usage
    block; a value with a newline in it cannot make a second line), pointing at ``--help``."""
    message = " ".join(message.split())
    parser.exit(2, f"{parser.prog}: error: {message} (see '{parser.prog} --help')\n")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors follow :func:`argparse_error`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        argparse_error(self, message)
