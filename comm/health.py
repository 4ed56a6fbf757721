"""Heartbeats and a watchdog in the c10d store: who is lost, where it was, within a bound.

One mechanism for every launcher (forked local ranks, torchrun, hand-started ranks, Ray actors):
each rank runs a :class:`Monitor` thread that

* writes its heartbeat ``hb/<rank>`` every ``interval_s``: a sequence number, host, pid, the
  current step (:func:`set_step`, reported by the runtime) and the last communication call;
* reads the peers' heartbeats and declares a peer *lost* when its sequence number has not moved
  for ``timeout_s`` seconds (measured on the reader's own monotonic clock, so clock skew between
  nodes does not matter);
* reads the ``abort`` key, which the first rank (or launcher) that knows of a failure writes once.

:class:`~tokenloom.comm.communicator.Handle` consults the active monitor while it waits, so a
survivor blocked on a transfer to a dead or stopped peer raises :class:`PeerLostError` naming the
lost rank(s), their host and their last step, instead of hanging until the process-group timeout
or failing with a bare "Connection closed by peer".

The monitor is process state (one per rank process), like the step label; process groups stay
arguments.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

ABORT_KEY = "abort"

_state = {"step": "start", "comm": "", "monitor": None}


class PeerLostError(RuntimeError):
    """A peer rank died, stopped, or failed; ``lost`` lists its rank(s), ``info`` the details."""

    def __init__(self, message: str, lost: list[int] | None = None, info: dict | None = None) -> None:
        super().__init__(message)
        self.lost = list(lost or [])
        self.info = dict(info or {})


class Terminated(Exception):
    """This rank was told to stop (SIGTERM from its launcher, e.g. torchrun's agent after another
    worker died); raised in the main thread so the rank can still name the lost peer."""


def set_step(label: str) -> None:
    """Record where this rank is (e.g. "tokenring forward step 3"); carried by the heartbeat.

    The heartbeat is written through at once unless one was written in the last 20 ms, so a rank
    killed right after a step change is reported at (or within 20 ms of) that step, at no more
    than 50 store writes a second (a FileStore appends every write to its file).
    """
    _state["step"] = label
    monitor = _state["monitor"]
    if monitor is not None:
        monitor.beat_soon()


def set_comm(label: str) -> None:
    """Record the communication call this rank is in or last made (set by the Communicator)."""
    _state["comm"] = label


def current_step() -> str:
    return _state["step"]


def active() -> "Monitor | None":
    """The monitor of this rank process, if a launcher started one."""
    return _state["monitor"]


def describe_abort(info: dict) -> str:
    """One line naming the lost rank(s), their host and last step, from an ``abort`` record."""
    lost = info.get("lost", [])
    who = ", ".join(f"rank {r}" for r in lost) or "a rank"
    where = "; ".join(f"rank {r} on {d.get('host', '?')} (pid {d.get('pid', '?')}) last at "
                      f"'{d.get('step', '?')}'" + (f", in '{d['comm']}'" if d.get("comm") else "")
                      for r, d in sorted(info.get("peers", {}).items(), key=lambda kv: int(kv[0])))
    text = f"{who} {info.get('reason', 'lost')}"
    if info.get("by") is not None:
        text += f" (detected by {info['by']})"
    return text + (f": {where}" if where else "")


class Monitor:
    """Heartbeat writer and watchdog of one rank (see the module docstring).

    Args:
        store: a c10d Store shared by all ranks (FileStore, TCPStore, PrefixStore...).
        rank, world_size: this rank (None: a launcher that only observes) and the number of ranks.
        store_host: the rank whose process hosts the store (hand-started ranks: rank 0), if any.
        startup_s: how long a rank may take to write its first heartbeat (default max(timeout, 60)).
        timeout_s: a peer whose heartbeat has not moved for this long is lost.
        watch: ranks to watch; default all peers up to 64 ranks, else the 4 ring neighbours
            (every rank is then still watched by 4 others, and the abort key reaches everyone).
    """

    def __init__(self, store: Any, rank: int | None, world_size: int, *, timeout_s: float,
                 interval_s: float | None = None, watch: list[int] | None = None,
                 store_host: int | None = None, startup_s: float | None = None) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.name = "the launcher" if rank is None else f"rank {rank}"
        self.store_host = store_host
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or max(0.05, min(1.0, self.timeout_s / 10))
        # A rank that never beat is still starting (a cold Ray worker imports torch for seconds).
        self.startup_s = max(self.timeout_s, 60.0) if startup_s is None else startup_s
        if watch is None:
            if world_size <= 64:
                watch = [r for r in range(world_size) if r != rank]
            else:
                watch = sorted({(rank + d) % world_size for d in (-2, -1, 1, 2)} - {rank})
        self.watch = watch
        self.host = socket.gethostname()
        self.failure: dict | None = None  # the abort record, once known
        self._seen: dict[int, tuple[int, float, dict]] = {}  # rank -> (seq, when it moved, payload)
        self._seq = 0
        self._last_beat = 0.0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"tokenloom-watchdog-{rank}", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Monitor":
        # No store.set_timeout here: the store is shared with the process group's rendezvous.
        # The watchdog never blocks on it (get only after check).
        self._beat("running")
        _state["monitor"] = self
        self._thread.start()
        return self

    def stop(self, state: str = "done") -> None:
        """Stop the thread and leave a final heartbeat (``done``/``failed``): not a lost rank."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._beat(state)
        except Exception:  # the store may be gone with the launcher; nothing left to tell
            pass
        if _state["monitor"] is self:
            _state["monitor"] = None

    # ------------------------------------------------------------------ the thread
    def beat_soon(self) -> None:
        """Write the heartbeat now unless one was written in the last 20 ms (or quarter interval)."""
        if time.monotonic() - self._last_beat > min(0.02, self.interval_s / 4):
            try:
                self._beat("running")
            except Exception:  # the watchdog thread reports an unreachable store
                pass

    def _beat(self, state: str) -> None:
        if self.rank is None:  # a launcher observing the ranks: no heartbeat of its own
            return
        with self._lock:
            self._seq += 1
            payload = {"seq": self._seq, "host": self.host, "pid": os.getpid(), "state": state,
                       "step": _state["step"], "comm": _state["comm"]}
            self.store.set(f"hb/{self.rank}", json.dumps(payload))
            self._last_beat = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat("running")
                self.poll()
            except Exception as exc:  # the store itself is unreachable: its host is gone
                if self.failure is None and not self._stop.is_set():
                    host = [] if self.store_host is None else [self.store_host]
                    peers = {str(r): self._seen[r][2] for r in host if r in self._seen}
                    self.failure = {"lost": host, "by": self.name, "peers": peers,
                                    "reason": f"unreachable: the rendezvous store it hosts is gone ({exc})"
                                    if host else f"unreachable: the rendezvous store is gone ({exc})"}

    def poll(self) -> dict | None:
        """Read the abort key and the watched heartbeats; publish the lost ones. Returns failure."""
        if self.failure is not None and self.failure.get("lost"):
            return self.failure
        if self.store.check([ABORT_KEY]):
            self.failure = json.loads(self.store.get(ABORT_KEY))
            return self.failure
        now = time.monotonic()
        lost = []
        for r in self.watch:
            payload = self._read(r)
            if payload is not None and payload.get("state") != "running":
                continue  # finished or failed on its own: reported through its own error
            if r in self._seen:
                if now - self._seen[r][1] > self.timeout_s:
                    lost.append(r)
            elif now - self._started > self.startup_s:
                lost.append(r)
        if lost:
            never = [r for r in lost if r not in self._seen]
            reason = (f"not responding (no heartbeat for {self.timeout_s:g} s: died or stopped)"
                      if not never else f"never started (no heartbeat within {self.startup_s:g} s)")
            self.publish(lost, reason, by=self.name)
        return self.failure

    def _read(self, r: int) -> dict | None:
        key = f"hb/{r}"
        if not self.store.check([key]):
            return None
        payload = json.loads(self.store.get(key))
        seen = self._seen.get(r)
        if seen is None or seen[0] != payload["seq"]:
            self._seen[r] = (payload["seq"], time.monotonic(), payload)
        return payload

    # ------------------------------------------------------------------ queries
    def peer(self, r: int) -> dict:
        """Last heartbeat of rank ``r`` with ``age_s`` (since its sequence number last moved)."""
        if r == self.rank:
            return {"state": "running", "host": self.host, "pid": os.getpid(), "step": _state["step"],
                    "comm": _state["comm"], "age_s": 0.0}
        try:
            payload = self._read(r)
        except Exception:
            payload = None
        if payload is None:
            return {"state": "never seen", "age_s": time.monotonic() - self._started}
        return {**payload, "age_s": time.monotonic() - self._seen[r][1]}

    def publish(self, lost: list[int], reason: str, *, by: str | None = None) -> dict:
        """Write the abort record (first writer wins) and adopt whatever record is there."""
        info = {"lost": sorted(lost), "reason": reason, "by": by,
                "peers": {str(r): self.peer(r) for r in lost}}
        try:
            self.store.compare_set(ABORT_KEY, "", json.dumps(info))
            info = json.loads(self.store.get(ABORT_KEY))
        except Exception:
            pass
        self.failure = info
        return info

    def verdict(self, peers: list[int], grace_s: float) -> dict | None:
        """After a failed transfer with ``peers``: wait up to ``grace_s`` for one to go silent.

        A killed peer stops beating at once; a live one keeps beating, so a few intervals without
        a beat is the verdict. Returns the abort record, or None if every peer stays alive.
        """
        deadline = time.monotonic() + grace_s
        quiet = max(4 * self.interval_s, min(self.timeout_s, 2.0))  # a loaded host delays beats
        while True:
            failure = self.poll()
            if failure is not None:
                return failure
            if all(self.peer(r).get("state") in ("done", "failed") for r in peers if r != self.rank):
                return None  # they finished without this transfer: the caller says so
            silent = [r for r in peers if r != self.rank and self.peer(r).get("state") == "running"
                      and self.peer(r)["age_s"] > quiet]
            if silent:
                return self.publish(silent, f"lost (no heartbeat for {quiet:.1f} s while its peers "
                                            f"waited on it: died or stopped)", by=self.name)
            if time.monotonic() > deadline:
                return None
            time.sleep(self.interval_s / 2)

    def stuck(self, what: str, peers: list[int], limit_s: float) -> dict | None:
        """A transfer with ``peers`` has waited ``limit_s``: name the peers that explain it.

        A peer that stopped beating is lost; a peer that already finished the job (or waits for
        the results) skipped this call. Returns the published abort record, or None when every
        peer is alive and inside the job (the caller then says where each one is).
        """
        failure = self.verdict(peers, grace_s=0.0)
        if failure is not None:
            return failure
        gone = [r for r in peers if r != self.rank and (self.peer(r).get("state") == "done" or
                                                         self.peer(r).get("step") == "gather results")]
        if gone:
            return self.publish(gone, f"finished the job without joining '{what}' (it skipped a "
                                      f"call its peers made; waited {limit_s:g} s)", by=self.name)
        busy = [r for r in peers if r != self.rank and self.peer(r).get("state") == "running"
                and not str(self.peer(r).get("comm", "")).startswith("waiting:")]
        if busy:
            return self.publish(busy, f"is alive but has not joined '{what}' for {limit_s:g} s "
                                      f"(stuck outside any transfer, or it skipped this call)",
                                by=self.name)
        return None

    def describe_peers(self, peers: list[int]) -> str:
        """Where each peer is, from its heartbeat: "rank 2 at 'step 3 ...' (beat 0.2 s ago)"."""
        parts = []
        for r in peers:
            p = self.peer(r)
            where = f"'{p.get('step', '?')}'" + (f" / '{p['comm']}'" if p.get("comm") else "")
            parts.append(f"rank {r} {p.get('state')} at {where} on {p.get('host', '?')} "
                         f"(heartbeat {p['age_s']:.1f} s ago)")
        return "; ".join(parts)
