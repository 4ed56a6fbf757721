"""Name the lost rank when the user made the process group and no tokenloom watchdog runs.

Under tokenloom's launchers every rank heartbeats into the store (:mod:`.health`) and a lost peer
is named from that. A user who calls ``dist.init_process_group`` themselves has no heartbeats, and
gloo's own error says only ``Connection closed by peer [127.0.0.1]:21222`` (a port, not a rank)
or, for a rank that skipped the call, times out after the group's timeout naming nobody.

So when a transfer fails, every rank that sees the failure answers a roll call through the
group's own store (the default group's store: TCPStore under torchrun and ``env://``, or the
FileStore the user gave): it writes its key, then waits a short grace for the others. The ranks
whose keys appear answered (and say which call they are in); the others did not: they exited,
crashed, or are not in a tokenloom call (they skipped it). Nothing of this runs on the hot path:
a healthy call pays nothing (``benchmarks/sp_agree_cost.py`` measures a call's overhead).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch.distributed as dist

GRACE_S = 5.0  # how long a failed rank waits for the other survivors to answer
_PREFIX = "tokenloom/rollcall"
_ROUNDS: dict[tuple[int, str], int] = {}  # (pid, group) -> roll calls answered so far


def _group_name(group: Any) -> str:
    if group is None:
        return "default"
    try:
        return str(dist.distributed_c10d._get_process_group_name(group))
    except Exception:  # noqa: BLE001 -- an older torch: fall back to the members
        return "g" + "-".join(map(str, dist.get_process_group_ranks(group)))


def _store() -> Any | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 -- no default group, or a torch without the helper
        return None


def roll_call(group: Any, members: Sequence[int], what: str, *, grace_s: float = GRACE_S
              ) -> tuple[dict[int, str], list[int], str | None]:
    """Answer and read one roll call: ``(answered {global rank: where}, missing ranks, store_error)``.

    ``members`` are the group's global ranks. Every survivor of one failure uses the same round
    number (its count of roll calls on this group), so their keys meet without a collective.
    """
    rank = dist.get_rank()
    gname = _group_name(group)
    key = (os.getpid(), gname)
    round_no = _ROUNDS.get(key, 0)
    _ROUNDS[key] = round_no + 1
    base = f"{_PREFIX}/{gname}/{round_no}"
    store = _store()
    if store is None:
        return {}, [m for m in members if m != rank], "no store to hold a roll call"
    answered: dict[int, str] = {}
    polled = False
    try:
        store.set(f"{base}/{rank}", what)
        deadline = time.monotonic() + grace_s
        while True:
            for m in members:
                if m not in answered and store.check([f"{base}/{m}"]):
                    answered[m] = store.get(f"{base}/{m}").decode(errors="replace")
            polled = True
            if len(answered) == len(members) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except Exception as exc:  # noqa: BLE001 -- the store's host may be the lost rank
        if not polled:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return {}, [m for m in members if m != rank], f"the group's store is unreachable ({first})"
        # The store's host finished its own roll call and exited: every survivor had answered by
        # then (each answers first, and the host waited a full grace), so what was read stands.
    return answered, [m for m in members if m not in answered], None


def explain(what: str, exc: BaseException, group: Any, members: Sequence[int], peers: Sequence[int]
            ) -> str:
    """The message for a failed transfer without a watchdog: gloo's words plus who is missing."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    answered, missing, store_error = roll_call(group, members, what)
    if store_error is not None:
        host = "rank 0" if 0 in members else "the store's host"
        return (f"{what} failed: {first}; {store_error}: {host} (which hosts a TCPStore under "
                f"torchrun and env://) is probably the lost rank")
    if not missing:
        return (f"{what} failed: {first}; every rank of the group answered the roll call "
                f"({'; '.join(f'rank {r}: {w}' for r, w in sorted(answered.items()))}), so none "
                f"was lost: ranks are in different calls (one skipped a call, or called another)")
    lost = ", ".join(map(str, missing))
    peer_note = ""
    if peers:
        gone = sorted(set(peers) & set(missing))
        if gone:
            peer_note = f"; this rank was exchanging with rank(s) {', '.join(map(str, gone))}"
    return (f"{what} failed: {first}; lost: rank(s) {lost} did not answer the roll call within "
            f"{GRACE_S:g} s (exited, crashed, or not in this call: a rank that skips a call stalls "
            f"the others); answered: {', '.join(map(str, sorted(answered)))}{peer_note}")
