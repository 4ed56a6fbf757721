"""Planners: invariants on every method, ILP against brute force and EPLB's README example, re-planning."""

import itertools

import numpy as np
import pytest

from tokenloom.placement import (
    METHODS, PlacementProblem, SynthConfig, Trace, evaluate_plan, load_plan, plan_placement, synth_topk, trace_from_topk,
)
from tokenloom.placement.evaluate import traffic_cost
from tokenloom.placement.greedy import eplb_replica_counts


def _trace(num_layers, num_experts, top_k=2, seed=0, **kw):
    cfg = SynthConfig(num_layers, num_experts, top_k, 400, skew=1.0, affinity=0.7, seed=seed, **kw)
    return trace_from_topk(synth_topk(cfg), num_experts)


def _gpu_loads(loads, row, num_gpus):
    """Independent reference: per-GPU load by loops (expert load split evenly over replicas)."""
    counts = {e: list(row).count(e) for e in set(row.tolist())}
    spg = len(row) // num_gpus
    return np.array([sum(loads[e] / counts[e] for e in row[g * spg:(g + 1) * spg]) for g in range(num_gpus)])


def _check_invariants(plan, num_experts, num_gpus, num_slots):
    assert plan.phy2log.shape[1] == num_slots
    spg = num_slots // num_gpus
    for row in plan.phy2log:
        assert set(row.tolist()) == set(range(num_experts))  # every expert has >= 1 replica
        for g in range(num_gpus):
            on_gpu = row[g * spg:(g + 1) * spg]
            assert len(on_gpu) == spg and len(set(on_gpu.tolist())) == spg  # exact slots, no duplicates
    for l, row in enumerate(plan.phy2log):  # log2phy / logcnt agree with phy2log
        for e in range(num_experts):
            slots = [s for s in range(num_slots) if row[s] == e]
            assert plan.logcnt[l, e] == len(slots)
            assert plan.log2phy[l, e, :len(slots)].tolist() == slots
            assert (plan.log2phy[l, e, len(slots):] == -1).all()


SHAPES = [  # (experts, gpus, gpus_per_node, redundant, expected slots)
    (8, 4, 2, None, 8),
    (10, 4, 2, None, 12),  # non-divisible: default pads with 2 redundant slots
    (8, 16, 8, None, 16),  # more GPUs than experts: every expert replicated twice
    (12, 6, 3, 6, 18),
]


