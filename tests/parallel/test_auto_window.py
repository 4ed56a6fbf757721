"""``strategy="auto"`` prices the window it is given (issue 18): a short window hides most blocks,
so a ring that only talks to its neighbours beats Ulysses, which pays its all-to-alls regardless.

The reference is the simulator's own price of each candidate under the same window
(``simulate_attention``), not the advisor's ranking: auto must pick the cheapest of them.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from tokenloom.common.vocab import RING_STRATEGIES, STRATEGIES
from tokenloom.parallel.attention import _plan_for
from tokenloom.parallel.dims import AttentionProblem
from tokenloom.simulator import choose_strategy
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import make_cluster
from tokenloom.simulator.scenario import simulate_attention

N, SEQ, HEADS, HEAD_DIM = 8, 16384, 8, 128  # 8 H100s: without a window Ulysses wins this shape


def _priced(window, backward):
    shape = AttentionShape(SEQ, HEADS, HEAD_DIM, HEADS, 1, 2)
    cluster = make_cluster("h100-sxm", N)
    return {s: simulate_attention(s, cluster, shape, causal=True, backward=backward, layout="zigzag",
                                  window_size=window).total_s for s in STRATEGIES}


@pytest.mark.parametrize("backward", [False, True])
def test_auto_picks_the_cheapest_strategy_for_the_window(backward):
    problem = AttentionProblem(N, SEQ, HEADS, HEAD_DIM, HEADS, causal=True, backward=backward, layout="zigzag")
    # 128 tokens: with each rank's whole windowed band priced as one kernel call, Ulysses' backward
    # already wins at 256 (its all-to-alls then cost about what the ring's two hops do)
    full, windowed = _priced(None, backward), _priced((128, 0), backward)
    assert min(full, key=full.get) == "ulysses"  # the premise: the window is what changes the answer
    assert min(windowed, key=windowed.get) in RING_STRATEGIES
    shrink = {s: windowed[s] / full[s] for s in STRATEGIES}
    assert shrink["ulysses"] > max(shrink[s] for s in RING_STRATEGIES)  # Ulysses' all-to-alls do not shrink
    assert choose_strategy(problem, hardware="h100-sxm")[0] == "ulysses"
    chosen = choose_strategy(dataclasses.replace(problem, window=(128, 0)), hardware="h100-sxm")[0]
    assert chosen == min(windowed, key=windowed.get)


def test_a_window_reaching_past_the_sequence_is_no_window():
    problem = AttentionProblem.of(world_size=N, seq_len=SEQ, heads=HEADS, head_dim=HEAD_DIM, causal=True,
                                  layout="zigzag", window_size=(SEQ, 0))
    assert problem.window is None and choose_strategy(problem, hardware="h100-sxm")[0] == "ulysses"


@pytest.mark.parametrize("window, want", [(None, "ulysses"), ((256, 0), "ring-type")])
def test_sp_attention_auto_resolves_with_the_window(window, want):
    """The API's own resolution (rank 0 of 8, bf16, forward): the window reaches the advisor."""
    q = torch.zeros(1, SEQ // N, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    groups = types.SimpleNamespace(rank=0, world_size=N, ulysses=1)
    agreed, plan = _plan_for("sp_attention", groups, None, q, q, q, strategy="auto", causal=True,
                             layout="zigzag", softmax_scale=None, impl="torch", cu_seqlens=None,
                             hardware="h100-sxm", window_size=window)
    assert agreed.error is None
    got = plan.pdims.strategy
    assert got == want if want == "ulysses" else got in RING_STRATEGIES
    assert plan.pdims.window == window
