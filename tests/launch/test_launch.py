"""tokenloom.comm.launch.run_job with the local launcher: results, timeouts, and faults named within the bound.

Every fault case runs 4 real forked gloo ranks (the drill job) where rank 2 misbehaves at step 3;
the launcher's JobError must name rank 2 in its first line and in every survivor's own error.
"""

import math
import multiprocessing
import time

import pytest

from tokenloom.common.errors import UsageError
from tokenloom.jobs import drill
from tokenloom.comm.launch import run_job
from tokenloom.comm.launch.summary import JobError
from bounds import DETECTION_SLACK_S, NO_SPIN_S

BOUND = 4.0  # seconds: --timeout for the fault cases


def test_results_come_back_in_rank_order():
    cfg = drill.Drill(steps=4, step_ms=1)
    res = run_job(drill.job, cfg, launcher="local", world_size=3, timeout_s=30)
    assert [r["rank"] for r in res] == [0, 1, 2]
    assert [r["sums"] for r in res] == [drill.expected(cfg, 3, r) for r in range(3)]


def test_timeout_bounds_a_wait_not_the_whole_run():
    cfg = drill.Drill(steps=12, step_ms=150)  # ~1.8 s of healthy work, timeout 1 s
    t0 = time.monotonic()
    res = run_job(drill.job, cfg, launcher="local", world_size=2, timeout_s=1.0)
    assert time.monotonic() - t0 > 1.5
    assert [r["sums"] for r in res] == [drill.expected(cfg, 2, r) for r in range(2)]


@pytest.mark.parametrize("bad", [0, -1, 1e-9, 0.5, math.nan, math.inf, "5", True])
def test_bad_timeout_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="timeout_s"):
        run_job(drill.job, drill.Drill(), launcher="local", world_size=2, timeout_s=bad)


@pytest.mark.parametrize("kwargs,field", [({"world_size": 0}, "world_size"),
                                          ({"launcher": "slurm"}, "launcher"),
                                          ({"backend": "mpi"}, "backend")])
def test_bad_arguments_are_usage_errors(kwargs, field):
    with pytest.raises(UsageError, match=field):
        run_job(drill.job, drill.Drill(), **{"launcher": "local", **kwargs})


@pytest.mark.parametrize("mode,why", [
    ("kill", "SIGKILL|no heartbeat"),
    ("stop", "no heartbeat|not responding"),
    ("raise", "raises at step 3 on purpose"),
    ("skip", "skipped a call"),
])
def test_a_lost_rank_is_named_by_every_survivor_within_the_bound(mode, why):
    cfg = drill.Drill(steps=30, step_ms=5, fail_rank=2, fail_at=3, mode=mode, reap_after_s=60)
    t0 = time.monotonic()
    with pytest.raises(JobError) as info:
        run_job(drill.job, cfg, launcher="local", world_size=4, timeout_s=BOUND)
    elapsed = time.monotonic() - t0
    err = info.value
    head = str(err).splitlines()[0]
    assert err.lost == [2], str(err)
    assert "rank 2" in head and "drill step" in head, head
    assert __import__("re").search(why, str(err)), str(err)
    for r in (0, 1, 3):  # every survivor's own error names the lost rank
        assert "rank 2" in err.lines[r], err.lines
    assert elapsed < BOUND + DETECTION_SLACK_S, elapsed
    assert not multiprocessing.active_children()


def test_a_rank_stuck_outside_any_transfer_is_named_with_its_step():
    cfg = drill.Drill(steps=30, step_ms=5, fail_rank=1, fail_at=2, mode="hang")
    with pytest.raises(JobError) as info:
        run_job(drill.job, cfg, launcher="local", world_size=3, timeout_s=2.0)
    err = info.value
    assert err.lost == [1]
    head = str(err).splitlines()[0]
    assert "rank 1 is alive but has not joined" in head and "last at 'drill step 2'" in head, head
    for r in (0, 2):
        assert "rank 1 is alive" in err.lines[r], err.lines
    assert not multiprocessing.active_children()


def test_every_rank_refusing_the_same_input_is_a_usage_error():
    with pytest.raises(UsageError, match="--fail-rank"):
        run_job(_refuse, None, launcher="local", world_size=2, timeout_s=10)


def _refuse(comm, config):
    raise UsageError("--fail-rank must be below 2")


def _skip_backward(comm, config):
    import torch

    from tokenloom.parallel import sp_attention

    q, k, v = (torch.randn(1, 32, 4, 8, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    for it in range(2):
        out = sp_attention(q, k, v, strategy="tokenring", causal=True)
        if not (comm.rank == 1 and it == 0):  # rank 1 skips its first backward
            out.sum().backward()
    return comm.rank


def test_a_skipped_backward_names_where_each_rank_waits():
    t0 = time.monotonic()
    with pytest.raises(JobError) as info:
        run_job(_skip_backward, None, launcher="local", world_size=2, timeout_s=3.0)
    assert time.monotonic() - t0 < 3.0 + DETECTION_SLACK_S
    text = "\n".join(info.value.lines.values())  # whichever rank timed out first is the head
    assert "did not complete within 3 s" in text and "skipped a call" in text, text
    assert "rank 0" in text and "tokenring backward" in text, text  # where rank 0 waits
    assert "rank 1" in text and "tokenring forward" in text, text  # where rank 1 went on


def test_threads_after_a_multithreaded_op_in_this_process_do_not_hang_the_ranks():
    """GNU OpenMP is not fork-safe: after this process ran a multi-threaded op, forked ranks with
    more than one thread hang on their first op; the launcher falls back to one thread then."""
    import torch

    from tokenloom.comm.launch.local import _fork_safe_threads

    torch.set_num_threads(2)
    a = torch.randn(300, 300)
    _ = a @ a
    assert _fork_safe_threads(2) in (1, 2)  # 1 with GNU OpenMP (the CPU wheel), 2 if fork-safe
    t0 = time.monotonic()
    res = run_job(_matmul_job, None, launcher="local", world_size=1, threads=2, timeout_s=10)
    assert res == [300.0 ** 3] and time.monotonic() - t0 < 2 * NO_SPIN_S


def _matmul_job(comm, config):
    import torch

    a = torch.ones(300, 300)
    return float((a @ a).sum())
