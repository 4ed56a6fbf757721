"""Masked blocks under a window (issue 18 part 2): partly visible pairs that form one band of
consecutive positions are one kernel call, and only there.

Pure: schedules for every rank in one process, proved by the checker (which counts a masked
block's pairs from token positions itself).
"""

from tokenloom.parallel.blocks import window_blocks
from tokenloom.parallel.builders import build_schedule
from tokenloom.parallel.check import check_schedule
from tokenloom.parallel.layout import SeqLayout
from tokenloom.parallel.schedule import Block, Compute


def _blocks(sched, rank):
    return [b for st in sched.ranks[rank] for op in st.computes if isinstance(op, Compute) for b in op.blocks]


def test_the_middle_rank_of_a_zigzag_ring_runs_its_band_as_one_block():
    for strategy in ("tokenring", "ring"):
        for backward in (False, True):
            sched = build_schedule(strategy, 2, layout="zigzag", causal=True, backward=backward,
                                   window_size=(1024, 0), seq_len=16384)
            check_schedule(sched)
            # rank 1 holds chunks 1, 2 side by side: (1,1), (2,1), (2,2) are one band; (1,2) is hidden
            assert Block((1, 2), (1, 2), False, masked=True) in _blocks(sched, 1)
            assert len(_blocks(sched, 1)) == 2  # the band and the corner (3, 2) or (1, 0)
            assert all(len(b.q_chunks) == 1 for b in _blocks(sched, 0))  # chunks 0 and 3 are apart


def test_pairs_are_not_joined_across_a_gap_a_full_pair_or_another_ops_pair():
    seq = SeqLayout(2, "zigzag", window=(1024, 0), seq_len=16384)
    # chunks 0 and 3 (rank 0): not consecutive, one block per pair
    assert window_blocks([(0, 0), (3, 3)], (0, 3), (0, 3), seq) == (
        Block((0,), (0,), False, masked=True), Block((3,), (3,), False, masked=True))
    assert window_blocks([(1, 1), (2, 1)], (1, 2), (1, 2), seq) == (Block((1, 2), (1,), False, masked=True),)
    # a two-sided window: the rectangle's (1,2) is partly visible but not this op's pair
    both = SeqLayout(2, "zigzag", window=(1024, 1024), seq_len=16384)
    got = window_blocks([(1, 1), (2, 1), (2, 2)], (1, 2), (1, 2), both)
    assert len(got) == 3 and all(len(b.q_chunks) == len(b.kv_chunks) == 1 for b in got)
    # a window that shows (2,1) whole: it is an unmasked block, the diagonals stay apart
    wide = SeqLayout(2, "zigzag", window=(9000, 0), seq_len=16384)
    got = window_blocks([(1, 1), (2, 1), (2, 2)], (1, 2), (1, 2), wide)
    assert Block((2,), (1,), False) in got and sum(b.masked for b in got) == 2


def test_ulysses_runs_the_whole_windowed_sequence_as_one_band():
    sched = build_schedule("ulysses", 4, layout="zigzag", causal=True, num_heads=8, num_kv_heads=8,
                           window_size=(100, 0), seq_len=4096)
    check_schedule(sched)
    assert _blocks(sched, 0) == [Block(tuple(range(8)), tuple(range(8)), False, masked=True)]


def test_packed_documents_join_per_chunk_run():
    sched = build_schedule("ring", 2, layout="zigzag", causal=True, window_size=(5, 0),
                           doc_lens=(40, 23, 17), backward=True)
    check_schedule(sched)
    assert any(b.masked and len(b.q_chunks) == 2 for b in _blocks(sched, 1))
