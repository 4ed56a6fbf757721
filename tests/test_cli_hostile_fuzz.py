"""Seeded fuzz of ``simulate attention`` / ``advise attention`` flags (issue 9): whatever the
combination of odd values, the command ends with exit 0 (valid input; JSON on stdout) or exit 2
with one stderr line, in-process, quickly, and never with another exception."""

from __future__ import annotations

import json
import random
import time

import pytest

from tokenloom.cli import main

POOL = ["0", "-1", "1", "2", "3", "4", "8", "16", "nan", "inf", "-inf", "1e3", "", "abc", "1K", "1M", "16K",
        "99999999999999999999", "2.5", "0x10", " 8", "8 ", "\u0663", "+4", "1_024", "4k", "-0", "1e-300"]
FLAGS = {
    "--gpus": POOL, "--nodes": POOL, "--seq": POOL, "--heads": POOL, "--kv-heads": POOL, "--head-dim": POOL,
    "--batch": POOL, "--dtype": ["bf16", "fp32", "fp8", ""], "--strategy": ["tokenring", "ring", "ulysses", "x"],
    "--layout": ["zigzag", "contiguous", "spiral"], "--hardware": ["h100-sxm", "a10-pcie", "mi300x", "nope", ""],
}
BASE = {"--hardware": "h100-sxm", "--gpus": "4", "--seq": "4K", "--heads": "8", "--head-dim": "16"}


def _cases(n: int, seed: int = 9) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        flags = dict(BASE)
        for flag in rng.sample(sorted(FLAGS), rng.randint(1, 4)):
            flags[flag] = rng.choice(FLAGS[flag])
        command = rng.choice(["simulate", "advise"])
        argv = [command, "attention"]
        for flag, value in flags.items():
            if command == "advise" and flag in ("--strategy", "--layout"):
                continue
            argv += [flag, value]
        out.append(argv + ["--json"])
    return out


@pytest.mark.parametrize("argv", _cases(120), ids=lambda a: " ".join(a[2:])[:70])
def test_fuzzed_flags_end_in_exit_0_or_one_line_exit_2(argv, capsys):
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    elapsed = time.perf_counter() - t0
    cap = capsys.readouterr()
    assert code in (0, 2), (code, cap.err)
    if code == 2:
        assert cap.err.count("\n") == 1 and "Traceback" not in cap.err and cap.out == ""
    else:
        assert cap.err == "" and json.loads(cap.out)
    assert elapsed < 10
