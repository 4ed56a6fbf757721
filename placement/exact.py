"""The exact ``dp`` metric and the swap descent on it.

The metric: expected distinct nodes a token's k experts touch (uniform replica choice), summed
over tokens ``ids`` (T, K): ``sum_t sum_n (1 - prod_{e in t} (1 - P[e, n]))`` with ``P`` (E, N)
each expert's share of replicas per node. It is linear in any one expert's shares
(:func:`exact_affinity`), so node swaps can be ranked by the linearised change and each verified
exactly on the tokens it touches (:func:`exact_polish`, also used with the ``expert`` model's
per-layer metric by chain.py).
"""

from __future__ import annotations

import time

import numpy as np

from tokenloom.placement.dispatch import Layout, node_hits
from tokenloom.placement.node_search import BATCH, NodeState
from tokenloom.placement.problem import PlacementProblem

_EPS = 1e-9


def prod_k(q: np.ndarray) -> np.ndarray:
    """Product over axis 1 of ``q`` (T, K, N) by K vector products (faster than ``prod`` for small K)."""
    out = q[:, 0].copy() if q.shape[1] else np.ones((q.shape[0], q.shape[2]))
    for k in range(1, q.shape[1]):
        out *= q[:, k]
    return out


def excluding(q: np.ndarray) -> np.ndarray:
    """(T, K, N): for every position k, the product of ``q`` over the token's other positions."""
    num_k = q.shape[1]
    out = np.ones_like(q)
    run = np.ones((q.shape[0], q.shape[2]))
    for k in range(1, num_k):  # before k
        run = run * q[:, k - 1]
        out[:, k] = run
    run = np.ones((q.shape[0], q.shape[2]))
    for k in range(num_k - 2, -1, -1):  # after k
        run = run * q[:, k + 1]
        out[:, k] *= run
    return out


def tokens_cost(P: np.ndarray, ids: np.ndarray) -> float:
    """Expected distinct nodes summed over tokens ``ids`` (T, K), ``P`` (E, N) node shares."""
    return float((1.0 - prod_k(1.0 - P[ids])).sum())


def scatter_rows(ids: np.ndarray, values: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, N): ``values`` (T, K, N) summed by expert id ``ids`` (T, K)."""
    flat, values = ids.ravel(), values.reshape(-1, values.shape[2])
    return np.stack([np.bincount(flat, weights=values[:, n], minlength=num_experts) for n in range(values.shape[1])], axis=1)


def exact_affinity(P: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(E, N): ``B[e, n] = sum over tokens t with e of prod_{f in t, f != e} (1 - P[f, n])``.

    The exact metric is linear in one expert's shares: moving a replica of e (c_e replicas) from
    node a to node b changes the expected distinct nodes by ``(B[e, b] - B[e, a]) / c_e``.
    """
    return scatter_rows(ids, excluding(1.0 - P[ids]), P.shape[0])


def tokens_by_expert(ids: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """For every expert, the (sorted) rows of ``ids`` (T, K) routed to it."""
    order = np.argsort(ids.ravel(), kind="stable")
    bounds = np.searchsorted(ids.ravel()[order], np.arange(num_experts + 1))
    token = order // ids.shape[1]
    return [token[bounds[e]:bounds[e + 1]] for e in range(num_experts)]


def exact_polish(state: NodeState, ids: np.ndarray, gpus_per_node: int, node_cap: float, deadline: float,
                 max_rounds: int = 200, affinity=None, cost=None) -> int:
    """Node-level swap descent on an exact per-token metric (default: the dp metric, expected
    distinct nodes of the tokens ``ids``).

    ``affinity(P) -> (E, N)`` gives the metric's exact change per unit share of one expert on a
    node (the metric is linear in any single expert's shares ``P[e]``), ``cost(P, rows) -> float``
    the metric on the token rows ``rows``. Swaps are ranked by the linearised change; up to
    ``BATCH`` candidates per table are each verified exactly on the tokens routed to either
    expert and applied only when the metric drops and both nodes stay within ``node_cap``.
    Returns the number of swaps applied (every one strictly improving).
    """
    affinity = affinity or (lambda P: exact_affinity(P, ids))
    cost = cost or (lambda P, rows: tokens_cost(P, ids[rows]))
    tokens_of = tokens_by_expert(ids, state.coact.shape[0])
    limit = node_cap * (1 + _EPS)
    applied = 0
    for _ in range(max_rounds):
        if time.perf_counter() > deadline:
            break
        table = affinity(state.X / state.counts[:, None])
        eu, nu = state.expert, state.node
        move = (table[eu] - table[eu, nu][:, None]) / state.counts[eu][:, None]  # (U, N) change moving u to n
        delta = move[:, nu] + move[:, nu].T
        moved = state.shares[eu][None, :] - state.shares[eu][:, None]
        ok = state.legal(gpus_per_node) & (delta < -1e-6)
        ok &= (state.load[nu][:, None] + moved <= limit) & (state.load[nu][None, :] - moved <= limit)
        if not ok.any():
            break
        delta = np.where(ok, delta, np.inf)
        done = 0
        for u, v in zip(*np.unravel_index(np.argsort(delta, axis=None)[:BATCH], delta.shape)):
            if not np.isfinite(delta[u, v]):
                break
            u, v = int(u), int(v)
            e, f, a, b = state.expert[u], state.expert[v], state.node[u], state.node[v]
            m = state.shares[e] - state.shares[f]
            if (a == b or state.X[e, b] >= gpus_per_node or state.X[f, a] >= gpus_per_node
                    or state.load[a] - m > limit or state.load[b] + m > limit):
                continue
            rows = np.union1d(tokens_of[e], tokens_of[f])
            before = cost(state.X / state.counts[:, None], rows)
            state.swap(u, v)
            if cost(state.X / state.counts[:, None], rows) < before - 1e-9:
                done += 1
            else:
                state.swap(u, v)
        applied += done
        if not done:
            break
    return applied


def exact_cost(row: np.ndarray, ids: np.ndarray, problem: PlacementProblem) -> float:
    """Expected distinct nodes summed over the tokens (uniform replica choice): the exact dp metric."""
    layout = Layout.from_row(row, int(max(row.max(), ids.max())) + 1, problem.num_gpus, problem.gpus_per_node)
    return float(node_hits(ids, layout, "uniform")[0].sum())
