"""The simulator prices windowed schedules (issue 18 part 5): a masked block costs its visible
share, hidden blocks cost nothing (they are not in the schedule), and a short window on a ring
talks only to neighbours while Ulysses pays its all-to-all regardless."""

from tokenloom.parallel import build_schedule
from tokenloom.simulator.cost import AttentionShape, CostModel
from tokenloom.simulator.engine import simulate
from tokenloom.simulator.hardware import make_cluster

SEQ, WINDOW = 131072, 4096


def _run(strategy, layout, window, backward=False):
    cluster = make_cluster("h100-sxm", 8, 1)
    shape = AttentionShape(seq_len=SEQ, num_heads=32, head_dim=128, num_kv_heads=8)
    win = None if window is None else (window, 0)
    sched = build_schedule(strategy, 8, layout=layout, causal=True, backward=backward, num_heads=32,
                           num_kv_heads=8, window_size=win, seq_len=SEQ)
    return simulate(sched, CostModel(shape, cluster, layout, window=win)), sched


def test_window_compute_is_priced_by_its_visible_share():
    full, _ = _run("ring", "contiguous", None)
    windowed, sched = _run("ring", "contiguous", WINDOW)
    # causal work is S^2/2 pairs, windowed about S*W: the compute shrinks by about S/(2W) = 16x
    ratio = full.busy_s.sum() / windowed.busy_s.sum()
    assert 10 < ratio < 20, ratio
    assert sched.num_steps <= 2 and windowed.total_s < full.total_s / 8
    busy = windowed.busy_s
    assert busy.max() / busy.min() < 1.2  # contiguous balances a window (rank 0 holds the short start)


def test_ulysses_pays_its_all_to_all_with_a_window_too():
    ring, _ = _run("ring", "contiguous", WINDOW)
    uly, _ = _run("ulysses", "contiguous", WINDOW)
    # the ring moves one neighbour's K/V once; Ulysses moves q, k, v and out through all-to-alls
    assert uly.comm_s.sum() > ring.comm_s.sum(), (uly.comm_s.sum(), ring.comm_s.sum())
