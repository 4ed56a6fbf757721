"""The exact-metric stages: dp swap polish (colocate.exact_polish) and the expert model's node-level
block-coordinate descent (chain.py), against brute-force enumeration and the message metrics."""

import itertools

import numpy as np
import pytest

from tokenloom.placement import PlacementProblem, plan_placement, trace_from_topk
from tokenloom.placement.chain import chain_polish, layer_affinity, layer_context, layer_cost, node_shares
from tokenloom.placement.colocate import exact_polish_row
from tokenloom.placement.dispatch import message_metrics
from tokenloom.placement.eplb import eplb_policy_rows
from tokenloom.placement.exact import exact_affinity, exact_cost, exact_polish, tokens_cost
from tokenloom.placement.greedy import eplb_replica_counts, greedy_layer
from tokenloom.placement.metrics import gpu_loads
from tokenloom.placement.node_search import NodeState, row_state
from tokenloom.placement.router import RouterConfig, router_topk
from tokenloom.placement.trace import coactivation


def _random_ids(rng, layers, experts, k, tokens):
    return np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]) for _ in range(layers)])


def _brute_distinct_nodes(P_counts, token):
    """Expected distinct nodes of one token by enumerating every replica choice (uniform)."""
    options = [[n for n in range(P_counts.shape[1]) for _ in range(int(P_counts[e, n]))] for e in token]
    total = sum(len(set(choice)) for choice in itertools.product(*options))
    return total / np.prod([len(o) for o in options])


def test_dp_exact_cost_and_affinity_against_brute_force():
    rng = np.random.default_rng(0)
    X = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1], [0, 0, 1], [1, 1, 1], [2, 0, 0]], dtype=float)
    P = X / X.sum(1, keepdims=True)
    ids = _random_ids(rng, 1, 6, 3, 20)[0]
    assert tokens_cost(P, ids) == pytest.approx(sum(_brute_distinct_nodes(X, t) for t in ids))
    B = exact_affinity(P, ids)
    for e in range(6):  # the metric is linear in one expert's shares, with slope B[e]
        Q = P.copy()
        Q[e] = rng.dirichlet(np.ones(3))
        assert tokens_cost(Q, ids) - tokens_cost(P, ids) == pytest.approx(((Q[e] - P[e]) * B[e]).sum())


@pytest.mark.parametrize("seed", range(3))
def test_dp_exact_polish_keeps_invariants_and_lowers_the_exact_metric(seed):
    rng = np.random.default_rng(seed)
    problem = PlacementProblem.build(1, 24, 8, 2, 8)  # 4 nodes of 2 GPUs
    topic = rng.integers(4, size=400)
    ids = np.stack([rng.choice(np.arange(6 * t, 6 * t + 6) if rng.random() < 0.8 else np.arange(24), 4, replace=False)
                    for t in topic])  # experts 6t..6t+5 co-activate
    loads = np.bincount(ids.ravel(), minlength=24).astype(float)
    counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
    start = greedy_layer(loads, problem, counts)
    cap = 1.1 * gpu_loads(loads, start, 8).max()
    coact = coactivation(ids, 24)
    node = np.arange(problem.num_slots) // 8
    state = row_state(start, node, coact, loads, problem)
    before = tokens_cost(state.X / state.counts[:, None], ids)
    node_cap = max(cap * 2, float(state.load.max()))
    applied = exact_polish(state, ids, 2, node_cap, deadline=float("inf"))
    after = tokens_cost(state.X / state.counts[:, None], ids)
    assert applied > 0 and after < before
    assert np.array_equal(state.counts, counts) and state.X.max() <= 2 and state.load.max() <= node_cap * (1 + 1e-9)
    fresh = NodeState(state.expert, state.node, coact, loads / counts, 4)  # incremental state == rebuilt state
    assert np.allclose(fresh.X, state.X) and np.allclose(fresh.load, state.load)
    row = exact_polish_row(start, exact_cost(start, ids, problem), ids, coact, loads, cap, problem, float("inf"))
    assert exact_cost(row, ids, problem) < exact_cost(start, ids, problem)
    assert np.array_equal(np.bincount(row, minlength=24), counts)
    assert all(len(set(row[g * 4:(g + 1) * 4])) == 4 for g in range(8))
    assert gpu_loads(loads, row, 8).max() <= cap * (1 + 1e-9)


