"""GPU-level swap search on one layer under a cap on every GPU's load.

A layer's replicas sit in (G, S) slots; :class:`GpuSwaps` tabulates the change of a linear cost
``cost[e, g]`` (per replica of e on GPU g) for every pair of slots at once, and either descends
(best improving swaps on disjoint GPUs, loads within the cap) or repairs (moves load off GPUs
above the cap at the least cost increase). :func:`relaxed_descent` adds escapes through a
briefly loosened cap. Used by the ``expert`` model's traffic stage (affinity.py, cost = tokens
over slow links) and by the ``dp`` model's GPU repair (gpu_pack.py, cost = lost co-activation).
"""

from __future__ import annotations

import numpy as np

RELAX_STEPS = (0.04, 0.015)  # temporary slack on the cap while descending, repaired afterwards


def relaxed_descent(held: np.ndarray, cost: np.ndarray, shares: np.ndarray, cap: float, slots_per_gpu: int) -> np.ndarray:
    """Swap descent under the cap, plus tries that descend under a looser cap and then repair.

    A tight cap blocks most single swaps; letting loads rise a few percent, then swapping the
    overloaded GPUs back under the cap at the least traffic cost, escapes those local minima.
    Returns the cheapest (E, G) placement found that meets ``cap``.
    """
    best = GpuSwaps(held, shares, slots_per_gpu).descend(cost, cap)
    best_cost = float((best * cost).sum())
    for slack in RELAX_STEPS:
        swaps = GpuSwaps(best, shares, slots_per_gpu)
        swaps.descend(cost, cap * (1 + slack))
        if not swaps.repair(cost, cap):
            continue
        cand = swaps.descend(cost, cap)
        if float((cand * cost).sum()) < best_cost - 1e-9:
            best, best_cost = cand, float((cand * cost).sum())
    return best


class GpuSwaps:
    """One layer's replicas as (G, S) slots; pairwise swaps evaluated for all slot pairs at once."""

    def __init__(self, held: np.ndarray, shares: np.ndarray, slots_per_gpu: int) -> None:
        num_gpus = held.shape[1]
        self.experts = np.stack([np.flatnonzero(held[:, g]) for g in range(num_gpus)])
        self.held = held.astype(bool).copy()
        self.shares = shares
        self.gpu_of = np.repeat(np.arange(num_gpus), slots_per_gpu)

    def placement(self) -> np.ndarray:
        return self.held.astype(np.int64)

    def gpu_load(self) -> np.ndarray:
        return self.shares[self.experts].sum(axis=1)

    def _tables(self, cost: np.ndarray, rows: np.ndarray | None = None):
        """For slots s in ``rows`` (default all) and every slot t: the cost change of swapping them
        (delta[s, t]), the loads of s's and t's GPUs afterwards, and whether the swap is legal."""
        ex, gpu_of = self.experts.ravel(), self.gpu_of
        sub = np.arange(ex.shape[0]) if rows is None else rows
        sh = self.shares[ex]
        gpu_load = self.gpu_load()
        own = cost[ex, gpu_of]
        delta = cost[ex[sub][:, None], gpu_of[None, :]] + cost[ex[None, :], gpu_of[sub][:, None]]
        delta -= own[sub][:, None] + own[None, :]
        moved = sh[None, :] - sh[sub][:, None]  # load gained by s's GPU
        after_s = gpu_load[gpu_of[sub]][:, None] + moved
        after_t = gpu_load[gpu_of][None, :] - moved
        legal = gpu_of[sub][:, None] != gpu_of[None, :]
        legal &= ~self.held[ex[sub][:, None], gpu_of[None, :]] & ~self.held[ex[None, :], gpu_of[sub][:, None]]
        return delta, after_s, after_t, legal

    def _swap(self, s: int, t: int) -> None:
        g, h = self.gpu_of[s], self.gpu_of[t]
        a, b = self.experts.flat[s], self.experts.flat[t]
        self.held[a, g], self.held[b, h], self.held[a, h], self.held[b, g] = False, False, True, True
        self.experts.flat[s], self.experts.flat[t] = b, a

    def descend(self, cost: np.ndarray, cap: float, max_rounds: int = 200) -> np.ndarray:
        """Apply the best improving swaps on disjoint GPUs, round after round, loads <= cap."""
        limit = cap * (1 + 1e-9)
        num_slots = self.gpu_of.shape[0]
        for _ in range(max_rounds):
            delta, after_s, after_t, legal = self._tables(cost)
            ok = legal & (delta < -1e-9) & (after_s <= limit) & (after_t <= limit)
            ok &= self.gpu_of[:, None] < self.gpu_of[None, :]
            cand = np.flatnonzero(ok)
            if cand.size == 0:
                break
            if cand.size > 8 * self.held.shape[1]:  # only the best few can land on disjoint GPUs
                cand = cand[np.argpartition(delta.ravel()[cand], 8 * self.held.shape[1])[: 8 * self.held.shape[1]]]
            used = np.zeros(self.held.shape[1], dtype=bool)
            for flat in cand[np.argsort(delta.ravel()[cand], kind="stable")]:
                s, t = divmod(int(flat), num_slots)
                g, h = self.gpu_of[s], self.gpu_of[t]
                if not (used[g] or used[h]):
                    used[g] = used[h] = True
                    self._swap(s, t)
        return self.placement()

    def repair(self, cost: np.ndarray, cap: float, max_steps: int = 500) -> bool:
        """Swap load off GPUs above ``cap`` at the least cost increase; True when all fit."""
        limit = cap * (1 + 1e-9)
        for _ in range(max_steps):
            gpu_load = self.gpu_load()
            if gpu_load.max() <= limit:
                return True
            g = int(np.argmax(gpu_load))
            rows = np.flatnonzero(self.gpu_of == g)
            delta, after_s, after_t, legal = self._tables(cost, rows)
            ok = legal & (after_s < gpu_load[g] * (1 - 1e-12)) & (after_t <= limit)
            if not ok.any():
                return False
            fixed = ok & (after_s <= limit)
            score = np.where(fixed, delta, np.inf) if fixed.any() else np.where(ok, after_s, np.inf)
            i, t = np.unravel_index(np.argmin(score), score.shape)
            self._swap(int(rows[i]), int(t))
        return bool(self.gpu_load().max() <= limit)
