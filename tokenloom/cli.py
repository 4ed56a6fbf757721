"""The ``tokenloom`` command line.

Exit codes: 0 ok, 2 bad input (one line on stderr naming the field), 1 a bug (traceback) or a
failed job (the launcher's summary naming every lost and failed rank).
Every subcommand lives in ``tokenloom/commands/<name>.py`` and registers itself through
``register(subparsers)``; this module only wires them together and applies the error policy.

Start-up: only the command being run is imported. ``tokenloom --help`` lists the commands from
the table below without importing any of them, so it answers in a fraction of a second however
heavy a command's own imports are.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Order is the order shown in --help; the help line is shown without importing the command.
_COMMANDS = {
    "demo": "a tour on CPU: SP attention on local ranks, MoE placement, the simulator",
    "run": "run a job on real ranks (torchrun, local CPU ranks, or Ray actors)",
    "simulate": "predict the time of a parallel layer on a cluster (discrete-event simulator)",
    "advise": "rank parallel-attention strategies by simulated time",
    "trace": "make MoE routing traces for the placement planner",
    "plan": "place MoE experts on GPUs (balance load, cut cross-node routing)",
    "evaluate": "score a placement plan on a trace (balance, traffic, all-to-all time)",
    "topo": "GPUs of this node and their links (NVML)",
}
_COMMAND_MODULES = tuple(_COMMANDS)


from tokenloom.common.errors import UsageError, one_line  # noqa: F401  (re-exported: tokenloom.cli.UsageError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: exit 2, ONE line (no usage)
        message = " ".join(message.split())  # a value with a newline must not make a second line
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _selected(argv: Sequence[str] | None) -> str | None:
    """The command named on the command line (the first word that is one), if any."""
    for word in argv or ():
        if word in _COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def build_parser(argv: Sequence[str] | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The full parser; with ``lazy`` only the command named in ``argv`` is imported and the
    others are listed by name and help line (enough for ``tokenloom --help``)."""
    parser = _Parser(
        prog="tokenloom",
        description="Long-context parallelism for PyTorch: sequence-parallel attention "
        "(TokenRing, Ring, Ulysses), TokenWeave, MoE expert placement, and a simulator.",
        epilog="Run 'tokenloom demo' for a tour on CPU; 'tokenloom COMMAND --help' for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    wanted = _selected(argv) if lazy else None
    for name in _COMMAND_MODULES:
        if lazy and name != wanted:
            sub.add_parser(name, help=_COMMANDS[name], add_help=False)
        else:
            importlib.import_module(f"tokenloom.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv, lazy=True)
    args = parser.parse_args(argv)
    # the command's name in messages: "simulate sweep", "trace synth" (a job of "run" is its flags)
    action = getattr(args, "what", None) or getattr(args, "trace_command", None)
    where = f"{args.command} {action}" if action else args.command
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:  # bad input: one line naming the field (a plain ValueError is a bug: exit 1)
        print(f"tokenloom {where}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written: their input
        path = f": {exc.filename}" if exc.filename else ""
        print(f"tokenloom {where}: error: {exc.strerror or one_line(exc)}{path}", file=sys.stderr)
        return 2
    except Exception as exc:
        from tokenloom.comm.health import PeerLostError
        from tokenloom.comm.launch.summary import JobError

        if not isinstance(exc, (JobError, PeerLostError)):
            raise
        # ranks failed: the summary (every lost and failed rank, the first traceback) is the report
        # one write: the ranks of a torchrun job share the terminal
        sys.stderr.write(f"tokenloom {where}: error: {exc}\n")
        sys.stderr.flush()
        return 1
    except KeyboardInterrupt:
        print("tokenloom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
