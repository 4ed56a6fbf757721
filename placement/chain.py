"""The ``expert`` planner's node-level stage (expert_planner.py, stage 3): block-coordinate
descent on the exact message metric.

Execution model (dispatch.py, ``token_home="expert"``): at MoE layer l a token sits on the node
``h`` where layer l-1 combined it (the node of its top-1 replica; uniform before the first
layer), is dispatched to the distinct remote nodes of its k replicas and combined onto the node
of its new top-1 replica from the other distinct nodes. With ``P`` (E, N) the layer's node
shares, ``w`` (N,) the token's home distribution (``P_{l-1}[top1_{l-1}]``), ``q_k = 1 - P[e_k]``:

- dispatch ``D = sum_n (1 - prod_k q_k(n)) (1 - w(n))``
- combine ``Cm = sum_n (1 - prod_{k>=2} q_k(n)) (1 - P[e_1](n))``
- next dispatch ``Nx = sum_h P[e_1](h) R(h)``, ``R(h)`` the remote nodes layer l+1 hits from h.

Layer l's placement enters only D_l, Cm_l and D_{l+1} (through the home it leaves behind), so
with its neighbours fixed the layer's cost is :func:`layer_cost`, exact, and it is linear in any
single expert's shares (:func:`layer_affinity`), which is what the node-level swap descent of
:func:`tokenloom.placement.exact.exact_polish` needs. Each sweep visits every layer with both
neighbours fixed: the layer's replicas are re-placed at node level under the layer's node cap (a
start from ``scipy.optimize.linear_sum_assignment`` on the linearised costs, repaired to the cap,
competes with the current placement; the one with the lower exact cost is polished by exact
swaps), packed onto GPUs under the GPU cap, and kept only when the layer's exact cost drops.
"""

from __future__ import annotations

import time

import numpy as np

from tokenloom.placement.exact import exact_polish, excluding, prod_k, scatter_rows
from tokenloom.placement.gpu_pack import gpu_repair, pack_gpus
from tokenloom.placement.node_search import NodeState, repair
from tokenloom.placement.problem import PlacementProblem

_EPS = 1e-9


