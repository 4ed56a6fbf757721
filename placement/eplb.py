"""DeepSeek EPLB, re-implemented in numpy from the published algorithm (deepseek-ai/EPLB, eplb.py).

Used as the baseline the planner must beat, so it follows the published steps exactly, quirks
included (it may put two replicas of one expert on one GPU in the global policy):

- ``replicate``: start with one replica per logical expert; each redundant slot goes to the
  expert with the largest ``load / count`` (ties: the lowest id, as ``torch.max`` returns).
- ``balanced_packing``: items sorted by load, heaviest first (stable), each into the lightest
  pack that still has room (ties: the lowest pack index, as Python's ``min``).
- hierarchical (``num_groups % num_nodes == 0``): pack expert groups onto nodes, replicate inside
  each node, pack each node's replicas onto its GPUs. Global: the same with one group and one node.

``rebalance_experts(weight (L, E), num_replicas, num_groups, num_nodes, num_gpus)`` returns
``phy2log (L, num_replicas)``, ``log2phy (L, E, max_rep)`` (-1 padded) and ``logcnt (L, E)``,
the shapes of the original. :func:`eplb_policy_rows` picks the policy a deployment would run for
a cluster (hierarchical when the model's routing groups are a multiple of the nodes, else global).
"""

from __future__ import annotations

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.placement.problem import PlacementProblem


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """(X, n) weights -> (pack index, rank in pack), each (X, n); n/num_packs items per pack."""
    num_layers, num_items = weight.shape
    per_pack = num_items // num_packs
    assert num_items % num_packs == 0
    if per_pack == 1:
        index = np.broadcast_to(np.arange(num_items), weight.shape).copy()
        return index, np.zeros_like(index)
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    for i in range(num_layers):
        pack_weights = [0.0] * num_packs
        pack_items = [0] * num_packs
        for item in np.argsort(-weight[i], kind="stable"):
            pack = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_weights.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weights[pack] += float(weight[i, item])
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, num_log) -> phy2log (X, num_phy), replica rank (X, num_phy), logcnt (X, num_log)."""
    num_rows, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (num_rows, 1))
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    rows = np.arange(num_rows)
    for i in range(num_log, num_phy):
        idx = np.argmax(weight / logcnt, axis=1)
        phy2log[:, i] = idx
        rank[:, i] = logcnt[rows, idx]
        logcnt[rows, idx] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    """The hierarchical policy; returns (phy2log, phyrank, logcnt)."""
    num_layers, num_log = weight.shape
    assert num_log % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_phy % num_gpus == 0
    group_size, groups_per_node = num_log // num_groups, num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    # step 1: groups -> nodes
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)
    # step 2: replicas inside each node
    mlog_load = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate(mlog_load, num_phy // num_nodes)
    # step 3: each node's replicas -> its GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=-1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    offsets = np.arange(0, num_log, num_log // num_nodes)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + offsets).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=-1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """DeepSeek's entry point: hierarchical when the groups divide the nodes, else global.

    Returns ``phy2log (L, num_replicas)``, ``log2phy (L, E, max_rep)`` (-1 padded), ``logcnt (L, E)``.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_rep = num_replicas - num_log + 1
    log2phy = np.full((num_layers, num_log, max_rep), -1, dtype=np.int64)
    layer = np.repeat(np.arange(num_layers), num_replicas)
    log2phy[layer, phy2log.ravel(), phyrank.ravel()] = np.tile(np.arange(num_replicas), num_layers)
    return phy2log, log2phy, logcnt


def eplb_rows(loads: np.ndarray, num_slots: int, num_gpus: int, gpus_per_node: int, policy: str,
              num_groups: int | None = None) -> np.ndarray:
    """(L, num_slots) phy2log of EPLB's ``hierarchical`` or ``global`` policy on loads (L, E).

    ``num_groups`` for hierarchical defaults to the number of nodes (one contiguous expert group
    per node; DeepSeek-V3 passes its 8 routing groups). It must divide the experts, and the
    nodes must divide it.
    """
    num_nodes = num_gpus // gpus_per_node
    if policy == "global":
        return rebalance_experts(loads, num_slots, 1, 1, num_gpus)[0]
    groups = num_nodes if num_groups is None else num_groups
    if loads.shape[1] % groups or groups % num_nodes:
        raise UsageError(f"num_groups: {groups} groups need to divide {loads.shape[1]} experts and be a multiple of {num_nodes} nodes")
    return rebalance_experts(loads, num_slots, groups, num_nodes, num_gpus)[0]


def eplb_policy_rows(loads: np.ndarray, problem: PlacementProblem, expert_groups: int | None = None) -> tuple[np.ndarray, str]:
    """EPLB's own choice for this shape: hierarchical when its routing groups (default 1: a model
    without group-limited routing) are a multiple of the nodes, else global."""
    groups = 1 if expert_groups is None else expert_groups
    if problem.num_nodes > 1 and problem.num_experts % groups == 0 and groups % problem.num_nodes == 0:
        return eplb_rows(loads, problem.num_slots, problem.num_gpus, problem.gpus_per_node, "hierarchical", groups), "hierarchical"
    return eplb_rows(loads, problem.num_slots, problem.num_gpus, problem.gpus_per_node, "global"), "global"


def check_groups(problem: PlacementProblem, expert_groups: int | None) -> None:
    """The model's routing groups as EPLB takes them: dividing the experts, 1 or a multiple of the nodes."""
    if expert_groups is not None and (problem.num_experts % expert_groups or
                                      (expert_groups > 1 and expert_groups % problem.num_nodes)):
        raise UsageError(f"expert_groups: {expert_groups} must divide num_experts={problem.num_experts} and be 1 or a "
                         f"multiple of the {problem.num_nodes} nodes")
