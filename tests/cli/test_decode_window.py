"""`tokenloom run decode --window`: a windowed decode checked against fp64 under the same mask, on
every decode strategy; the check itself tells a windowed answer from an unwindowed one."""

import json

import pytest
import torch

from tokenloom.cli import main
from tokenloom.jobs.decode import _errors, _visible
from tokenloom.kernels.reference import attention_with_lse

SMALL = ["--context", "61", "--new-tokens", "3", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
         "--check", "--json"]


@pytest.mark.parametrize("strategy,queries,step", [("gather", "replicated", 1), ("ring", "replicated", 1),
                                                    ("passkv", "sharded", 4)])
def test_windowed_decode_checks_on_two_local_ranks(capsys, strategy, queries, step):
    rc = main(["run", "decode", "--launcher", "local", "--world-size", "2", "--strategy", strategy,
               "--queries", queries, "--step-tokens", str(step), "--window", "9", *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    assert rep["config"]["window"] == [9, -1]
    assert all(c["ok"] for c in rep["check"].values())


def test_visible_is_causal_and_windowed():
    vis = _visible(2, 6, (2, -1))  # queries at positions 4 and 5 of 6 keys
    assert vis.tolist() == [[False, False, True, True, True, False], [False, False, False, True, True, True]]
    assert _visible(2, 6, None).tolist() == [[True] * 5 + [False], [True] * 6]


def test_the_check_sees_a_missing_window():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 30, 2, 8, generator=g), torch.randn(1, 30, 2, 8, generator=g)
    full, _ = attention_with_lse(q, k, v, causal=True)  # what a run that ignored the window returns
    windowed, _ = attention_with_lse(q, k, v, causal=False, mask=_visible(2, 30, (5, -1)))
    ok = _errors([(0, 2, windowed)], q, k, v, 28, torch.float32, (5, -1))[0]
    wrong = _errors([(0, 2, full)], q, k, v, 28, torch.float32, (5, -1))[0]
    assert ok < 1e-5 < 0.05 < wrong


def test_a_bad_window_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "decode", "--launcher", "local", "--window", "-3", *SMALL])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--window" in err[-1]


@pytest.mark.parametrize("strategy,queries,step,window", [("gather", "replicated", 1, None),
                                                           ("ring", "replicated", 1, "9"),
                                                           ("passkv", "sharded", 4, None)])
def test_softcapped_decode_checks_on_two_local_ranks(capsys, strategy, queries, step, window):
    extra = ["--window", window] if window else []
    rc = main(["run", "decode", "--launcher", "local", "--world-size", "2", "--strategy", strategy,
               "--queries", queries, "--step-tokens", str(step), "--softcap", "0.5", *extra, *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    assert rep["config"]["softcap"] == 0.5
    assert all(c["ok"] for c in rep["check"].values())


def test_the_check_sees_a_missing_softcap():
    """At cap 0.5 the capped answer is far from the uncapped one, and the check tells them apart;
    plain torch's written-out capped attention agrees with the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, 8, generator=g) * 3 for n, h in ((2, 4), (30, 2), (30, 2)))
    vis = _visible(2, 30, None)
    capped, _ = attention_with_lse(q, k, v, causal=False, mask=vis, softcap=0.5)
    plain, _ = attention_with_lse(q, k, v, causal=False, mask=vis)
    ok, plain_err, _ = _errors([(0, 2, capped)], q, k, v, 28, torch.float32, None, 0.5)
    wrong = _errors([(0, 2, plain)], q, k, v, 28, torch.float32, None, 0.5)[0]
    assert ok < 1e-5 < 0.05 < wrong and plain_err < 1e-5


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "x"])
def test_a_bad_softcap_is_one_line_naming_the_flag(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["run", "decode", "--launcher", "local", "--softcap", value, *SMALL])
    assert exc.value.code == 2
    assert "--softcap" in capsys.readouterr().err.strip().splitlines()[-1]
