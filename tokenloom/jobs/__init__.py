"""tokenloom.jobs: SPMD jobs (a function of a Communicator and a config dataclass) run by tokenloom.comm.launch.

A job module exposes ``add_flags(parser)``, ``config_from_args(args)``, ``job(comm, config)`` and
``report(results, args) -> exit code``; ``tokenloom run`` lists them.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

from tokenloom.commands.args import arg_int

DTYPES = ("fp32", "bf16", "fp16", "fp64")


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name (torch is imported here, not at parser build time)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[name]


def add_shape_flags(a: argparse.ArgumentParser) -> None:
    """The attention shape flags every attention-like job shares (``run attention``, ``run decode``)."""
    a.add_argument("--heads", type=arg_int(1), default=8, help="query heads")
    a.add_argument("--kv-heads", type=arg_int(1), default=None, help="key/value heads (GQA); default: --heads")
    a.add_argument("--head-dim", type=arg_int(1), default=64, help="head dimension")
    a.add_argument("--batch", type=arg_int(1), default=1, help="batch size")
    a.add_argument("--dtype", choices=DTYPES, default=None,
                   help="input dtype (default: bf16 on CUDA, fp32 on CPU); accumulation is fp32")


def add_report_flags(a: argparse.ArgumentParser) -> None:
    """--check, --seed, --json: how a job checks and reports."""
    a.add_argument("--check", action="store_true", help="compare with the fp64 reference")
    a.add_argument("--seed", type=arg_int(0), default=0, help="random seed of the inputs")
    a.add_argument("--json", action="store_true", help="print one JSON object (rank 0 only)")


def emit_report(rep: dict, as_json: bool, print_table: Callable[[dict], None]) -> int:
    """Print a combined report (one JSON object, or the job's table); exit 1 if a check failed."""
    if as_json:
        print(json.dumps(rep))
    else:
        print_table(rep)
    return 0 if all(c["ok"] for c in rep.get("check", {}).values()) else 1
