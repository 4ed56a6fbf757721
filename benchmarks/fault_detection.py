"""How long the local launcher takes to name a lost rank (drill job, rank 2 of 4 misbehaves at step 3).

Run: python benchmarks/fault_detection.py [timeout_s]. Prints, per fault, the seconds from the
moment rank 2 misbehaved (it writes the time first) to the launcher's JobError (every survivor has
reported by then), as a fraction of --timeout, and who was named.
"""

import os
import sys
import tempfile
import time

from tokenloom.jobs import drill
from tokenloom.comm.launch import run_job
from tokenloom.comm.launch.summary import JobError


def _detect(cfg: drill.Drill, timeout_s: float) -> tuple[float, str]:
    try:
        run_job(drill.job, cfg, launcher="local", world_size=4, timeout_s=timeout_s)
        return float("nan"), "nobody"
    except JobError as exc:
        named = "rank " + ",".join(map(str, exc.lost))
    with open(cfg.mark_file) as f:
        return time.time() - float(f.read()), named


def main() -> None:
    timeout_s = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    print(f"local launcher, 4 ranks, --timeout {timeout_s:g} s")
    print(f"{'fault':<8}{'detected after s':>17}{'/ timeout':>10}  named")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("raise", "kill", "stop", "skip", "hang"):
            cfg = drill.Drill(steps=8, step_ms=5, fail_rank=2, fail_at=3, reap_after_s=60, mode=mode,
                              mark_file=os.path.join(tmp, mode))
            t, named = _detect(cfg, timeout_s)
            print(f"{mode:<8}{t:>17.2f}{t / timeout_s:>10.2f}  {named}")


if __name__ == "__main__":
    main()
