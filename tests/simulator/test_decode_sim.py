"""The decode scenario: memory-bound pricing from the runtime's decode schedules, the N-fold gain
on GPUs, the GPUs a context needs at a target ms per token, and the CLI."""

import json

import pytest

from tokenloom.cli import main
from tokenloom.simulator.decode import (
    DECODE_FIXED_S, DECODE_HBM_EFF, DECODE_OVERLAP_P, H200_DECODE_ROWS, H200_DECODE_SHAPE, DecodeShape,
    fit_decode_kernel, min_gpus_for, read_s, simulate_decode)
from tokenloom.simulator.hardware import make_cluster

LLAMA70 = dict(heads=64, kv_heads=8, head_dim=128, layers=80)


def _cluster(n, hw="h100-sxm"):
    return make_cluster(hw, n, max(1, n // 8))


def test_one_gpu_is_cache_bytes_over_hbm_bandwidth_at_long_contexts():
    sh = DecodeShape(context=1 << 20, **LLAMA70)
    res = simulate_decode(_cluster(1), sh, "gather")
    dev = _cluster(1).node.device
    assert res.comm_ms == pytest.approx(0.0)
    want = sh.cache_bytes(sh.context + 1) / (dev.hbm_bw * DECODE_HBM_EFF)
    assert res.step_ms == pytest.approx(want * 1e3, rel=0.02)  # the fixed cost hides in the stream


def test_h200_decode_steps_priced_within_3_percent_of_the_measured_ones():
    """benchmarks/gpu_shapes.py on one H200 (torch SDPA, bf16, 8 heads, d=128, 1 new token)."""
    cluster = make_cluster("h200-sxm", 1)
    for context, ms in H200_DECODE_ROWS:
        got = simulate_decode(cluster, DecodeShape(context, **H200_DECODE_SHAPE), "auto").step_ms
        assert got == pytest.approx(ms, rel=0.03), (context, got, ms)


def test_decode_kernel_constants_are_the_fit_and_predict_the_held_out_rows():
    """The committed constants are fit_decode_kernel's answer on the 4K, 64K and 1M rows; the 16K
    and 256K rows, not fitted, are priced within 3 % (2.4 % and 1.8 %)."""
    dev = make_cluster("h200-sxm", 1).node.device
    fitted = [r for r in H200_DECODE_ROWS if r[0] in (4096, 65536, 1 << 20)]
    fixed, eff, p, worst = fit_decode_kernel(fitted, dev)
    assert (fixed, eff, p) == pytest.approx((DECODE_FIXED_S, DECODE_HBM_EFF, DECODE_OVERLAP_P), rel=1e-6)
    assert worst < 0.01
    for context, ms in H200_DECODE_ROWS:
        if (context, ms) not in fitted:
            got = read_s(2.0 * context * 8 * 128 * 2, dev) * 1e3
            assert got == pytest.approx(ms, rel=0.03), context


def test_priced_through_the_shared_engine():
    """The lockstep evaluation and the event engine price a decode schedule alike (one engine)."""
    from tokenloom.parallel.decode_schedule import build_decode_schedule
    from tokenloom.simulator.decode import DecodeCost
    from tokenloom.simulator.engine import simulate
    from tokenloom.simulator.lockstep import plan_from_schedule, simulate_plan

    cluster = _cluster(8)
    sh = DecodeShape(context=1 << 16, new_tokens=64, **LLAMA70)
    for strategy in ("gather", "ring", "passkv"):
        sched = build_decode_schedule(strategy, 8, start=0, replicated=False)
        lens = {r: 8192 for r in range(8)} | {8 + j: 8 for j in range(8)}
        cost = DecodeCost(sh, cluster, lens)
        a = simulate(sched, cost).total_s
        b = simulate_plan(plan_from_schedule(sched, cost), cluster, cost).total_s
        assert a == pytest.approx(b, rel=1e-9) and a > 0


@pytest.mark.parametrize("strategy", ["gather", "ring", "passkv", "auto"])
def test_every_strategy_is_priced_and_gpus_divide_the_read(strategy):
    sh = DecodeShape(context=1 << 20, **LLAMA70)
    one = simulate_decode(_cluster(1), sh, strategy)
    eight = simulate_decode(_cluster(8), sh, strategy)
    if strategy in ("gather", "auto"):  # every rank reads its share at once; a few KB of messages
        # + per layer one kernel's fixed cost and the 7 merges the runtime runs one by one
        assert one.compute_ms / 8 <= eight.compute_ms < one.compute_ms / 8 * 1.6
        assert eight.step_ms < one.step_ms / 4
    elif strategy == "ring":  # one new token is one rank's part: it visits the shards in turn
        assert eight.compute_ms > 0.9 * one.compute_ms
    else:  # pass-KV moves the whole cache to the one rank with a query: slower than one GPU
        assert eight.step_ms > one.step_ms


def test_decode_prefers_pass_q_and_long_chunks_can_prefer_pass_kv():
    decode = DecodeShape(context=1 << 20, **LLAMA70)
    assert simulate_decode(_cluster(8), decode, "auto").strategy in ("gather", "ring")
    assert (simulate_decode(_cluster(8), decode, "passkv").step_ms
            > simulate_decode(_cluster(8), decode, "gather").step_ms)
    # a chunk as long as the cache, MHA (kv_heads = heads): moving KV beats moving Q and partials
    chunk = DecodeShape(context=1 << 12, new_tokens=1 << 16, heads=8, kv_heads=1, head_dim=128)
    gather = simulate_decode(_cluster(16), chunk, "gather", replicated=False)
    passkv = simulate_decode(_cluster(16), chunk, "passkv", replicated=False)
    assert passkv.comm_ms < gather.comm_ms


def test_gpus_needed_for_a_million_tokens_at_a_target():
    sh = DecodeShape(context=1 << 20, **LLAMA70)
    best, tried = min_gpus_for(lambda n: _cluster(n, "h200-sxm"), sh, 20.0)
    assert best is not None and best.step_ms <= 20.0 and best.fits
    assert all(not (t.fits and t.step_ms <= 20.0) for t in tried[:-1])
    assert [t.gpus for t in tried] == [2 ** i for i in range(len(tried))]
    assert not tried[0].fits  # 344 GB of cache does not fit one H200


def test_cli_json_and_target(capsys):
    assert main(["simulate", "decode", "--hardware", "h100-sxm", "--gpus", "8", "--context", "1M",
                 "--heads", "64", "--kv-heads", "8", "--head-dim", "128", "--layers", "80", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["gpus"] == 8 and rep["step_ms"] > 0 and rep["shape"]["context"] == 1 << 20
    assert main(["simulate", "decode", "--hardware", "h200-sxm", "--context", "1M", "--heads", "64",
                 "--kv-heads", "8", "--head-dim", "128", "--layers", "80", "--target-ms", "20"]) == 0
    assert "meet 20 ms per step" in capsys.readouterr().out


def test_cli_needs_gpus_or_target(capsys):
    assert main(["simulate", "decode", "--context", "64K"]) == 2
    assert "--gpus" in capsys.readouterr().err
