"""tokenloom.jobs: SPMD jobs (a function of a Communicator and a config dataclass) run by tokenloom.comm.launch.

A job module exposes ``add_flags(parser)``, ``config_from_args(args)``, ``job(comm, config)`` and
``report(results, args) -> exit code``; ``tokenloom run`` lists them.
"""

from __future__ import annotations

import json
from typing import Callable


def emit_report(rep: dict, as_json: bool, print_table: Callable[[dict], None]) -> int:
    """Print a combined report (one JSON object, or the job's table); exit 1 if a check failed."""
    if as_json:
        print(json.dumps(rep))
    else:
        print_table(rep)
    return 0 if all(c["ok"] for c in rep.get("check", {}).values()) else 1
