"""The ``dp`` planner: put experts chosen together in one layer on one node (DeepEP node dedup).

Per layer (layers are independent when tokens return to their DP rank):

Objective (maximised): ``F = sum_{e<f} C[e, f] * sum_n p_e(n) p_f(n)`` with ``C`` the layer's
co-activation (tokens routed to both e and f) and ``p_e(n)`` the share of e's replicas on node n:
the expected co-activated pairs that land on one node under uniform replica choice. It is the
pairwise part of the exact metric (expected distinct nodes per token), cheap to update, and works
on aggregated traces that carry only ``C``; the plan is scored afterwards with the exact metric.

Search (node level, then GPUs), from each start row: the balanced greedy packing; with the
model's routing groups, whole groups on nodes paired by how tokens choose them
(:func:`group_start`); EPLB's hierarchical layout. A start above the node cap is repaired first.

1. swap polish: the gains of all replica swaps between two nodes are tabulated at once; the best
   and then up to ``BATCH`` next candidates are applied, each re-checked on the current state
   (gain recomputed exactly in O(1) from the updated affinities, node loads within the cap
   ``cap * gpus_per_node``), until no swap improves;
2. escapes: polish under a cap loosened by a few percent, then least-cost repair (swap load off
   the nodes above the cap at the least loss of F) and polish again; kept when F improves;
3. GPU packing inside each node (largest first, then swaps), and a GPU-level least-cost repair
   if a GPU is still above ``cap``. If that fails the start row (which meets the cap) is kept.
4. choice: with the layer's raw ids, the result with the fewest expected distinct nodes on the
   planning tokens (the exact metric) among all starts' results and the first start; else the
   highest F.
5. exact polish (raw ids; :func:`exact_polish`), with the rest of the layer's time (the F search
   gets ``F_SHARE`` of it): node swaps ranked by the linearised exact metric, each verified
   exactly on the tokens it touches, then GPU packing; kept only when the exact metric drops.

Assignment rounds (every replica re-placed at once by ``linear_sum_assignment`` on the
linearised affinities, then repaired) were tried first: on the DeepSeek-V3-shaped router trace
they cost most of the time and ended in worse local optima than swaps alone (held-out messages
4.62 vs 4.59 per token at 5 s per layer), so the dp search does not use them.

Replicas: counts follow EPLB's rule (each redundant slot to the largest share); *where* each
replica goes is decided by the objective, at most one per GPU and ``gpus_per_node`` per node.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from tokenloom.placement.balance import assignment_matrix, improve_by_swaps
from tokenloom.placement.packing import SlotBins, pack_balanced
from tokenloom.placement.problem import PlacementProblem

_EPS = 1e-9
MAX_SWAP_STEPS = 400
F_SHARE = 0.6  # of a layer's time for the F search when raw ids allow the exact polish afterwards
PACK_SHARE = 0.2  # of the time left after the F search, kept for packing the polished nodes onto GPUs


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, E) float64: tokens routed to both e and f in one layer (ids (T, K)); zero diagonal."""
    pairs = (ids[:, :, None] * num_experts + ids[:, None, :]).ravel()
    out = np.bincount(pairs, minlength=num_experts * num_experts).astype(np.float64).reshape(num_experts, num_experts)
    np.fill_diagonal(out, 0.0)
    return out


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


def pack_gpus(state: NodeState, problem: PlacementProblem) -> np.ndarray:
    """(num_slots,) phy2log row: each node's replicas packed onto its GPUs, largest first, then swaps."""
    gpn, spg = problem.gpus_per_node, problem.slots_per_gpu
    num_experts = state.coact.shape[0]
    row = np.empty(problem.num_slots, dtype=np.int64)
    sub = PlacementProblem(1, num_experts, gpn, gpn, spg * gpn - num_experts) if spg * gpn >= num_experts else None
    for n in range(state.num_nodes):
        units = np.flatnonzero(state.node == n)
        bins = SlotBins(gpn, spg, 1, num_experts)
        pack_balanced(state.expert[units], state.shares[state.expert[units]], bins)
        local = np.concatenate([bins.experts(g) for g in range(gpn)]).astype(np.int64)
        if sub is not None:
            local = _swaps_inside(local, state.shares, gpn, spg)
        row[n * gpn * spg:(n + 1) * gpn * spg] = local
    return row


def _swaps_inside(local: np.ndarray, shares: np.ndarray, gpn: int, spg: int) -> np.ndarray:
    """Balance one node's GPUs by swaps (``improve_by_swaps`` on the node's own replica list)."""
    experts = np.unique(local)
    index = np.searchsorted(experts, local)
    counts = np.bincount(index, minlength=experts.shape[0])
    problem = PlacementProblem(1, experts.shape[0], gpn, gpn, local.shape[0] - experts.shape[0])
    better = improve_by_swaps(shares[experts] * counts, index, problem)
    return experts[better]


