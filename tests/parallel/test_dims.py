"""ParallelDims, the one rules object (issue 17.2): the simulator and the API accept and refuse the
same inputs, naming the same field; its derived numbers against formulas written out here.

The API side runs ``sp_attention``'s own argument path (``_plan_for``: checks, "auto", the plan
and its schedules) for rank 0 of an N-rank group given as its shape only, so no process starts;
every rank runs the same checks on the same (agreed) arguments. The simulator side runs
``simulate_attention``, what ``tokenloom simulate attention`` calls.
"""

from __future__ import annotations

import types

import pytest
import torch

from tokenloom.common.errors import UsageError
from tokenloom.common.vocab import LAYOUTS, STRATEGIES, Layout, Strategy
from tokenloom.parallel.attention import _plan_for
from tokenloom.parallel.dims import AttentionProblem, ParallelDims, effective_window, kv_repeat_for
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import make_cluster
from tokenloom.simulator.scenario import simulate_attention

HEAD_DIM = 8

# (world_size, strategy, layout, global seq, heads, kv_heads, causal, window) -> field refused, or None
ROWS = [
    ((2, "tokenring", "zigzag", 64, 4, 2, True, None), None),
    ((4, "ulysses", "zigzag", 64, 8, 2, False, None), None),  # kv heads replicated twice
    ((3, "ulysses", "contiguous", 48, 6, 6, True, None), None),
    ((2, "ring", "contiguous", 64, 4, 4, True, (8, -1)), None),
    ((4, "tokenring", "zigzag", 64, 4, 1, False, (3, 5)), None),
    ((2, "ring", "zigzag", 64, 2, 2, True, (100, 0)), None),  # reaches past the sequence: no window
    ((2, Strategy.ULYSSES, Layout.ZIGZAG, 64, 4, 4, True, (7, 0)), None),  # enums are strings
    ((2, "ulysses", "zigzag", 64, 3, 3, False, None), "heads"),
    ((4, "ulysses", "contiguous", 64, 6, 2, False, None), "heads"),
    ((2, "tokenring", "zigzag", 66, 4, 4, True, None), "seq"),  # 33 tokens per rank: not two chunks
    ((3, "ring", "zigzag", 45, 4, 4, False, None), "seq"),
    ((2, "ring", "zigzag", 64, 6, 4, False, None), "kv_heads"),
    ((2, "ulysses", "zigzag", 64, 4, 3, False, None), "kv_heads"),
    ((2, "ring", "zigzag", 64, 4, 4, True, (-2, 0)), "window_size"),
    ((2, "ring", "zigzag", 64, 4, 4, False, (1.5, 0)), "window_size"),
    ((2, "ring", "zigzag", 64, 4, 4, False, (4,)), "window_size"),
    ((2, "bogus", "zigzag", 64, 4, 4, False, None), "strategy"),
    ((2, "ring", "diagonal", 64, 4, 4, False, None), "layout"),
]


def _simulator(n, strategy, layout, seq, heads, kv_heads, causal, window) -> str | None:
    try:
        shape = AttentionShape(seq, heads, HEAD_DIM, kv_heads, 1, 4)
        simulate_attention(strategy, make_cluster("h100-sxm", n), shape, causal=causal, backward=True,
                           layout=layout, window_size=window)
    except UsageError as exc:
        return exc.field
    return None


