""""Refused before any work", checked by making the work raise, not by a clock.

:func:`no_work` replaces the first expensive step of every command (after all its checks) with a
function that records the call and raises :class:`WorkStarted`. A refusal that only came after
the work started then fails twice over: the command ends in exit 1 (a bug) instead of 2, and the
record is not empty. A slow machine can no longer fail these tests, and a fast one can no longer
hide work done before the refusal.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

# "module.attribute" of each command's first step of real work; each is looked up at call time
WORK = (
    "tokenloom.simulator.scenario._schedule",  # simulate/advise attention: build the schedule
    "tokenloom.simulator.scenario.compile_ring",  # ... or compile it for the lockstep engine
    "tokenloom.simulator.scenario.simulate",  # ... and price it
    "tokenloom.simulator.scenario.simulate_plan",
    "tokenloom.simulator.tokenweave.plan_split",  # simulate tokenweave: plan the split, walk the steps
    "tokenloom.simulator.tokenweave.walk",
    "tokenloom.commands.simulate_sweep.run_sweep",  # simulate sweep: run the points
    "tokenloom.simulator.calibrate.measure_profile",  # simulate calibrate: measure this machine
    "tokenloom.comm.launch.run_job",  # run JOB, demo: start ranks
    "tokenloom.placement.plan_placement",  # plan: solve the placement
)


class WorkStarted(AssertionError):
    """Work began on input that should have been refused first."""


@contextlib.contextmanager
def no_work(extra: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Inside: every step in :data:`WORK` (and ``extra``) raises; yields the list of steps called."""
    called: list[str] = []

    def forbid(target: str):
        def started(*args, **kwargs):
            called.append(target)
            raise WorkStarted(f"{target} ran before the input was refused")
        return started

    with pytest.MonkeyPatch.context() as mp:
        for target in WORK + tuple(extra):
            mp.setattr(target, forbid(target))
        yield called