def node_shares(row: np.ndarray, num_experts: int, problem: PlacementProblem) -> np.ndarray:
    """(E, N) share of each expert's replicas on each node for one phy2log row."""
    spn = problem.slots_per_gpu * problem.gpus_per_node
    X = np.zeros((num_experts, problem.num_nodes))
    np.add.at(X, (row, np.arange(row.shape[0]) // spn), 1.0)
    return X / np.maximum(X.sum(1, keepdims=True), 1.0)


def layer_context(shares: list[np.ndarray], topk_ids: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(w, R), each (T, N): the tokens' home distribution before ``layer`` and the remote nodes
    the next layer's dispatch hits from each home (zeros after the last layer)."""
    num_layers, num_tokens, _ = topk_ids.shape
    num_nodes = shares[layer].shape[1]
    if layer == 0:
        w = np.full((num_tokens, num_nodes), 1.0 / num_nodes)
    else:
        w = shares[layer - 1][topk_ids[layer - 1][:, 0]]
    if layer == num_layers - 1:
        R = np.zeros((num_tokens, num_nodes))
    else:
        hit = 1.0 - np.prod(1.0 - shares[layer + 1][topk_ids[layer + 1]], axis=1)
        R = hit.sum(1, keepdims=True) - hit
    return w, R


def layer_cost(P: np.ndarray, ids: np.ndarray, w: np.ndarray, R: np.ndarray) -> float:
    """Expected messages the tokens ``ids`` (T, K) cost through this layer's placement ``P``: D + Cm + Nx."""
    q = 1.0 - P[ids]
    first = P[ids[:, 0]]
    rest = prod_k(q[:, 1:])
    dispatch = ((1.0 - rest * q[:, 0]) * (1.0 - w)).sum()
    combine = ((1.0 - rest) * (1.0 - first)).sum()
    return float(dispatch + combine + (first * R).sum())


def layer_affinity(P: np.ndarray, ids: np.ndarray, w: np.ndarray, R: np.ndarray) -> np.ndarray:
    """(E, N) coefficient of ``P[e, n]`` in :func:`layer_cost` with every other expert fixed."""
    q = 1.0 - P[ids]
    coef = excluding(q) * (1.0 - w)[:, None, :]
    rest = q[:, 1:]
    coef[:, 0] += R - (1.0 - prod_k(rest))
    if rest.shape[1]:
        coef[:, 1:] += excluding(rest) * (1.0 - P[ids[:, 0]])[:, None, :]
    return scatter_rows(ids, coef, P.shape[0])


def _assignment_start(state: NodeState, table: np.ndarray, spn: int, gpn: int) -> np.ndarray:
    """Node per unit from the linearised costs ``table`` (E, N): every replica at once onto node
    slots (``linear_sum_assignment``); more than ``gpn`` replicas of one expert on a node are
    moved to the cheapest node with room afterwards."""
    from scipy.optimize import linear_sum_assignment

    num_nodes = table.shape[1]
    cost = (table[state.expert] / state.counts[state.expert][:, None])
    units, slots = linear_sum_assignment(np.repeat(cost, spn, axis=1))
    node = np.empty_like(state.node)
    node[units] = slots // spn
    held = np.zeros((state.counts.shape[0], num_nodes), dtype=np.int64)
    np.add.at(held, (state.expert, node), 1)
    for u in np.flatnonzero(held[state.expert, node] > gpn):
        e = state.expert[u]
        if held[e, node[u]] <= gpn:
            continue
        for v in np.argsort(cost[u]):  # swap with a unit on a node where e has room
            if held[e, v] >= gpn:
                continue
            others = np.flatnonzero((node == v) & (held[state.expert, node[u]] < gpn) & (state.expert != e))
            if others.shape[0]:
                o = others[0]
                held[e, node[u]] -= 1
                held[e, v] += 1
                held[state.expert[o], v] -= 1
                held[state.expert[o], node[u]] += 1
                node[u], node[o] = v, node[u]
                break
    return node


def chain_polish(rows: np.ndarray, topk_ids: np.ndarray, loads: np.ndarray, caps: np.ndarray,
                 problem: PlacementProblem, deadline: float, max_sweeps: int = 4,
                 assignment: bool = True) -> tuple[np.ndarray, dict]:
    """Sweeps of node-level block-coordinate descent on the exact ``expert`` metric.

    ``rows`` (L, num_slots) feasible phy2log rows (layer l's busiest GPU <= ``caps[l]``);
    ``topk_ids`` (L, T, K) the planning tokens. Every layer keeps its replica counts, its cap,
    at most one replica of an expert per GPU, and changes only when its exact cost (its own
    dispatch and combine plus the next layer's dispatch) drops, so the total never rises.
    ``assignment``: also try, per layer, the start from ``linear_sum_assignment`` on the
    linearised costs (repaired to the node cap) beside the current placement.
    Returns (rows, info): sweeps run, layers changed, layers where the assignment start won.
    """
    rows = rows.copy()
    num_layers, num_experts = rows.shape[0], problem.num_experts
    spn, gpn = problem.slots_per_gpu * problem.gpus_per_node, problem.gpus_per_node
    unit_node = np.arange(problem.num_slots) // spn
    zero = np.zeros((num_experts, num_experts))
    shares = [node_shares(rows[l], num_experts, problem) for l in range(num_layers)]
    info = {"sweeps": 0, "layers_changed": 0, "assignment_kept": 0}
    for sweep in range(max_sweeps):
        changed = 0
        order = range(num_layers) if sweep % 2 == 0 else range(num_layers - 1, -1, -1)
        for l in order:
            if time.perf_counter() > deadline:
                break
            ids = topk_ids[l]
            w, R = layer_context(shares, topk_ids, l)
            before = layer_cost(shares[l], ids, w, R)
            affinity = lambda P, ids=ids, w=w, R=R: layer_affinity(P, ids, w, R)  # noqa: E731
            cost = lambda P, sel, ids=ids, w=w, R=R: layer_cost(P, ids[sel], w[sel], R[sel])  # noqa: E731
            counts = np.bincount(rows[l], minlength=num_experts)
            layer_shares = loads[l] / np.maximum(counts, 1)
            state = NodeState(rows[l], unit_node, zero, layer_shares, problem.num_nodes)
            node_cap = max(caps[l] * gpn, float(state.load.max()))
            candidates = [state]
            alt = None if not assignment else state.clone(_assignment_start(state, affinity(state.X / state.counts[:, None]), spn, gpn))
            if alt is not None and repair(alt, gpn, node_cap) and alt.X.max() <= gpn:
                candidates.append(alt)
            best_row, best_cost, from_alt = None, before, False
            if len(candidates) > 1:  # polish only the start with the lower exact cost: more sweeps in the time
                start_costs = [layer_cost(c.X / c.counts[:, None], ids, w, R) for c in candidates]
                candidates = [c if i == int(np.argmin(start_costs)) else None for i, c in enumerate(candidates)]
            for i, cand in enumerate(candidates):
                if cand is None:
                    continue
                exact_polish(cand, ids, gpn, node_cap, deadline, affinity=affinity, cost=cost)
                new = gpu_repair(pack_gpus(cand, problem), cand, problem, caps[l])
                if new is None:
                    continue
                value = layer_cost(node_shares(new, num_experts, problem), ids, w, R)
                if value < best_cost - 1e-9 * max(1.0, abs(best_cost)):
                    best_row, best_cost, from_alt = new, value, i == 1
            if best_row is not None:
                rows[l] = best_row
                shares[l] = node_shares(best_row, num_experts, problem)
                changed += 1
                info["assignment_kept"] += int(from_alt)
        info["sweeps"] = sweep + 1
        info["layers_changed"] += changed
        if not changed or time.perf_counter() > deadline:
            break
    return rows, info
