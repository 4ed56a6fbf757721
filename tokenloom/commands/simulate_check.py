"""``tokenloom simulate check FILE``: fail CI when an accepted prediction regresses."""

from __future__ import annotations

import argparse
import json

_EPILOG = """\
FILE is JSON: {"tolerance": 0.05, "configs": [{"name": "prod", "strategy": "tokenring",
"hardware": "h100-sxm", "gpus": 8, "seq": "128K", "heads": 32, "kv_heads": 8, "head_dim": 128,
"causal": true, "backward": true, "accepted_ms": 200.0}]} (fields: docs/simulator.md).

exit status: 0 every prediction within tolerance (or faster); 1 some prediction is slower than
accepted_ms * (1 + tolerance), with a table; 2 bad input (one line naming the field).
"""


def _check(args: argparse.Namespace) -> int:
    from tokenloom.simulator.ci_check import format_check, load_check_file, run_check

    configs = load_check_file(args.file)
    report = run_check(configs, args.hardware_file)
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        print(format_check(report))
    return 0 if report["ok"] else 1


def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="re-price accepted predictions; exit 1 when one regressed (for CI)",
                       description="Simulate every configuration of FILE and compare with the time its owner "
                       "accepted: a prediction slower than accepted_ms * (1 + tolerance) fails.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="JSON file of configurations and accepted times")
    p.add_argument("--hardware-file", default=None, metavar="FILE", help="JSON adding or overriding catalog entries")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_check)