@pytest.mark.parametrize("method,home", [(m, "expert") for m in METHODS] + [("ilp", "dp")])
@pytest.mark.parametrize("num_experts,num_gpus,gpn,redundant,num_slots", SHAPES)
def test_invariants_every_method(tmp_path, method, home, num_experts, num_gpus, gpn, redundant, num_slots):
    trace = _trace(3, num_experts)
    # max_imbalance=1: the expert ILP keeps its balance stage's optimum (the default allows EPLB's looser balance)
    plan = plan_placement(trace, num_gpus, gpus_per_node=gpn, num_redundant=redundant, method=method, time_limit=2.0,
                          token_home=home, max_imbalance=1.0 if home == "expert" else None)
    _check_invariants(plan, num_experts, num_gpus, num_slots)
    plan.save(tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    np.testing.assert_array_equal(back.phy2log, plan.phy2log)
    assert back.to_dict() == plan.to_dict()
    metrics = evaluate_plan(back, trace)
    assert metrics.max_mean_load == pytest.approx(plan.metrics["max_mean_load"])
    for l, row in enumerate(plan.phy2log):
        ref = _gpu_loads(trace.loads[l], row, num_gpus)
        assert metrics.max_mean_load[l] == pytest.approx(ref.max() / ref.mean())
    if method == "ilp" and home == "dp":  # every layer within its cap (EPLB's max load, or the balanced start's)
        for l, row in enumerate(plan.phy2log):
            assert _gpu_loads(trace.loads[l], row, num_gpus).max() <= plan.solver["cap"][l] * (1 + 1e-9)
    elif method == "ilp":  # never worse than greedy on any layer, whatever the shape
        greedy = plan_placement(trace, num_gpus, gpus_per_node=gpn, num_redundant=redundant, method="greedy")
        assert all(i <= g * (1 + 1e-12) for i, g in zip(plan.metrics["max_mean_load"], greedy.metrics["max_mean_load"]))


def test_ilp_never_worse_than_greedy_and_cuts_traffic():
    trace = _trace(6, 32, top_k=4, num_domains=4)
    kw = dict(gpus_per_node=4, num_redundant=8)
    greedy = plan_placement(trace, 8, method="greedy", **kw)
    ilp = plan_placement(trace, 8, method="ilp", time_limit=4.0, token_home="expert", max_imbalance=1.0, **kw)
    assert all(i <= g + 1e-12 for i, g in zip(ilp.metrics["max_mean_load"], greedy.metrics["max_mean_load"]))
    assert ilp.metrics["cross_node_tokens"] < 0.9 * greedy.metrics["cross_node_tokens"]
    assert ilp.solver["status"] in ("optimal", "feasible") and ilp.solver["seconds"] < 6.0
    assert traffic_cost(ilp, trace) == pytest.approx(ilp.solver["node_stage"]["traffic_cost"])  # after the exact stage
    assert ilp.solver["traffic"]["cost"] <= ilp.solver["traffic"]["start_cost"]


def _brute_min_max(loads, counts, num_gpus):
    """Min over every assignment of the replicas to GPUs (full, no duplicates) of the max GPU load."""
    replicas = [e for e in range(len(loads)) for _ in range(counts[e])]
    spg = len(replicas) // num_gpus
    best = np.inf
    for perm in set(itertools.permutations(replicas)):
        gpus = [perm[g * spg:(g + 1) * spg] for g in range(num_gpus)]
        if any(len(set(x)) < spg for x in gpus):
            continue
        best = min(best, max(sum(loads[e] / counts[e] for e in x) for x in gpus))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ilp_balance_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    loads = rng.integers(1, 100, size=(1, 6)).astype(float)
    plan = plan_placement(Trace(loads=loads), 3, gpus_per_node=3, num_redundant=3, method="ilp", time_limit=5.0,
                          token_home="expert")
    counts = eplb_replica_counts(loads[0], 9, 3)
    best = _brute_min_max(loads[0], counts, 3)
    got = _gpu_loads(loads[0], plan.phy2log[0], 3).max()
    assert got == pytest.approx(best)
    assert plan.solver["status"] == "optimal" and plan.solver["gap"] <= 1e-4


def test_exact_chain_is_optimal_against_brute_force():
    trace = _trace(3, 4, top_k=2, seed=5)
    plan = plan_placement(trace, 2, gpus_per_node=1, method="ilp", time_limit=5.0, token_home="expert")  # 2 nodes of 1 GPU
    assert plan.solver["traffic"]["method"] == "exact_chain" and plan.solver["status"] == "optimal"
    problem = PlacementProblem.build(3, 4, 2, 1)
    weights = problem.link_weights()
    rows = [np.array(list(a) + [e for e in range(4) if e not in a]) for a in itertools.combinations(range(4), 2)]
    caps = [min(_gpu_loads(trace.loads[l], r, 2).max() for r in rows) for l in range(3)]
    best = np.inf
    for chain in itertools.product(rows, repeat=3):
        if any(_gpu_loads(trace.loads[l], chain[l], 2).max() > caps[l] + 1e-9 for l in range(3)):
            continue
        cost = sum(trace.transitions[l][a, b] * weights[list(chain[l]).index(a) // 2, list(chain[l + 1]).index(b) // 2]
                   for l in range(2) for a in range(4) for b in range(4))
        best = min(best, cost)
    assert traffic_cost(plan, trace) == pytest.approx(best)


# DeepSeek EPLB README: 2 layers x 12 experts, 16 replicas, 2 nodes x 4 GPUs, and EPLB's own answer.
EPLB_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], dtype=float)
EPLB_PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                         [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


@pytest.mark.parametrize("method", ["greedy", "ilp"])
def test_eplb_readme_example_is_balanced(method):
    plan = plan_placement(Trace(loads=EPLB_WEIGHT), 8, gpus_per_node=4, num_redundant=4, method=method, time_limit=5.0)
    _check_invariants(plan, 12, 8, 16)
    for l in range(2):
        ours = _gpu_loads(EPLB_WEIGHT[l], plan.phy2log[l], 8)
        eplb = _gpu_loads(EPLB_WEIGHT[l], EPLB_PHY2LOG[l], 8)
        assert ours.max() <= eplb.max() + 1e-9  # at least as balanced as DeepSeek's own answer
        assert ours.max() < eplb.max()  # strictly better on both layers
    if method == "ilp":
        counts = [eplb_replica_counts(EPLB_WEIGHT[l], 16, 8) for l in range(2)]
        for l in range(2):
            assert _gpu_loads(EPLB_WEIGHT[l], plan.phy2log[l], 8).max() == pytest.approx(
                _brute_pairs_min_max(EPLB_WEIGHT[l], counts[l]))


def _brute_pairs_min_max(loads, counts):
    """2 slots per GPU: the optimum pairs the replicas; enumerate all pairings of the 16 replicas."""
    items = [loads[e] / counts[e] for e in range(len(loads)) for _ in range(counts[e])]
    names = [e for e in range(len(loads)) for _ in range(counts[e])]

    def best(rest, limit):
        """Smallest achievable max pair sum below ``limit`` (else ``limit``): exhaustive with pruning."""
        if not rest:
            return 0.0
        first, out = rest[0], limit
        for j in rest[1:]:
            if names[first] != names[j] and items[first] + items[j] < out:
                left = [k for k in rest[1:] if k != j]
                out = min(out, max(items[first] + items[j], best(left, out)))
        return out

    order = sorted(range(len(items)), key=lambda i: -items[i])
    return best(order, np.inf)


def test_replanning_moves_at_most_k_experts():
    old, new = _trace(4, 16, seed=1), _trace(4, 16, seed=2)
    kw = dict(gpus_per_node=4, num_redundant=8)
    previous = plan_placement(old, 8, method="greedy", **kw)
    moved = plan_placement(new, 8, previous=previous, max_moves=2, **kw)
    assert moved.method == "migrate" and all(m <= 2 for m in moved.solver["moves"])
    changed = [(a != b).sum() for a, b in zip(previous.phy2log, moved.phy2log)]
    assert all(c <= 2 for c in changed)
    before = evaluate_plan(previous, new).max_mean_load
    assert all(a <= b + 1e-12 for a, b in zip(moved.metrics["max_mean_load"], before))
    assert sum(moved.metrics["max_mean_load"]) < sum(before)  # the new trace is rebalanced somewhat
    none = plan_placement(new, 8, previous=previous, max_moves=0, **kw)
    np.testing.assert_array_equal(none.phy2log, previous.phy2log)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_gpus=4, num_redundant=1), "num_redundant: 8 experts + 1 redundant = 9 slots do not divide"),
    (dict(num_gpus=4, gpus_per_node=3), "gpus_per_node: 3 does not divide num_gpus=4"),
    (dict(num_gpus=0), "num_gpus: must be an integer >= 1"),
    (dict(num_gpus=2, num_redundant=10), "num_redundant: 9 slots per GPU but only 8 experts"),
    (dict(num_gpus=4, method="best"), "method: unknown 'best'"),
    (dict(num_gpus=4, time_limit=0), "time_limit: must be a positive number"),
    (dict(num_gpus=4, max_moves=3), "max_moves: give both"),
])
def test_impossible_requests_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        plan_placement(_trace(2, 8), **kwargs)
    assert str(err.value).startswith(message), str(err.value)