def gpu_repair(row: np.ndarray, state: NodeState, problem: PlacementProblem, cap: float) -> np.ndarray | None:
    """Move load off GPUs above ``cap`` by GPU-level swaps at the least affinity loss; None if stuck."""
    from tokenloom.placement.affinity import _Swaps

    num_experts = state.coact.shape[0]
    held = assignment_matrix(row, num_experts, problem.num_gpus)
    shares = state.shares
    if (held * shares[:, None]).sum(0).max() <= cap * (1 + _EPS):
        return row
    node_of = np.arange(problem.num_gpus) // problem.gpus_per_node
    cost = -(state.A / state.counts[:, None])[:, node_of]  # (E, G) linearised loss of F
    swaps = _Swaps(held, shares, problem.slots_per_gpu)
    if not swaps.repair(cost, cap):
        return None
    out = swaps.placement()
    return np.concatenate([np.flatnonzero(out[:, g]) for g in range(problem.num_gpus)]).astype(np.int64)


def plan_layer(coact: np.ndarray, loads: np.ndarray, starts: list[np.ndarray], cap: float, problem: PlacementProblem,
               deadline: float, ids: np.ndarray | None = None) -> np.ndarray:
    """One layer's ``dp`` row (num_slots,), from feasible start rows (GPU loads <= ``cap``).

    ``coact`` (E, E) co-activation, ``loads`` (E,). Each start keeps its replica counts; only its
    slot -> node map is used. The result meets ``cap`` on every GPU, has no duplicate on a GPU and
    is never worse in F than the first start (which must itself be a valid row). With the
    layer's raw ``ids`` (T, K), every start is searched and the final choice among the results
    (and the first start) is by the exact metric on those tokens instead of F.
    """
    spn = problem.slots_per_gpu * problem.gpus_per_node
    node = np.arange(problem.num_slots) // spn
    final_deadline = deadline
    if ids is not None:  # the F search from every start, then the exact polish of the best
        now = time.perf_counter()
        deadline = now + F_SHARE * max(0.0, deadline - now)
    best_row, best_score = starts[0], None
    candidates = [starts[0]]
    for i, start_row in enumerate(starts):
        if time.perf_counter() >= deadline:
            break
        start = _row_state(start_row, node, coact, loads, problem)
        if i == 0:
            best_score = start.score()
        if start.X.max() > problem.gpus_per_node:  # e.g. EPLB put more replicas on a node than it has GPUs
            continue
        node_cap = max(cap * problem.gpus_per_node, float(start.load.max()) if i == 0 else 0.0)
        if not repair(start, problem.gpus_per_node, node_cap):  # a structured start may overload a node
            continue
        found = block_descent(start, problem.gpus_per_node, node_cap, deadline)  # later starts get what is left
        if ids is None and found.score() <= best_score + _EPS:
            continue
        row = gpu_repair(pack_gpus(found, problem), found, problem, cap)
        if row is None:
            continue
        if ids is None:
            best_row, best_score = row, found.score()
        else:
            candidates.append(row)
    if ids is not None:
        costs = [_exact_cost(row, ids, problem) for row in candidates]
        best_row = candidates[int(np.argmin(costs))]  # ties: the earlier candidate
        now = time.perf_counter()  # keep a share of what is left for the GPU packing after the polish
        polish_deadline = now + (1 - PACK_SHARE) * max(0.0, final_deadline - now)
        best_row = exact_polish_row(best_row, min(costs), ids, coact, loads, cap, problem, polish_deadline)
    return best_row


