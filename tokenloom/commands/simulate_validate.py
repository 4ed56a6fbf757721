"""``tokenloom simulate validate``: the calibration set, predicted vs published."""

from __future__ import annotations

import argparse
import json


def _validate(args: argparse.Namespace) -> int:
    from tokenloom.simulator.validate import format_report, validate

    report = validate()
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        print(format_report(report))
    return 0


def add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="the calibration set: every published measurement vs the prediction",
                       description="Price every row of the calibration set (published NCCL-tests, peer-copy, "
                       "FlashAttention and DeepEP measurements; simulator/data/calibration.json, sources in "
                       "docs/calibration.md) and print predicted vs published, the relative error and a summary "
                       "(worst, median, how many within +-15%). Rows the simulator cannot price yet say so.")
    p.add_argument("--json", action="store_true", help="print one JSON object (summary and results) instead of text")
    p.set_defaults(func=_validate)
