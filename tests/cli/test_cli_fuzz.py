"""Seeded fuzz of ``simulate attention`` / ``advise attention`` flags (issue 9): whatever the
combination of odd values, the command ends with exit 0 (valid input; JSON on stdout) or exit 2
with one stderr line, in-process, quickly, and never with another exception."""

from __future__ import annotations

import json
import random
import time

import pytest

from tokenloom.cli import main
from bounds import NO_SPIN_S

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
    assert elapsed < NO_SPIN_S


ODD_JSON = [None, True, False, 0, -1, 1, 2, 0.5, 1e-300, 1e300, 10 ** 30, -1e-6, "", "fast", "1e9", [], [1, 2],
            {}, {"bw": 1}, 64, 1e12, 4.5e11, 8, "switch", "pcie", "bus", "mesh"]


def _mutations(n: int, seed: int = 3) -> list[dict]:
    from tokenloom.simulator.hardware import CATALOG, node_to_dict

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        spec = node_to_dict(CATALOG[rng.choice(sorted(CATALOG))])
        for _ in range(rng.randint(1, 3)):
            holder = spec
            if rng.random() < 0.6:
                key = rng.choice(["device", "link", "nic", "uplink"])
                if isinstance(spec.get(key), dict):
                    holder = spec[key]
            key = rng.choice(sorted(holder) + ["extra"])
            roll = rng.random()
            if roll < 0.15:
                holder.pop(key, None)
            else:
                holder[key] = rng.choice(ODD_JSON)
        out.append(spec)
    return out


@pytest.mark.parametrize("spec", _mutations(150), ids=lambda s: "spec")
def test_fuzzed_hardware_specs_load_or_name_the_field(spec, tmp_path):
    """A mutated spec either loads and simulates to finite numbers, or is refused naming ``mine.``."""
    import math

    from tokenloom.common.errors import UsageError
    from tokenloom.simulator import AttentionShape, make_cluster, simulate_attention

    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"mine": spec}))
    try:
        cluster = make_cluster("mine", 2, 1, path)
    except UsageError as exc:
        msg = str(exc)
        assert "\n" not in msg and "hw.json" in msg and "mine" in msg, msg
        return
    t0 = time.perf_counter()
    s = simulate_attention("tokenring", cluster, AttentionShape(1024, 2, 16), causal=True, backward=True).summary()
    assert all(math.isfinite(s[k]) and s[k] >= 0 for k in ("total_ms", "compute_ms", "exposed_comm_ms"))
    assert time.perf_counter() - t0 < NO_SPIN_S
