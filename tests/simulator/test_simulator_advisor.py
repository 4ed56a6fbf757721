"""choose_strategy / detect_hardware (used by sp_attention(strategy="auto")) and the demo section."""

from __future__ import annotations

import io
import time

import pytest
import torch

from tokenloom.simulator import advisor, choose_strategy, detect_hardware
from tokenloom.simulator.demo import demo_section
from bounds import NO_SPIN_S

SHAPE = dict(world_size=8, seq_len=131072, num_heads=32, head_dim=128, causal=True)


def test_choose_strategy_returns_a_runnable_pair_and_is_cached():
    advisor._choose.cache_clear()
    first = choose_strategy(num_kv_heads=8, hardware="h100-sxm", **SHAPE)
    again = choose_strategy(num_kv_heads=8, hardware="h100-sxm", **SHAPE)
    assert first == again and first[0] in ("tokenring", "ring", "ulysses") and first[1] in ("zigzag", "contiguous")
    assert advisor._choose.cache_info().hits >= 1


def test_choose_strategy_respects_a_fixed_layout_and_infeasible_shapes():
    _, layout = choose_strategy(num_kv_heads=32, hardware="h100-sxm", layout="contiguous", **SHAPE)
    assert layout == "contiguous"
    # 12 heads cannot split over 8 ranks: never Ulysses.
    strategy, _ = choose_strategy(world_size=8, seq_len=4096, num_heads=12, num_kv_heads=12, head_dim=64,
                                  causal=False, hardware="a10-pcie")
    assert strategy != "ulysses"
    with pytest.raises(ValueError, match="seq"):
        choose_strategy(world_size=8, seq_len=1001, num_heads=8, num_kv_heads=8, head_dim=64, causal=False,
                        hardware="h100-sxm")
    with pytest.raises(ValueError, match="hardware"):
        choose_strategy(num_kv_heads=8, hardware="nope", **SHAPE)


def test_choose_strategy_defaults_to_detected_hardware():
    assert choose_strategy(num_kv_heads=8, **SHAPE) == choose_strategy(num_kv_heads=8, hardware=detect_hardware(),
                                                                        **SHAPE)


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H200", "h200-sxm"),
                                            ("NVIDIA A100-SXM4-80GB", "a100-sxm"), ("NVIDIA A10", "a10-pcie"),
                                            ("AMD Instinct MI300X", "mi300x"), ("NVIDIA L4", "h100-sxm")])
def test_detect_hardware_maps_cuda_names(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    detect_hardware.cache_clear()
    try:
        assert detect_hardware() == expected
    finally:
        detect_hardware.cache_clear()


def test_detect_hardware_never_raises(monkeypatch):
    def broken(i=0):
        raise RuntimeError("driver too old")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", broken)
    detect_hardware.cache_clear()
    try:
        assert detect_hardware() == "local-cpu"
    finally:
        detect_hardware.cache_clear()
    if not torch.cuda.is_available():
        assert detect_hardware() == "local-cpu"


def test_demo_section_compares_three_strategies():
    out = io.StringIO()
    t0 = time.perf_counter()
    demo_section(out)
    assert time.perf_counter() - t0 < NO_SPIN_S
    text = out.getvalue()
    for word in ("tokenring", "ring", "ulysses", "wins", "exposed", "8 x h100-sxm"):
        assert word in text


def test_advice_calls_a_tie_a_tie():
    from tokenloom.simulator import AttentionShape, advise_attention, make_cluster

    # Compute-bound on NVSwitch: everything overlaps, the strategies differ by well under 1%.
    tie = advise_attention(make_cluster("h100-sxm", 8), AttentionShape(131072, 32, 128), causal=True)
    assert tie.is_tie and "tie" in tie.verdict()
    # PCIe with GQA: Ring moves far fewer bytes than TokenRing and wins clearly.
    win = advise_attention(make_cluster("a10-pcie", 4), AttentionShape(32768, 32, 128, 8), causal=True)
    assert not win.is_tie and win.winner.strategy == "ring" and "wins by" in win.verdict()
    assert win.rival.total_s > 1.01 * win.winner.total_s
