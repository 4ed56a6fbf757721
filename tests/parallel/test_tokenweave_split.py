"""Split planner: exact against a brute force over every cut, thresholds, and the paper's facts."""

import statistics

import pytest

from tokenloom.common.errors import UsageError
from tokenloom.parallel.tokenweave_split import (GpuShape, LayerShape, plan_split, split_cost,
                                                 split_window)

LLAMA70B = LayerShape(8192, 28672, 64, 8, 8)
LLAMA8B = LayerShape(4096, 14336, 32, 8, 8)
QWEN72B = LayerShape(8192, 29568, 64, 8, 8)
MIXTRAL = LayerShape(6144, 16384, 48, 8, 8, num_experts=8, top_k=2)
MODELS = (LLAMA70B, LLAMA8B, QWEN72B, MIXTRAL)


def brute_force(layer, tokens, gpu):
    lo, hi = split_window(tokens)
    return min(split_cost(layer, tokens, k, gpu) for k in range(lo, hi + 1))


@pytest.mark.parametrize("layer", MODELS)
@pytest.mark.parametrize("gpu", [GpuShape(), GpuShape(sms=108, tile_m=64, tile_n=256, comm_sms=4),
                                 GpuShape(sms=17, tile_m=96, tile_n=64, comm_sms=0)])
def test_planner_matches_brute_force(layer, gpu):
    for tokens in (2048, 2100, 3000, 4097, 5555, 8191, 12345, 16384 + 77):
        plan = plan_split(layer, tokens, gpu)
        assert plan.mode == "split"
        assert plan.cost == pytest.approx(brute_force(layer, tokens, gpu))
        lo, hi = split_window(tokens)
        assert lo <= plan.cut <= hi
        assert plan.cost <= plan.naive_cost


def test_thresholds_and_modes():
    assert plan_split(LLAMA70B, 1023).mode == "fuse-only"
    assert plan_split(LLAMA70B, 1024).mode == "split"
    assert plan_split(MIXTRAL, 2047).mode == "fuse-only"
    assert plan_split(MIXTRAL, 2048).mode == "split"
    plain = plan_split(LayerShape(8192, 28672, 64, 8, 1), 8192)
    assert plain.mode == "plain" and plain.pieces == ((0, 8192),)
    fuse = plan_split(LLAMA70B, 13)
    assert fuse.pieces == ((0, 13),) and fuse.padded == (16,)
    split = plan_split(LLAMA70B, 4099)
    (a, b), (c, d) = split.pieces
    assert a == 0 and b == c and d == 4099
    assert all(p % 8 == 0 and p >= n for p, n in zip(split.padded, (b - a, d - c)))


def test_explanation_names_waves_and_penalty():
    text = plan_split(LLAMA70B, 4096).explain()
    assert "waves unsplit" in text and "naive 50/50" in text and "cut at" in text
    assert "below the dense split threshold" in plan_split(LLAMA70B, 512).explain()


def test_paper_facts():
    """Naive 50/50 can cost ~20%+ GEMM time; the wave-aware cut stays near the paper's 3-6%.

    The paper measured +22% worst case for 50/50 and +3-6% for its tuned offsets (REFERENCE.md
    §4) with 2-8 communication CTAs; the model here takes 8 SMs from compute while overlapping.
    """
    naive, chosen, offsets = [], [], []
    for layer in MODELS:
        for tokens in range(2048, 65536 + 1, 256):
            plan = plan_split(layer, tokens)
            naive.append(plan.naive_penalty)
            chosen.append(plan.penalty)
            offsets.append(abs(plan.cut - tokens / 2) / tokens)
    assert max(naive) >= 0.2
    assert all(c <= n + 1e-12 for c, n in zip(chosen, naive))
    assert 0.03 <= statistics.mean(chosen) <= 0.08
    assert statistics.mean(chosen) < statistics.mean(naive)
    assert statistics.median(offsets) <= 0.07  # cuts stay near the middle: the paper's offsets <= 256


def test_bad_input_names_the_field():
    with pytest.raises(UsageError, match="hidden"):
        LayerShape(1000, 4096, 64, 8, 8)
    with pytest.raises(UsageError, match="tp"):
        LayerShape(8192, 28672, 64, 8, 3)
    with pytest.raises(UsageError, match="tokens"):
        plan_split(LLAMA70B, 0)
