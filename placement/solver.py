"""Running a PuLP model: HiGHS in-process (highspy) first, CBC as the fallback; honest status.

PuLP's ``LpStatus`` reads "Optimal" even when a time limit stopped the search (REFERENCE.md §5),
so the status recorded here comes from ``prob.sol_status``: ``optimal`` only when the solver
proved it, ``feasible`` when it stopped early with an incumbent, ``no_solution`` otherwise.

``pulp.HiGHS`` takes no warm start, so :class:`_WarmHiGHS` hands the variables' initial values
to ``Highs.setSolution`` right before the run; HiGHS then starts from that incumbent.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pulp

OPTIMAL = "optimal"
FEASIBLE = "feasible"
NO_SOLUTION = "no_solution"


@dataclass(frozen=True)
class SolveResult:
    """Outcome of one MILP: status, wall seconds, relative gap, best bound (None where unknown)."""

    status: str
    seconds: float
    gap: float | None
    bound: float | None
    solver: str


class _WarmHiGHS(pulp.HiGHS):  # type: ignore[misc, valid-type]
    """``pulp.HiGHS`` plus a MIP start taken from ``var.varValue`` (set by ``setInitialValue``)."""

    def callSolver(self, lp: pulp.LpProblem) -> None:
        start = [(v.index, v.varValue) for v in lp.variables() if v.varValue is not None]
        if start:
            index, value = zip(*start)
            lp.solverModel.setSolution(len(index), list(index), list(value))
        super().callSolver(lp)


_BANNER_SILENCED = False


def binary_matrix(prob: pulp.LpProblem, rows: int, cols: int) -> list[list[pulp.LpVariable]]:
    """``x[e][g]`` binaries owned by ``prob`` (PuLP 4's way; the bare constructor is deprecated)."""
    return [[prob.add_variable(f"x_{e}_{g}", cat=pulp.LpBinary) for g in range(cols)] for e in range(rows)]


def read_binary_matrix(x: list[list[pulp.LpVariable]]) -> "np.ndarray":
    """The 0/1 values of ``x`` after a solve (unset variables read as 0)."""
    return np.array([[(v.varValue or 0.0) > 0.5 for v in row] for row in x], dtype=np.int64)


def highs_available() -> bool:
    """True when highspy imports; silences HiGHS's one-time banner, which it prints on fd 1."""
    global _BANNER_SILENCED
    if not pulp.HiGHS().available():
        return False
    if not _BANNER_SILENCED:  # --json must print exactly one object on stdout
        import highspy

        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        _BANNER_SILENCED = True
    return True


def solve(prob: pulp.LpProblem, time_limit: float, gap_rel: float = 1e-4, warm: bool = True) -> SolveResult:
    """Solve ``prob`` (minimisation) within ``time_limit`` seconds; variables keep the solution.

    ``warm``: start from the variables' initial values (a feasible incumbent, so a stopped
    search still returns something at least as good).
    """
    time_limit = max(float(time_limit), 0.01)
    start = time.perf_counter()
    if highs_available():
        solver = _WarmHiGHS(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=1)
        prob.solve(solver)
        info = prob.solverModel.getInfo()
        bound = float(info.mip_dual_bound) if _finite(info.mip_dual_bound) else None
        gap = float(info.mip_gap) if _finite(info.mip_gap) else None
        name = "HiGHS"
    else:  # pragma: no cover - exercised only where highspy is missing
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel, warmStart=warm)
        prob.solve(solver)
        bound, gap, name = None, None, "CBC"
    seconds = time.perf_counter() - start
    status = _status(prob)
    if status == OPTIMAL:
        gap = 0.0 if gap is None or gap < gap_rel else gap
    return SolveResult(status=status, seconds=seconds, gap=gap, bound=bound, solver=name)


def _status(prob: pulp.LpProblem) -> str:
    if prob.sol_status == pulp.LpSolutionOptimal:
        return OPTIMAL
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return FEASIBLE
    return NO_SOLUTION


def _finite(value: float) -> bool:
    return value is not None and abs(float(value)) < 1e29


def worst_status(statuses: list[str]) -> str:
    """The overall status of many solves: optimal only if every one is."""
    for status in (NO_SOLUTION, FEASIBLE):
        if status in statuses:
            return status
    return OPTIMAL
