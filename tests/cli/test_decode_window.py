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