def exact_polish_row(row: np.ndarray, cost: float, ids: np.ndarray, coact: np.ndarray, loads: np.ndarray, cap: float,
                     problem: PlacementProblem, deadline: float) -> np.ndarray:
    """``row`` polished by node-level swaps on the exact metric (expected distinct nodes of the
    planning tokens ``ids``), then re-packed onto GPUs under ``cap``; ``row`` itself (exact cost
    ``cost``) when that is not better."""
    spn = problem.slots_per_gpu * problem.gpus_per_node
    state = _row_state(row, np.arange(problem.num_slots) // spn, coact, loads, problem)
    node_cap = max(cap * problem.gpus_per_node, float(state.load.max()))
    if not exact_polish(state, ids, problem.gpus_per_node, node_cap, deadline):
        return row
    new = gpu_repair(pack_gpus(state, problem), state, problem, cap)
    if new is None or _exact_cost(new, ids, problem) >= cost - _EPS:
        return row
    return new


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


def _tokens_cost(P: np.ndarray, ids: np.ndarray) -> float:
    """Expected distinct nodes summed over tokens ``ids`` (T, K), ``P`` (E, N) node shares."""
    return float((1.0 - prod_k(1.0 - P[ids])).sum())


def scatter_rows(ids: np.ndarray, values: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, N): ``values`` (T, K, N) summed by expert id ``ids`` (T, K)."""
    flat, values = ids.ravel(), values.reshape(-1, values.shape[2])
    return np.stack([np.bincount(flat, weights=values[:, n], minlength=num_experts) for n in range(values.shape[1])], axis=1)


def _exact_affinity(P: np.ndarray, ids: np.ndarray) -> np.ndarray:
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
    affinity = affinity or (lambda P: _exact_affinity(P, ids))
    cost = cost or (lambda P, rows: _tokens_cost(P, ids[rows]))
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


def _exact_cost(row: np.ndarray, ids: np.ndarray, problem: PlacementProblem) -> float:
    """Expected distinct nodes summed over the tokens (uniform replica choice): the exact dp metric."""
    from tokenloom.placement.dispatch import Layout, node_hits

    layout = Layout.from_row(row, int(max(row.max(), ids.max())) + 1, problem.num_gpus, problem.gpus_per_node)
    return float(node_hits(ids, layout, "uniform")[0].sum())


def _row_state(row, node, coact, loads, problem) -> NodeState:
    counts = np.bincount(row, minlength=loads.shape[0])
    return NodeState(row, node, coact, loads / np.maximum(counts, 1), problem.num_nodes)


def group_start(ids: np.ndarray, counts: np.ndarray, num_groups: int | None, problem: PlacementProblem) -> np.ndarray | None:
    """A start row with whole routing groups on nodes, paired by how tokens choose them.

    Group-limited routing (DeepSeek-V3: a token keeps 4 of 8 contiguous expert groups) makes the
    *groups* a token uses co-occur. EPLB's hierarchical policy pairs groups on nodes by load;
    here the group -> node map is a local search (swap two groups between nodes) on the exact
    number of distinct nodes the planning tokens touch, from the contiguous map. Replicas go
    beside their primary while the node has room. Only the slot -> node map of the result is
    meaningful (the caller re-packs GPUs); the caller repairs node loads. None when the groups
    do not split evenly over more than one group per node.
    """
    num_experts, num_nodes = counts.shape[0], problem.num_nodes
    if not num_groups or num_experts % num_groups or num_groups % num_nodes or num_groups == num_nodes:
        return None
    group_tokens = ids // (num_experts // num_groups)  # (T, K) group of each routed expert
    assign = np.arange(num_groups) // (num_groups // num_nodes)

    def touched(a: np.ndarray) -> int:
        nodes = np.sort(a[group_tokens], axis=1)
        return int((np.diff(nodes, axis=1) != 0).sum())

    best = touched(assign)
    improved = True
    while improved:
        improved = False
        for g, h in itertools.combinations(range(num_groups), 2):
            if assign[g] == assign[h]:
                continue
            assign[g], assign[h] = assign[h], assign[g]
            value = touched(assign)
            if value < best:
                best, improved = value, True
            else:
                assign[g], assign[h] = assign[h], assign[g]
    return _row_from_nodes(assign[np.arange(num_experts) // (num_experts // num_groups)], counts, problem)


def _row_from_nodes(home: np.ndarray, counts: np.ndarray, problem: PlacementProblem) -> np.ndarray | None:
    """Units grouped by node: every expert's primary on ``home[e]``, extra replicas beside it while
    there is room (and at most one per GPU), else on the node with the most free slots."""
    spn, gpn = problem.slots_per_gpu * problem.gpus_per_node, problem.gpus_per_node
    members: list[list[int]] = [[] for _ in range(problem.num_nodes)]
    held = np.zeros((counts.shape[0], problem.num_nodes), dtype=np.int64)
    for e, n in enumerate(home):
        members[n].append(e)
        held[e, n] += 1
    if max(len(m) for m in members) > spn:
        return None
    for e in np.repeat(np.arange(counts.shape[0]), counts - 1):
        room = [spn - len(m) if held[e, n] < gpn else -1 for n, m in enumerate(members)]
        n = int(home[e]) if room[home[e]] > 0 else int(np.argmax(room))
        if room[n] <= 0:
            return None
        members[n].append(int(e))
        held[e, n] += 1
    return np.concatenate([np.array(m, dtype=np.int64) for m in members])