def _api(n, strategy, layout, seq, heads, kv_heads, causal, window) -> str | None:
    assert seq % n == 0, "a row the API can be handed: equal local lengths"
    groups = types.SimpleNamespace(rank=0, world_size=n, ulysses=1)
    q = torch.zeros(1, seq // n, heads, HEAD_DIM, requires_grad=True)
    k, v = (torch.zeros(1, seq // n, kv_heads, HEAD_DIM, requires_grad=True) for _ in range(2))
    agreed, plan = _plan_for("sp_attention", groups, None, q, k, v, strategy=strategy, causal=causal,
                             layout=layout, softmax_scale=None, impl="torch", cu_seqlens=None,
                             hardware="h100-sxm", window_size=window)
    if agreed.error is None:
        assert plan is not None and plan.pdims.name == str(strategy)
        return None
    return agreed.error[0]


@pytest.mark.parametrize("row, field", ROWS, ids=[f"{r[0]}x{r[1]}-{r[2]}-s{r[3]}-h{r[4]}/{r[5]}-{r[7]}"
                                                  for r, _ in ROWS])
def test_simulator_and_api_accept_and_refuse_the_same_inputs(row, field):
    assert (_simulator(*row), _api(*row)) == (field, field)


def test_the_simulator_builds_the_api_s_rules_object():
    """The dims the simulator prices are the dims the API runs (same schedule cache key)."""
    from tokenloom.simulator.scenario import attention_dims

    row = (4, "ulysses", "zigzag", 64, 8, 2, True, (5, 0))
    n, strategy, layout, seq, heads, kv_heads, causal, window = row
    sim = attention_dims(strategy, n, AttentionShape(seq, heads, HEAD_DIM, kv_heads), layout=layout,
                         causal=causal, window_size=window)
    q = torch.zeros(1, seq // n, heads, HEAD_DIM)
    k = torch.zeros(1, seq // n, kv_heads, HEAD_DIM)
    _, plan = _plan_for("sp_attention", types.SimpleNamespace(rank=0, world_size=n, ulysses=1), None, q, k, k,
                        strategy=strategy, causal=causal, layout=layout, softmax_scale=None, impl="torch",
                        cu_seqlens=None, hardware=None, window_size=window)
    assert sim == plan.pdims and sim.kv_repeat == 2 and sim.head_shards == 4


@pytest.mark.parametrize("kv_heads, shards", [(8, 8), (2, 8), (3, 4), (6, 4), (1, 3), (5, 5), (4, 6)])
def test_kv_repeat_makes_kv_heads_split_evenly(kv_heads, shards):
    """The smallest r with (kv_heads * r) % shards == 0, found by search."""
    want = next(r for r in range(1, shards + 1) if kv_heads * r % shards == 0)
    assert kv_repeat_for(kv_heads, shards) == want
    assert ParallelDims("ulysses", shards, heads=kv_heads * shards, kv_heads=kv_heads).kv_repeat == want


@pytest.mark.parametrize("size, causal, seq, want", [
    (None, True, 64, None), ((-1, -1), False, 64, None), ((-1, 5), True, 64, None), ((8, 3), True, 64, (8, 0)),
    ((8, 3), False, 64, (8, 3)), ((63, 0), True, 64, None), ((62, 0), True, 64, (62, 0)), ((2, 80), False, 64, (2, -1)),
])
def test_effective_window(size, causal, seq, want):
    assert effective_window(size, causal, seq) == want


def test_dense_chunk_len_names_seq():
    assert ParallelDims("ring", 4, layout="zigzag").dense_chunk_len(64) == 8
    assert ParallelDims("ring", 4, layout="contiguous").dense_chunk_len(64) == 16
    with pytest.raises(UsageError) as e:
        ParallelDims("ring", 4, layout="zigzag").dense_chunk_len(60)
    assert e.value.field == "seq" and "2 * world_size = 8" in str(e.value)


def test_vocabulary_enums_are_the_plain_strings():
    assert STRATEGIES == ("tokenring", "ring", "ulysses") and LAYOUTS == ("contiguous", "zigzag")
    assert Strategy.RING == "ring" and f"{Strategy.RING}" == "ring" and str(Layout.ZIGZAG) == "zigzag"
    assert ParallelDims(Strategy.TOKENRING, 2) == ParallelDims("tokenring", 2)
    assert type(ParallelDims(Strategy.TOKENRING, 2).strategy) is str
    assert hash(Strategy.ULYSSES) == hash("ulysses")


def test_attention_problem_takes_the_advisor_s_keyword_names():
    p = AttentionProblem.of(world_size=2, seq_len=64, num_heads=4, num_kv_heads=2, head_dim=8, causal=True,
                            window_size=(8, 4))
    assert (p.heads, p.kv_heads, p.window) == (4, 2, (8, 0))
    assert p.dims("ulysses").kv_repeat == 1 and p.dims("ulysses").window == (8, 0)
    assert AttentionProblem.of(**vars(p)) == p and hash(AttentionProblem.of(**vars(p))) == hash(p)


def test_the_api_takes_enums_or_strings_alike():
    from tokenloom.parallel import sp_attention
    from tokenloom.parallel.attention import _plan_for

    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    a = sp_attention(q, q, q, strategy=Strategy.RING, layout=Layout.CONTIGUOUS, causal=True)
    b = sp_attention(q, q, q, strategy="ring", layout="contiguous", causal=True)
    assert torch.equal(a, b)
    groups = types.SimpleNamespace(rank=0, world_size=2, ulysses=1)
    kw = dict(causal=True, softmax_scale=None, impl="torch", cu_seqlens=None, hardware=None)
    by_enum, _ = _plan_for("sp_attention", groups, None, q, q, q, strategy=Strategy.TOKENRING,
                           layout=Layout.ZIGZAG, **kw)
    by_str, _ = _plan_for("sp_attention", groups, None, q, q, q, strategy="tokenring", layout="zigzag", **kw)
    assert by_enum.values == by_str.values  # what ranks compare in the argument agreement
