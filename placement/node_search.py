"""The ``dp`` search at node level: replica units on nodes and swaps that raise the objective F.

``F = sum_{e<f} C[e, f] * sum_n p_e(n) p_f(n)``: the expected co-activated pairs (``C``, the
layer's co-activation) that land on one node under uniform replica choice (``p_e(n)``: share of
e's replicas on node n). :class:`NodeState` keeps the affinities ``A = C P`` so that the gain of
any swap is O(1) and a whole table of swaps O(U^2); :func:`polish` applies improving swaps under
a cap on every node's load, :func:`repair` moves load off nodes above the cap at the least loss
of F, and :func:`block_descent` combines them with escapes through a briefly loosened cap.
"""

from __future__ import annotations

import time

import numpy as np

from tokenloom.placement.problem import PlacementProblem

_EPS = 1e-9
MAX_SWAP_STEPS = 400


class NodeState:
    """Replica units on nodes: ``expert[u]``, ``node[u]``; ``X`` (E, N) counts, ``A = C P`` affinities."""

    def __init__(self, expert: np.ndarray, node: np.ndarray, coact: np.ndarray, shares: np.ndarray,
                 num_nodes: int, fixed: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.expert, self.node = expert.copy(), node.copy()
        self.coact, self.shares = coact, shares
        self.num_nodes = num_nodes
        self.counts = np.bincount(expert, minlength=coact.shape[0]).astype(np.float64)
        if fixed is None:  # fixed while units keep their experts: the swap pair term, the same-expert mask
            c = self.counts[expert]
            fixed = (2 * coact[expert][:, expert] / np.outer(c, c), expert[:, None] == expert[None, :])
        self.pair, self.same = fixed
        self.refresh()

    def refresh(self) -> None:
        num_experts = self.coact.shape[0]
        self.X = np.zeros((num_experts, self.num_nodes))
        np.add.at(self.X, (self.expert, self.node), 1.0)
        self.A = self.coact @ (self.X / self.counts[:, None])
        self.load = np.bincount(self.node, weights=self.shares[self.expert], minlength=self.num_nodes)

    def clone(self, node: np.ndarray | None = None) -> "NodeState":
        return NodeState(self.expert, self.node if node is None else node, self.coact, self.shares, self.num_nodes,
                         (self.pair, self.same))

    def score(self) -> float:
        P = self.X / self.counts[:, None]
        return 0.5 * float((P * self.A).sum())

    def swap(self, u: int, v: int) -> None:
        eu, ev, a, b = self.expert[u], self.expert[v], self.node[u], self.node[v]
        for e, src, dst in ((eu, a, b), (ev, b, a)):
            self.X[e, src] -= 1
            self.X[e, dst] += 1
            col = self.coact[:, e] / self.counts[e]
            self.A[:, src] -= col
            self.A[:, dst] += col
        self.node[u], self.node[v] = b, a
        moved = self.shares[eu] - self.shares[ev]
        self.load[a] -= moved
        self.load[b] += moved

    def swap_tables(self, units: np.ndarray | None = None):
        """For units ``units`` (rows) x all units: gain in F of swapping, node loads after, legality."""
        eu, nu = self.expert, self.node
        rows = np.arange(eu.shape[0]) if units is None else units
        move = (self.A[eu] - self.A[eu, nu][:, None]) / self.counts[eu][:, None]  # (U, N) gain of moving u to n
        gain = move[rows][:, nu] + move[:, nu[rows]].T
        gain -= self.pair[rows]
        moved = self.shares[eu][None, :] - self.shares[eu[rows]][:, None]  # load gained by row's node
        after_r = self.load[nu[rows]][:, None] + moved
        after_c = self.load[nu][None, :] - moved
        return gain, after_r, after_c

    def legal(self, gpus_per_node: int, units: np.ndarray | None = None) -> np.ndarray:
        eu, nu = self.expert, self.node
        rows = np.arange(eu.shape[0]) if units is None else units
        ok = nu[rows][:, None] != nu[None, :]
        ok &= ~self.same[rows]
        ok &= self.X[eu[rows]][:, nu] < gpus_per_node  # row's expert fits on column's node
        ok &= (self.X[eu][:, nu[rows]] < gpus_per_node).T  # column's expert fits on row's node
        return ok


def row_state(row: np.ndarray, node: np.ndarray, coact: np.ndarray, loads: np.ndarray,
              problem: PlacementProblem) -> NodeState:
    """The :class:`NodeState` of a phy2log ``row`` (num_slots,) whose slot s lives on node ``node[s]``."""
    counts = np.bincount(row, minlength=loads.shape[0])
    return NodeState(row, node, coact, loads / np.maximum(counts, 1), problem.num_nodes)


RELAX_STEPS = (0.05, 0.02)  # temporary slack on the node cap while descending, repaired afterwards


def block_descent(state: NodeState, gpus_per_node: int, node_cap: float, deadline: float) -> NodeState:
    """Swap polish under the node cap, then escapes through a briefly loosened cap and repair.

    A tight cap blocks most single swaps; letting node loads rise a few percent, then swapping
    the overloaded nodes back under the cap at the least loss of F, leaves those local optima.
    Returns the best state found whose nodes all meet ``node_cap``.
    """
    best = _copy(state)
    polish(best, gpus_per_node, node_cap, deadline)
    for slack in RELAX_STEPS:
        if time.perf_counter() > deadline:
            break
        cand = _copy(best)
        polish(cand, gpus_per_node, node_cap * (1 + slack), deadline)
        if not repair(cand, gpus_per_node, node_cap):
            continue
        polish(cand, gpus_per_node, node_cap, deadline)
        if cand.score() > best.score() + _EPS:
            best = cand
    return best


def _copy(state: NodeState) -> NodeState:
    return state.clone()


def repair(state: NodeState, gpus_per_node: int, node_cap: float, max_steps: int = 2000) -> bool:
    """Swap load off nodes above ``node_cap`` at the least loss of F; True when every node fits."""
    limit = node_cap * (1 + _EPS)
    for _ in range(max_steps):
        if state.load.max() <= limit:
            return True
        n = int(np.argmax(state.load))
        rows = np.flatnonzero(state.node == n)
        gain, after_r, after_c = state.swap_tables(rows)
        ok = state.legal(gpus_per_node, rows) & (after_r < state.load[n] * (1 - 1e-12)) & (after_c <= limit)
        if not ok.any():
            return False
        fixed = ok & (after_r <= limit)
        score = np.where(fixed, -gain, np.inf) if fixed.any() else np.where(ok, after_r, np.inf)
        i, v = np.unravel_index(np.argmin(score), score.shape)
        state.swap(int(rows[i]), int(v))
    return bool(state.load.max() <= limit)


def polish(state: NodeState, gpus_per_node: int, node_cap: float, deadline: float) -> None:
    """Improving swaps, every node load <= ``node_cap``, until none improves (or the deadline)."""
    limit = node_cap * (1 + _EPS)
    for step in range(MAX_SWAP_STEPS):
        if step % 4 == 0 and time.perf_counter() > deadline:
            return
        gain, after_r, after_c = state.swap_tables()
        ok = state.legal(gpus_per_node) & (gain > 1e-9) & (after_r <= limit) & (after_c <= limit)
        if not ok.any() or not _batch_swaps(state, np.where(ok, gain, -np.inf), gpus_per_node, limit):
            return


BATCH = 64  # candidate swaps taken from one table, each re-checked against the current state


def _batch_swaps(state: NodeState, gain: np.ndarray, gpus_per_node: int, limit: float) -> int:
    """Apply the table's best swap, then its next best candidates whose gain, recomputed on the
    current state (O(1) each from the updated affinities), is still positive and feasible.

    One table (O(U^2)) thus serves many swaps; every applied swap strictly raises F. Returns
    the number applied.
    """
    flat = np.argsort(-gain, axis=None)[:BATCH]
    done = 0
    for u, v in zip(*np.unravel_index(flat, gain.shape)):
        if not np.isfinite(gain[u, v]):
            break
        u, v = int(u), int(v)
        eu, ev, a, b = state.expert[u], state.expert[v], state.node[u], state.node[v]
        if a == b or state.X[eu, b] >= gpus_per_node or state.X[ev, a] >= gpus_per_node:
            continue
        now = ((state.A[eu, b] - state.A[eu, a]) / state.counts[eu] + (state.A[ev, a] - state.A[ev, b]) / state.counts[ev]
               - state.pair[u, v])
        moved = state.shares[eu] - state.shares[ev]
        if now <= 1e-9 or state.load[a] - moved > limit or state.load[b] + moved > limit:
            continue
        state.swap(u, v)
        done += 1
    return done
