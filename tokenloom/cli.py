"""The ``tokenloom`` command line.

Exit codes: 0 ok, 2 bad input (one line on stderr naming the field), 1 a bug (traceback).
Every subcommand lives in ``tokenloom/commands/<name>.py`` and registers itself through
``register(subparsers)``; this module only wires them together and applies the error policy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Order is the order shown in --help.
_COMMAND_MODULES = ("demo", "run", "simulate", "advise", "trace", "plan", "evaluate", "topo")


from tokenloom.errors import UsageError, one_line  # noqa: F401  (re-exported: tokenloom.cli.UsageError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: keep exit 2, one line
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenloom",
        description="Long-context parallelism for PyTorch: sequence-parallel attention "
        "(TokenRing, Ring, Ulysses), TokenWeave, MoE expert placement, and a simulator.",
        epilog="Run 'tokenloom demo' for a tour on CPU; 'tokenloom COMMAND --help' for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f"tokenloom.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as exc:  # TODO(issue 9): ValueError becomes a bug (exit 1)
        print(f"tokenloom {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written: their input
        where = f": {exc.filename}" if exc.filename else ""
        print(f"tokenloom {args.command}: error: {exc.strerror or one_line(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenloom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
