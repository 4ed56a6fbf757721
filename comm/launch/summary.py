"""What a launcher says when a job fails: every lost and failed rank, not only the first.

Each rank's outcome is plain data (it crosses process and Ray boundaries); :func:`raise_for`
returns the results when every rank succeeded and otherwise raises :class:`JobError` whose first
line names the lost rank(s), where they were and why, followed by one line per rank and the
traceback of the rank that failed first on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenloom.comm import health
from tokenloom.common.errors import UsageError, one_line


class JobError(RuntimeError):
    """A job failed; ``lost`` are the ranks that died/stopped/failed first, ``lines`` per rank."""

    def __init__(self, message: str, *, lost: list[int], lines: dict[int, str]) -> None:
        super().__init__(message)
        self.lost = lost
        self.lines = lines


@dataclass
class Outcome:
    """One rank's end: ``status`` is "ok" (``value``), "error" (raised) or "lost" (no report)."""

    status: str
    value: Any = None
    line: str = ""
    traceback: str = ""
    usage: bool = False
    caused_by_peer: bool = False
    named: list[int] = field(default_factory=list)  # lost ranks this rank's error names

    @classmethod
    def ok(cls, value: Any) -> "Outcome":
        return cls("ok", value)

    @classmethod
    def lost(cls, why: str) -> "Outcome":
        return cls("lost", line=why)

    @classmethod
    def from_exception(cls, exc: BaseException, tb: str) -> "Outcome":
        peer = isinstance(exc, health.PeerLostError)
        return cls("error", line=f"{type(exc).__name__}: {one_line(exc)}", traceback=tb,
                   usage=isinstance(exc, UsageError), caused_by_peer=peer,
                   named=list(exc.lost) if peer else [])


def raise_for(outcomes: dict[int, Outcome], failure: dict | None, world_size: int) -> list[Any]:
    """The values in rank order, or :class:`JobError` (``UsageError`` if every rank refused the
    same input) naming every lost and failed rank."""
    if all(o.status == "ok" for o in outcomes.values()) and len(outcomes) == world_size:
        return [outcomes[r].value for r in range(world_size)]
    bad = {r: o for r, o in outcomes.items() if o.status != "ok"}
    usage = {o.line for o in bad.values() if o.usage}
    if usage and len(usage) == 1 and all(o.usage for o in bad.values()):
        raise UsageError(next(iter(usage)).split(": ", 1)[1])
    lost = set(failure.get("lost", [])) if failure else set()
    lost |= {r for r, o in bad.items() if o.status == "lost"}
    lost |= {r for r, o in bad.items() if o.status == "error" and not o.caused_by_peer}
    head = health.describe_abort(failure) if failure and failure.get("lost") else ""
    if not head:
        head = ", ".join(f"rank {r}" for r in sorted(lost)) + " failed"
    lines = {r: f"rank {r}: {o.line}" for r, o in sorted(bad.items())}
    first = [o for r, o in sorted(bad.items()) if o.status == "error" and not o.caused_by_peer]
    text = "\n".join([f"job failed on {len(bad)} of {world_size} ranks: {head}",
                      *(f"  {line}" for line in lines.values())])
    if first:
        text += "\n" + first[0].traceback.rstrip()
    raise JobError(text, lost=sorted(lost), lines=lines)
