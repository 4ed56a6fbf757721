"""Message metrics against brute-force enumeration over homes and replica choices, and EPLB's published example."""

import itertools

import numpy as np
import pytest

from tokenloom.placement.dispatch import message_metrics
from tokenloom.placement.eplb import rebalance_experts

GPN = 2


def _choices(row, expert, home_gpu, rule, num_gpus):
    """[(gpu, probability)] of the replica serving ``expert`` for a token on ``home_gpu`` (loops only)."""
    spg = len(row) // num_gpus
    slots = [s for s in range(len(row)) if row[s] == expert]
    gpus = [s // spg for s in slots]
    if rule == "local":
        same = [g for g in gpus if g == home_gpu]
        if same:
            return [(home_gpu, 1.0)]
        node = [g for g in gpus if g // GPN == home_gpu // GPN]
        if node:
            return [(g, 1.0 / len(node)) for g in node]
    return [(g, 1.0 / len(gpus)) for g in gpus]


def _brute_dp(rows, ids, num_gpus, rule):
    """Mean over tokens and layers of 2 x E[distinct remote nodes], homes uniform over GPUs; and loads."""
    total, count, balance = 0.0, 0, []
    for l in range(ids.shape[0]):
        gpu_load = np.zeros(num_gpus)
        for t in range(ids.shape[1]):
            for home in range(num_gpus):
                options = [_choices(rows[l], e, home, rule, num_gpus) for e in ids[l, t]]
                for combo in itertools.product(*options):
                    p = np.prod([q for _, q in combo])
                    nodes = {g // GPN for g, _ in combo} - {home // GPN}
                    total += p * 2 * len(nodes) / num_gpus
                    for g, _ in combo:
                        gpu_load[g] += p / num_gpus
            count += 1
        balance.append(gpu_load.max() / gpu_load.mean())
    return total / count, balance


def _brute_expert(rows, ids, num_gpus, rule):
    """Expert model by enumerating the whole chain of replica choices token by token (top-1 carries the token)."""
    num_layers, num_tokens, _ = ids.shape
    total = 0.0
    for t in range(num_tokens):
        # state: distribution over the token's current node (None before the first layer = uniform home GPU)
        states = {("gpu", g): 1.0 / num_gpus for g in range(num_gpus)}
        for l in range(num_layers):
            new_states = {}
            for (kind, where), ps in states.items():
                home_gpu = where if kind == "gpu" else where * GPN  # any GPU of the node: rules use the node only
                opts = [_choices(rows[l], e, home_gpu if kind == "gpu" else -1, rule, num_gpus) if kind == "gpu"
                        else _node_choices(rows[l], e, where, rule, num_gpus) for e in ids[l, t]]
                for combo in itertools.product(*opts):
                    p = ps * np.prod([q for _, q in combo])
                    nodes = [g // GPN for g, _ in combo]
                    src = home_gpu // GPN
                    target = nodes[0]
                    total += p * (len(set(nodes) - {src}) + len(set(nodes[1:]) - {target}))
                    new_states[("node", target)] = new_states.get(("node", target), 0.0) + p
            states = new_states
    return total / (num_tokens * num_layers)


def _node_choices(row, expert, node, rule, num_gpus):
    """Token sits on a node (after a combine): local prefers a replica on that node."""
    spg = len(row) // num_gpus
    gpus = [s // spg for s in range(len(row)) if row[s] == expert]
    if rule == "local":
        near = [g for g in gpus if g // GPN == node]
        if near:
            return [(g, 1.0 / len(near)) for g in near]
    return [(g, 1.0 / len(gpus)) for g in gpus]


def _case(seed, num_layers=2, num_experts=6, num_gpus=4, spg=2, tokens=5, top_k=3):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_layers):
        extra = rng.choice(num_experts, size=num_gpus * spg - num_experts, replace=False)
        row = rng.permutation(np.concatenate([np.arange(num_experts), extra]))
        rows.append(row)
    ids = np.stack([[rng.choice(num_experts, size=top_k, replace=False) for _ in range(tokens)] for _ in range(num_layers)])
    return np.array(rows), ids


@pytest.mark.parametrize("rule", ["uniform", "local"])
@pytest.mark.parametrize("seed", range(3))
def test_dp_messages_and_loads_match_brute_force(rule, seed):
    rows, ids = _case(seed)
    got = message_metrics(rows, ids, 6, 4, GPN, "dp", rule)
    want, balance = _brute_dp(rows, ids, 4, rule)
    assert got.messages_per_token == pytest.approx(want, rel=1e-12)
    assert got.max_mean_load == pytest.approx(balance, rel=1e-12)


@pytest.mark.parametrize("rule", ["uniform", "local"])
@pytest.mark.parametrize("seed", range(3))
def test_expert_messages_match_brute_force(rule, seed):
    rows, ids = _case(seed, num_layers=3, tokens=3)
    got = message_metrics(rows, ids, 6, 4, GPN, "expert", rule)
    assert got.messages_per_token == pytest.approx(_brute_expert(rows, ids, 4, rule), rel=1e-12)


def test_dp_gpu_messages_uniform_brute_force():
    rows, ids = _case(5)
    got = message_metrics(rows, ids, 6, 4, GPN, "dp", "uniform")
    total = 0.0
    for l in range(2):
        for t in range(ids.shape[1]):
            for home in range(4):
                opts = [_choices(rows[l], e, home, "uniform", 4) for e in ids[l, t]]
                for combo in itertools.product(*opts):
                    total += np.prod([q for _, q in combo]) * 2 * len({g for g, _ in combo} - {home}) / 4
    assert got.gpu_messages_per_token == pytest.approx(total / (2 * ids.shape[1]), rel=1e-12)


def test_nic_counts_rail_aligned_sends():
    # 2 nodes x 2 GPUs, one slot each; experts 0,1 on node 0 and 2,3 on node 1; every token uses 0 and 2
    rows = np.array([[0, 1, 2, 3]])
    ids = np.array([[[0, 2]] * 8])
    got = message_metrics(rows, ids, 4, 4, 2, "dp", "uniform")
    assert got.messages_per_token == pytest.approx(2.0)  # one remote node, dispatch + combine
    # per node: 4 homed tokens each send 1 (out) and receive 4 from the other node (in): 8 over 2 NICs
    assert got.busiest_nic == pytest.approx([4.0]) and got.nic_max_mean == pytest.approx([1.0])


def test_eplb_reimplementation_reproduces_the_published_example():
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], dtype=float)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    for l in range(2):
        for e in range(12):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert sorted(phy2log[l, slots].tolist()) == [e] * logcnt[l, e]
