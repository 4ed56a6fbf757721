"""``--window LEFT[,RIGHT]`` on ``run attention``, ``simulate attention`` and ``advise attention``
(issue 18): flash-attn's convention (-1 unbounded), a one-line error naming ``--window`` (exit 2),
help that teaches it, and ``run attention --check`` against the fp64 reference under the same mask
on 2 local gloo ranks."""

from __future__ import annotations

import json

import pytest
import torch

from tokenloom.cli import main
from tokenloom.jobs.attention import AttentionRun, _check, window_visible
from mask_ref import dense_visible

SIM = ["--hardware", "h100-sxm", "--gpus", "8", "--seq", "16K", "--heads", "8", "--head-dim", "128", "--causal"]
RUN = ["run", "attention", "--launcher", "local", "--world-size", "2", "--seq", "64", "--heads", "4",
       "--kv-heads", "2", "--head-dim", "8", "--iters", "1", "--check", "--json"]


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


@pytest.mark.parametrize("command", [["run", "attention"], ["simulate", "attention", *SIM],
                                     ["advise", "attention", *SIM]])
@pytest.mark.parametrize("value", ["-2", "x", "1.5", "4,y", "1,2,3", "nan", "", "4,"])
def test_a_bad_window_is_one_line_naming_the_flag(capsys, command, value):
    assert _main([*command, f"--window={value}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--window" in err and "LEFT" in err, err


@pytest.mark.parametrize("command", [["run", "attention"], ["simulate", "attention"], ["advise", "attention"]])
def test_help_teaches_the_window(capsys, command):
    assert _main([*command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--window LEFT[,RIGHT]" in text and "-1 is unbounded" in text and "i-LEFT .. i+RIGHT" in text


@pytest.mark.parametrize("causal, window", [(True, (10, -1)), (False, (5, 3)), (False, (0, 7)), (True, (-1, 4))])
def test_the_check_mask_is_flash_attn_s_window(causal, window):
    """The job's reference mask, written from positions, is the tests' own mask (tests/mask_ref.py)."""
    assert torch.equal(window_visible(40, causal, window), dense_visible(40, causal=causal, window=window))


def test_the_check_fails_a_run_that_ignored_the_window():
    """--check is not vacuous: results of full causal attention fail against the windowed reference."""
    from tokenloom.kernels.reference import attention_with_lse

    cfg = AttentionRun(seq=32, heads=2, head_dim=8, causal=True, window=(4, -1), backward=False, check=True)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 32, 2, 8, generator=gen) for _ in range(4)]
    out, lse = attention_with_lse(*(t.double() for t in full[:3]), causal=True)  # no window
    checks = _check({"out": out, "lse": lse}, full, cfg, torch.device("cpu"), torch.float32)
    assert not checks["out"]["ok"] and not checks["lse"]["ok"]


@pytest.mark.parametrize("strategy, flags, window", [
    ("tokenring", ["--causal", "--window", "10"], [10, -1]),
    ("ring", ["--window", "5,3"], [5, 3]),
    ("ulysses", ["--causal", "--window", "20", "--layout", "contiguous"], [20, -1]),
])
def test_run_attention_check_with_a_window_on_two_local_ranks(capsys, strategy, flags, window):
    assert _main([*RUN, "--strategy", strategy, *flags]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["world_size"] == 2 and rep["strategy"] == strategy and rep["config"]["window"] == window
    assert set(rep["check"]) == {"out", "lse", "dq", "dk", "dv"}
    assert all(c["ok"] for c in rep["check"].values()), rep["check"]


def test_simulate_prices_the_window(capsys):
    def run(*extra):
        assert _main(["simulate", "attention", *SIM, "--strategy", "ring", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    full, windowed = run(), run("--window", "256")
    assert "window" not in full and windowed["window"] == [256, 0]  # causal folds the right side
    # causal work is S^2/2 token pairs, a 256 window about 256 S: the compute shrinks by > 10x
    assert windowed["compute_ms"] < full["compute_ms"] / 10


def test_advise_ranks_by_the_windowed_price(capsys):
    """8 H100s, 16K causal, 8 heads: Ulysses wins without a window; a 256-token window hides most
    blocks, so a ring that only talks to its neighbours wins (the simulator's own prices decide)."""
    def winner(*extra):
        assert _main(["advise", "attention", *SIM, "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["winner"]["strategy"]

    assert winner() == "ulysses"
    assert winner("--window", "256") in ("tokenring", "ring")