def test_expert_layer_cost_is_the_message_metric_difference():
    rng = np.random.default_rng(1)
    L, E, K, T = 3, 8, 3, 40
    problem = PlacementProblem.build(L, E, 4, 2, 4)
    ids = _random_ids(rng, L, E, K, T)
    rows = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, 4, replace=False)])) for _ in range(L)])

    def total(r):  # expected messages over all tokens and layers (brute-force checked in test_placement_dispatch)
        return message_metrics(r, ids, E, 4, 2, "expert").messages_per_token * L * T

    shares = [node_shares(r, E, problem) for r in rows]
    for l in range(L):
        w, R = layer_context(shares, ids, l)
        other = rows.copy()
        other[l] = rng.permutation(rows[l])
        got = layer_cost(node_shares(other[l], E, problem), ids[l], w, R) - layer_cost(shares[l], ids[l], w, R)
        assert got == pytest.approx(total(other) - total(rows))
        B = layer_affinity(shares[l], ids[l], w, R)
        for e in range(E):  # linear in one expert's shares
            Q = shares[l].copy()
            Q[e] = rng.dirichlet(np.ones(2))
            assert layer_cost(Q, ids[l], w, R) - layer_cost(shares[l], ids[l], w, R) == pytest.approx(((Q[e] - shares[l][e]) * B[e]).sum())


def test_chain_polish_never_raises_the_expert_metric_and_keeps_caps():
    cfg = RouterConfig(4, 32, 4, 1200, num_groups=8, topk_group=4, topic_strength=2.0, seed=0)
    ids = router_topk(cfg)
    trace = trace_from_topk(ids, 32)
    problem = PlacementProblem.build(4, 32, 8, 2, 8)
    rows = np.stack([greedy_layer(trace.loads[l], problem, eplb_replica_counts(trace.loads[l], 40, 8)) for l in range(4)])
    caps = np.array([1.05 * gpu_loads(trace.loads[l], rows[l], 8).max() for l in range(4)])
    before = message_metrics(rows, ids, 32, 8, 2, "expert").messages_per_token
    out, info = chain_polish(rows, ids, trace.loads, caps, problem, float("inf"))
    after = message_metrics(out, ids, 32, 8, 2, "expert").messages_per_token
    assert after < before and info["layers_changed"] > 0
    for l in range(4):
        assert np.array_equal(np.bincount(out[l], minlength=32), np.bincount(rows[l], minlength=32))
        assert all(len(set(out[l][g * 5:(g + 1) * 5])) == 5 for g in range(8))
        assert gpu_loads(trace.loads[l], out[l], 8).max() <= caps[l] * (1 + 1e-9)


@pytest.mark.parametrize("strength", [0.0, 2.0])
def test_expert_plan_vs_eplb_with_the_node_stage(strength):
    cfg = RouterConfig(3, 64, 4, 3000, num_groups=8, topk_group=4, topic_strength=strength, seed=0)
    trace = trace_from_topk(router_topk(cfg), 64)
    plan = plan_placement(trace, 16, gpus_per_node=4, num_redundant=16, expert_groups=8, holdout=0.25, time_limit=6,
                          token_home="expert")
    assert plan.solver["node_stage"]["status"] == "feasible"
    train, test = trace.split(0.25, 0)
    problem = plan.problem()
    eplb, _ = eplb_policy_rows(train.loads, problem, 8)

    def msgs(rows, t):
        return message_metrics(rows, t.topk_ids, 64, 16, 4, "expert").messages_per_token

    assert msgs(plan.phy2log, train) <= 1.01 * msgs(eplb, train)  # never more than 1% above EPLB, even unstructured
    assert msgs(plan.phy2log, test) <= 1.01 * msgs(eplb, test)
    if strength > 0:
        assert msgs(plan.phy2log, test) < 0.97 * msgs(eplb, test)
    for l in range(3):
        assert gpu_loads(train.loads[l], plan.phy2log[l], 16).max() <= plan.solver["traffic"]["cap"][l] * (1 + 1e-9)
