"""Schedules: the symbolic checker proves every builder output, and catches broken schedules."""

import dataclasses
import itertools

import pytest

from tokenloom.comm.topology import (
    causal_pair_kind,
    chunk_len,
    chunks_of_rank,
    global_chunk_order,
    owner_of_chunk,
    ring_peer,
)
from tokenloom.parallel.builders import STRATEGIES, build_schedule
from tokenloom.parallel.check import ScheduleError, check_schedule
from tokenloom.parallel.schedule import Recv, Send, Step


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_schedule_checks(strategy):
    for n, layout, causal, backward in itertools.product(range(1, 9), ("contiguous", "zigzag"),
                                                         (False, True), (False, True)):
        heads = 8 * 7 * 5 * 3  # divisible by every world size 1..8 (Ulysses)
        check_schedule(build_schedule(strategy, n, layout=layout, causal=causal, backward=backward,
                                      num_heads=heads, num_kv_heads=heads // 8))


def test_rank_math():
    assert chunks_of_rank(1, 4, "zigzag") == (1, 6)
    assert chunks_of_rank(2, 4, "contiguous") == (2,)
    for n, layout in itertools.product(range(1, 7), ("zigzag", "contiguous")):
        order = global_chunk_order(n, layout)
        seen = [chunks_of_rank(r, n, layout)[i] for r, i in order]
        assert seen == list(range(len(order)))
        for c in range(len(order)):
            assert c in chunks_of_rank(owner_of_chunk(c, n, layout), n, layout)
    assert ring_peer(0, 5, -1) == 4 and ring_peer(4, 5, 1) == 0
    assert [causal_pair_kind(2, k) for k in (1, 2, 3)] == ["full", "diag", "none"]
    with pytest.raises(ValueError, match="multiple of 2 \\* world_size=6"):
        chunk_len(10, 3, "zigzag")


def _traffic(strategy, n, causal, layout, backward=False):
    """Chunks sent per rank, by buffer kind."""
    sched = build_schedule(strategy, n, layout=layout, causal=causal, backward=backward)
    sent = {}
    for steps in sched.ranks:
        for step in steps:
            for op in step.comms:
                if isinstance(op, Send):
                    sent[op.buf.kind] = sent.get(op.buf.kind, 0) + len(op.buf.chunks)
    return sent


def test_tokenring_traffic_matches_the_paper():
    """Non-causal: every rank forwards its full query N-1 times and each other rank returns one
    partial. Causal zigzag: the query travels whole until it wraps past half, then only its late
    chunk (REFERENCE.md §2), so TokenRing sends fewer query chunks than the non-causal case."""
    n = 4
    full = _traffic("tokenring", n, False, "contiguous")
    assert full == {"q": n * (n - 1), "out": n * (n - 1)}
    zz = _traffic("tokenring", n, True, "zigzag")
    assert zz["q"] < 2 * n * (n - 1) and zz["out"] < 2 * n * (n - 1)
    # queries move one hop to r-1; the partial computed at step t-1 goes straight back to its
    # owner at distance t-1 the other way, in flight during the same step
    sched = build_schedule("tokenring", n, layout="zigzag", causal=True)
    both = 0
    for r, steps in enumerate(sched.ranks):
        for t, step in enumerate(steps):
            kinds = set()
            for op in step.comms:
                if isinstance(op, Send) and op.buf.kind == "q":
                    assert op.peer == (r - 1) % n
                elif isinstance(op, Send):
                    assert op.buf.kind == "out" and op.peer == op.buf.owner == (r + t - 1) % n
                kinds.add(op.buf.kind if isinstance(op, Send) else None)
            both += {"q", "out"} <= kinds
    assert both >= n  # steps where both directions carry traffic at once


def test_describe_is_compact_and_marks_a_step():
    sched = build_schedule("tokenring", 2, layout="zigzag", causal=True)
    text = sched.describe(mark=(1, 1))
    assert text.splitlines()[0] == "tokenring fwd layout=zigzag causal=True world_size=2"
    assert "  r1 s1:" in text and text.count("<-- here") == 1
    assert len(text.splitlines()) == 1 + 2 * sched.num_steps


def _mutate(sched, rank, step, **changes):
    ranks = [list(steps) for steps in sched.ranks]
    ranks[rank][step] = dataclasses.replace(ranks[rank][step], **changes)
    return dataclasses.replace(sched, ranks=tuple(tuple(s) for s in ranks))


def test_checker_catches_a_missing_receive():
    sched = build_schedule("tokenring", 3, layout="zigzag", causal=True)
    step = sched.ranks[1][0]
    comms = tuple(op for op in step.comms if not isinstance(op, Recv))
    assert len(comms) < len(step.comms)
    with pytest.raises(ScheduleError, match="(no matching|expects)"):
        check_schedule(_mutate(sched, 1, 0, comms=comms))


def test_checker_catches_a_size_mismatch():
    sched = build_schedule("ring", 3, layout="zigzag", causal=False)
    step = sched.ranks[0][0]
    comms = tuple(Recv(op.peer, op.buf.sub(op.buf.chunks[:1]), op.channel) if isinstance(op, Recv)
                  else op for op in step.comms)
    with pytest.raises(ScheduleError, match="expects"):
        check_schedule(_mutate(sched, 0, 0, comms=comms))


def test_checker_catches_missing_and_duplicated_compute():
    sched = build_schedule("ring", 2, layout="contiguous", causal=False)
    with pytest.raises(ScheduleError):
        check_schedule(_mutate(sched, 0, 1, computes=()))
    doubled = sched.ranks[0][0].computes * 2
    with pytest.raises(ScheduleError):
        check_schedule(_mutate(sched, 0, 0, computes=doubled))


def test_checker_catches_a_deadlock():
    """Rank 0 receives at step 0 what rank 1 only sends at its step 1, while rank 1's step 0
    waits for a message rank 0 sends only at step 1: a cycle."""
    sched = build_schedule("ring", 2, layout="contiguous", causal=False)
    s0, s1 = sched.ranks[0], sched.ranks[1]
    swapped = dataclasses.replace(sched, ranks=(
        (Step(s0[0].comms, s0[0].computes), Step((), s0[1].computes, s0[1].merges)) + s0[2:],
        (Step((), s1[0].computes), Step(s1[0].comms, s1[1].computes, s1[1].merges)) + s1[2:]))
    with pytest.raises(ScheduleError):
        check_schedule(swapped)


def test_ulysses_heads_must_divide():
    with pytest.raises(ValueError, match="heads \\(6\\) divisible by world_size \\(4\\)"):
        build_schedule("ulysses", 4, num_heads=6, num_kv_heads=6)


def test_ring_backward_accumulator_carries_only_what_others_touch():
    """Each rank's own dk/dv stays home; the travelling accumulator starts at the next holder, so
    non-causal Ring backward sends as many dk/dv chunks as K/V chunks (n-1 per rank), and causal
    zigzag sends fewer dk/dv chunks than K/V chunks."""
    for n in (2, 3, 4, 8):
        full = _traffic("ring", n, False, "contiguous", backward=True)
        assert full == {"kv": n * (n - 1), "dkv": n * (n - 1)}
        zz = _traffic("ring", n, True, "zigzag", backward=True)
        assert zz["dkv"] <= zz["kv"]


def test_block_prints_unambiguously_above_nine_chunks():
    from tokenloom.parallel.schedule import Block

    assert str(Block((1, 12), (10, 11, 12), True)) == "1,12x10-12c"
    assert str(Block((11,), (2,), False)) != str(Block((1,), (12,), False))
    assert str(Block(tuple(range(16)), (3, 4, 9), True)) == "0-15x3,4,9c"


def test_kinds_and_directions_are_enums_equal_to_their_names():
    from tokenloom.parallel.schedule import AllToAll, Buf, Direction, Kind

    buf = Buf("q", 0, (0,))
    assert buf.kind is Kind.Q and buf.kind == "q" and str(buf) == "q0[0]"
    op = AllToAll("kv", "seq2head", 2)
    assert op.direction is Direction.SEQ2HEAD and str(op) == "a2a:kv:seq2head"
    with pytest.raises(ValueError):
        AllToAll("kv", "sideways")


def test_checker_derives_the_mask_itself():
    """A dense causal schedule relabelled as packed one-token documents computes cross-document
    pairs: the checker, which derives the needed pairs from token positions, refuses it."""
    from tokenloom.parallel.layout import SeqLayout

    sched = build_schedule("ring", 2, layout="zigzag", causal=True)
    relabelled = dataclasses.replace(sched, seq=SeqLayout(2, "zigzag", 1, (1, 1, 1, 1)))
    with pytest.raises(ScheduleError, match="unneeded pairs"):
        check_schedule(relabelled)


def test_one_p2p_rule_for_checker_engine_and_runtime():
    from tokenloom.parallel.schedule import match_p2p

    sched = build_schedule("tokenring", 4, layout="zigzag", causal=True, backward=True)
    matches, problems = match_p2p(sched)
    assert not problems and matches
    for m in matches:  # the k-th send a->b meets the k-th receive at b from a, same buffer
        assert m.send.buf == m.recv.buf and m.send.peer == m.recv_at[0] and m.recv.peer == m.send_at[0]
    step = sched.ranks[1][0]
    broken = _mutate(sched, 1, 0, comms=tuple(op for op in step.comms if not isinstance(op, Send)))
    assert any(p.kind == "unmatched" for p in match_p2p(broken)[1])


def test_a_runtime_failure_marks_the_step_without_add_note(monkeypatch):
    import torch

    import tokenloom.parallel.runtime as rt
    from tokenloom.parallel import token_ring_attention

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(rt, "block_forward", boom)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match=r"(?s)kernel exploded.*rank 0 failed in step 0.*<-- here"):
        token_ring_attention(q, q, q, causal=True)


def test_no_python_311_only_api_anywhere():
    """pyproject says Python >= 3.10: no add_note, tomllib, ExceptionGroup, except*, typing.Self."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    bad = []
    folders = ("comm", "parallel", "kernels", "placement", "simulator", "tokenloom", "tests", "benchmarks",
               "examples")
    for path in (p for folder in folders for p in (root / folder).glob("**/*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "add_note":
                bad.append(f"{path.name}:{node.lineno} add_note")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                mod = getattr(node, "module", None) or ""
                if "tomllib" in names or mod == "tomllib" or (mod == "typing" and "Self" in names):
                    bad.append(f"{path.name}:{node.lineno} {mod or names}")
            elif isinstance(node, ast.Name) and node.id in ("ExceptionGroup", "BaseExceptionGroup"):
                bad.append(f"{path.name}:{node.lineno} {node.id}")
            elif type(node).__name__ == "TryStar":
                bad.append(f"{path.name}:{node.lineno} except*")
    assert not bad, bad
