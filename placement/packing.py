"""Filling bins (GPUs or nodes) with expert replicas under slot and no-duplicate limits.

Every planner ends in the same constraint set: each bin holds exactly ``capacity`` replicas and
at most ``max_same`` replicas of any one expert (1 for a GPU: two replicas of one expert on one
GPU would waste a slot, the bug EPLB has). :class:`SlotBins` places replicas one at a time and,
when the preferred bins are all full or already hold the expert, makes room with one swap
(always possible, see :meth:`SlotBins._make_room`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class SlotBins:
    """Mutable bins of replicas. ``items[b]`` lists (expert, share) pairs in bin ``b``."""

    def __init__(self, num_bins: int, capacity: int, max_same: int, num_experts: int) -> None:
        assert num_bins >= 1 and capacity >= 1 and max_same >= 1
        self.capacity = capacity
        self.max_same = max_same
        self.items: list[list[tuple[int, float]]] = [[] for _ in range(num_bins)]
        self.load = np.zeros(num_bins)
        self.same = np.zeros((num_bins, num_experts), dtype=np.int64)

    @property
    def num_bins(self) -> int:
        return len(self.items)

    def can_take(self, b: int, expert: int) -> bool:
        return len(self.items[b]) < self.capacity and self.same[b, expert] < self.max_same

    def add(self, b: int, expert: int, share: float) -> None:
        assert self.can_take(b, expert)
        self.items[b].append((expert, share))
        self.load[b] += share
        self.same[b, expert] += 1

    def remove(self, b: int, index: int) -> tuple[int, float]:
        expert, share = self.items[b].pop(index)
        self.load[b] -= share
        self.same[b, expert] -= 1
        return expert, share

    def place(self, expert: int, share: float, preference: Iterable[int]) -> int:
        """Put the replica in the first bin of ``preference`` that can take it, else make room."""
        for b in preference:
            if self.can_take(b, expert):
                self.add(b, expert, share)
                return b
        return self._make_room(expert, share)

    def place_lightest(self, expert: int, share: float) -> int:
        """Balanced packing step: the least-loaded bin that can take the replica (ties: fewer items, lower index)."""
        fill = np.array([len(x) for x in self.items])
        order = np.lexsort((np.arange(self.num_bins), fill, self.load))
        return self.place(expert, share, order.tolist())

    def _make_room(self, expert: int, share: float) -> int:
        """Swap a resident replica out of a full bin so the new one fits.

        Every bin with a free slot (``h``) already holds ``max_same`` copies of ``expert``, and
        some full bin ``g`` holds fewer (the expert has at most ``num_bins * max_same`` replicas).
        ``g`` holds more distinct experts than ``h`` can be saturated with, so some resident ``x`` of
        ``g`` fits in ``h``: move it there and put the new replica in ``g``. Among candidates the
        resident with the share closest to the new one keeps the loads nearly unchanged.
        """
        free = [b for b in range(self.num_bins) if len(self.items[b]) < self.capacity]
        assert free, "more replicas than slots"
        best: tuple[float, int, int, int] | None = None
        for g in range(self.num_bins):
            if self.same[g, expert] >= self.max_same:
                continue
            for h in free:
                for index, (resident, resident_share) in enumerate(self.items[g]):
                    if resident != expert and self.same[h, resident] < self.max_same:
                        key = (abs(resident_share - share), g, h, index)
                        best = key if best is None or key < best else best
        assert best is not None, "no swap makes room; the slot/duplicate limits are inconsistent"
        _, g, h, index = best
        resident, resident_share = self.remove(g, index)
        self.add(h, resident, resident_share)
        self.add(g, expert, share)
        return g

    def experts(self, b: int) -> list[int]:
        """Experts in bin ``b``, sorted (a canonical slot order inside a GPU)."""
        return sorted(e for e, _ in self.items[b])


def pack_balanced(experts: np.ndarray, shares: np.ndarray, bins: SlotBins) -> None:
    """Largest share first into the lightest bin that can take it (EPLB's balanced packing)."""
    order = np.lexsort((experts, -shares))
    for i in order:
        bins.place_lightest(int(experts[i]), float(shares[i]))


def expand_replicas(counts: np.ndarray, loads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replica list from per-expert counts: (R,) expert ids and (R,) shares load/count."""
    experts = np.repeat(np.arange(counts.shape[0]), counts)
    shares = (loads / np.maximum(counts, 1))[experts]
    return experts, shares
