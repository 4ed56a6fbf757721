"""Wall-clock start-up of `tokenloom --help` and every `tokenloom CMD --help` (target < 0.5 s).

Run: python benchmarks/cli_startup.py [repeats]. Prints the median of fresh-interpreter runs per
command next to `python -c pass` (the interpreter's own start-up) and `import torch` for scale.
"""

import statistics
import subprocess
import sys
import time

from tokenloom.cli import _COMMANDS


def _median_s(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rows = [("python -c pass", [sys.executable, "-c", "pass"]),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
            ("tokenloom --help", [sys.executable, "-m", "tokenloom", "--help"])]
    rows += [(f"tokenloom {c} --help", [sys.executable, "-m", "tokenloom", c, "--help"]) for c in _COMMANDS]
    rows += [("tokenloom run attention --help", [sys.executable, "-m", "tokenloom", "run", "attention", "--help"])]
    times = [_median_s(cmd, repeats) for _, cmd in rows]
    print(f"{'command':<34}{'median s':>10}{'vs python':>11}  < 0.5 s")
    for (name, _), t in zip(rows, times):
        print(f"{name:<34}{t:>10.3f}{t / times[0]:>10.1f}x  {'yes' if t < 0.5 else 'NO'}")


if __name__ == "__main__":
    main()