def test_evaluate_rejects_a_trace_of_another_shape():
    plan = plan_placement(_trace(2, 8), 4, method="greedy")
    with pytest.raises(ValueError, match="^trace: shape"):
        evaluate_plan(plan, _trace(3, 8))


def test_expert_default_cap_is_eplbs_balance():
    from tokenloom.placement.eplb import eplb_policy_rows

    trace = _trace(4, 32, top_k=4, num_domains=4)
    kw = dict(gpus_per_node=4, num_redundant=8, time_limit=2.0, token_home="expert")
    plan = plan_placement(trace, 8, **kw)
    strict = plan_placement(trace, 8, max_imbalance=1.0, **kw)  # cap: the balance stage's optimum
    eplb = eplb_policy_rows(trace.loads, plan.problem())[0]
    for l in range(4):
        want = max(strict.solver["traffic"]["cap"][l], _gpu_loads(trace.loads[l], eplb[l], 8).max())
        assert plan.solver["traffic"]["cap"][l] == pytest.approx(want)
        assert _gpu_loads(trace.loads[l], plan.phy2log[l], 8).max() <= want * (1 + 1e-9)
        assert _gpu_loads(trace.loads[l], strict.phy2log[l], 8).max() <= strict.solver["traffic"]["cap"][l] * (1 + 1e-9)
    assert plan.solver["traffic"]["cost"] <= strict.solver["traffic"]["cost"] * 1.05  # the looser cap is used
