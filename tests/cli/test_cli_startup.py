"""Start-up: `tokenloom --help` and `tokenloom CMD --help` import no heavy module (torch, numpy,
pulp, scipy, matplotlib, ray), checked deterministically in a fresh interpreter per command.
The wall-clock side is benchmarks/cli_startup.py (a table, not an assert)."""

import json
import sys

import pytest
from procs import run

from tokenloom.cli import _COMMANDS

HEAVY = ("torch", "numpy", "pulp", "scipy", "matplotlib", "ray")

PROBE = """
import contextlib, io, json, sys
from tokenloom.cli import build_parser
argv = json.loads(sys.argv[1])
parser = build_parser(argv, lazy=True)
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "help": len(out.getvalue()),
                  "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _probe(argv):
    proc = run([sys.executable, "-c", PROBE, json.dumps(argv)], timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in _COMMANDS],
                                  ["run", "attention", "--help"], ["run", "drill", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_imports_nothing_heavy(argv):
    got = _probe(argv)
    assert got["code"] == 0 and got["help"] > 100, got
    assert got["heavy"] == [], f"'tokenloom {' '.join(argv)}' imports {got['heavy']}"
