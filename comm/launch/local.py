"""The local launcher: fork ``world_size`` CPU ranks over gloo on this machine.

One bootstrap and one reaping serve two entry points:

- :func:`run` runs a job, ``job(comm, config)``, as every launcher does: each rank heartbeats into
  the store, the launcher watches as an observer, writes the ``abort`` record itself when a rank
  process dies (it knows the signal) and names every lost and failed rank in its summary. There is
  no bound on the whole run; ``timeout_s`` bounds how long a lost peer or a stuck transfer goes
  unnoticed.
- :func:`spawn_ranks` runs a plain function, ``fn(rank, world_size, *args)``, with nothing but the
  default process group initialised, exactly what a user's own script has (no watchdog): the
  tests' and benchmarks' multi-process harness. Its ``timeout`` bounds the whole run.

Why fork with few intra-op threads: spawn re-imports torch in every rank (seconds each), while
fork starts in ~0.1 s. But OpenMP is not fork-safe: once the parent has run a multi-threaded op, a
forked child's first multi-threaded op can hang forever (REFERENCE.md §7), so every rank sets its
thread count before anything else, and :func:`_fork_safe_threads` asks a canary first. The store
is a FileStore in a fresh temporary directory: no port to pick, so concurrent runs never collide,
no server thread in the parent (a parent-side TCPStore was seen to hang one forked rendezvous in
three here), and it survives the death of any rank. Results come back as plain data.
"""

from __future__ import annotations

import contextlib
import gc
import datetime
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator

from tokenloom.comm import health
from tokenloom.comm.launch.summary import Outcome, raise_for


def _worker(rank: int, world_size: int, store_path: str, job: Callable, config: Any,
            timeout_s: float, threads: int, conn: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # first: see the module docstring
    _die_with_parent()
    try:
        from tokenloom.comm.launch.rank import run_rank

        store = dist.FileStore(store_path, -1)
        payload = ("ok", run_rank(job, config, store=store, rank=rank, world_size=world_size,
                                  timeout_s=timeout_s, backend="gloo"))
    except BaseException as exc:  # report everything, including SystemExit
        payload = ("error", Outcome.from_exception(exc, traceback.format_exc()))
    try:
        conn.send(payload)
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers inherited from the parent (pytest, Ray, ...)


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the launcher process dies (killed, not only exited), so
    no orphaned rank keeps a job running."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: the launcher's finally is the only cleanup
        pass


def _fork_safe_threads(threads: int) -> int:
    """``threads`` if a forked child can run a multi-threaded op, else 1.

    Once this process has run a multi-threaded torch op, a forked child's first multi-threaded
    op hangs forever (GNU OpenMP is not fork-safe; REFERENCE.md §7): a library caller or a test
    process usually has. A canary child tries one such op (~50 ms); if it does not finish in
    1 s the ranks run with one thread each, which is always safe (and stays so: remembered).
    """
    if threads <= 1 or _UNSAFE_TO_FORK_THREADS.get(os.getpid()):
        return 1
    with _no_inherited_garbage():
        pid = os.fork()
    if pid == 0:  # the canary
        code = 1
        try:
            import torch

            torch.set_num_threads(threads)
            a = torch.ones(300, 300)
            code = 0 if float((a @ a).sum()) == 300.0 ** 3 else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return threads if status == 0 else 1
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    _UNSAFE_TO_FORK_THREADS[os.getpid()] = True
    return 1


_UNSAFE_TO_FORK_THREADS: dict[int, bool] = {}
_REPORT_GRACE_S = 2.0  # how long a failed (still living) rank gets to send its report after the abort


def _has_ray_threads() -> bool:
    """A process connected to Ray runs gRPC threads; a child forked from it was seen to freeze
    mid-job here (gRPC's and Ray's threads do not survive fork)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def _process_state(pid: int) -> str:
    """'T' for a stopped process, as /proc reports it ('' where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"died (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"died (signal {-code})"
    return f"exited with code {code} without a result"


def run(job: Callable, config: Any, *, world_size: int, timeout_s: float = 60.0,
        threads: int | None = None) -> list[Any]:
    """Run ``job(comm, config)`` on ``world_size`` forked gloo ranks; results in rank order.

    Raises :class:`tokenloom.comm.launch.summary.JobError` naming every failed or lost rank.
    """
    import torch.distributed as dist

    if _has_ray_threads():
        from tokenloom.common.errors import UsageError

        raise UsageError("launcher: this process is connected to Ray, and ranks forked from it were "
                         "seen to freeze; use launcher='ray' here, or the local launcher from a "
                         "process without Ray", field="launcher")
    threads = _fork_safe_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    with _ranks(world_size, _worker, (job, config, timeout_s, threads)) as (store_path, pipes, procs):
        store = dist.FileStore(store_path, -1)
        observer = health.Monitor(store, None, world_size, timeout_s=timeout_s)
        outcomes = _collect(pipes, procs, observer, timeout_s)
        if any(o.status != "ok" for o in outcomes.values()):
            try:
                observer.poll()  # adopt the abort record the ranks wrote
            except Exception:
                pass
    return raise_for(outcomes, observer.failure, world_size)


@contextlib.contextmanager
def _no_inherited_garbage() -> Iterator[None]:
    """Fork with nothing for the children to garbage-collect that they did not make themselves.

    Unreachable objects still waiting in this process's collector are inherited by a fork, and the
    child's first collection runs their finalizers there, where their threads do not exist: a
    dead process group's TCPStore server (``LibUVStoreDaemon``) detaches its thread on
    destruction and aborts a forked rank with SIGABRT (seen after tests that had made one). So
    collect here first, where the threads live, and freeze what is left (``gc.freeze``: a child
    never collects it) until the children are started.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _ranks(world_size: int, worker: Callable, args: tuple) -> Iterator[tuple[str, list, list]]:
    """Fork ``worker(rank, world_size, store_path, *args, conn)`` for every rank; yield the store
    path, the result pipes and the processes; on leaving, however we leave, kill and reap them."""
    ctx = mp.get_context("fork")
    tmpdir = tempfile.TemporaryDirectory(prefix="tokenloom-local-")
    store_path = os.path.join(tmpdir.name, "store")
    pipes, procs = [], []
    try:
        with _no_inherited_garbage():
            for rank in range(world_size):
                recv_end, send_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=worker, args=(rank, world_size, store_path, *args, send_end),
                                   daemon=True)
                proc.start()
                send_end.close()
                pipes.append(recv_end)
                procs.append(proc)
        yield store_path, pipes, procs
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        tmpdir.cleanup()


def _collect(pipes: list, procs: list, observer: health.Monitor, timeout_s: float) -> dict[int, Outcome]:
    """Read every rank's outcome; a dead rank is published as lost at once, stopped ones by the
    heartbeats; survivors get ``timeout_s`` (plus slack) after an abort to report."""
    outcomes: dict[int, Outcome] = {}
    next_poll, abort_seen = 0.0, None
    while len(outcomes) < len(procs):
        for rank, pipe in enumerate(pipes):
            if rank in outcomes:
                continue
            if pipe.poll(0.005):
                try:
                    status, payload = pipe.recv()
                    outcomes[rank] = Outcome.ok(payload) if status == "ok" else payload
                    continue
                except EOFError:  # the process is gone without a word: it died
                    pass
            elif procs[rank].is_alive():
                continue
            procs[rank].join(timeout=1)
            why = _death(procs[rank].exitcode)
            outcomes[rank] = Outcome.lost(why)
            if observer.failure is None or not observer.failure.get("lost"):
                observer.publish([rank], why, by="the launcher")
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + observer.interval_s
            try:
                observer.poll()
            except Exception:
                pass
        if observer.failure is not None and abort_seen is None:
            abort_seen = now
        if abort_seen is not None:
            waiting = {r for r in range(len(procs)) if r not in outcomes}
            # Only the lost ones are left (a rank that failed on its own is "lost" too, but it is
            # alive and about to send its own report: a moment's grace), or the rest are stuck.
            lost_only = waiting <= set(observer.failure.get("lost", []))
            settled = not any(procs[r].is_alive() for r in waiting) or now - abort_seen > _REPORT_GRACE_S
            if (lost_only and settled) or now - abort_seen > timeout_s + 5:
                break
    for rank, proc in enumerate(procs):
        if rank not in outcomes:
            stopped = _process_state(proc.pid) == "T"
            outcomes[rank] = Outcome.lost("stopped (SIGSTOP) and killed by the launcher" if stopped
                                          else "did not report after the abort; killed by the launcher")
    return outcomes


# ---------------------------------------------------------------- plain functions (no watchdog)
class RankError(RuntimeError):
    """A rank raised, died, or did not finish in time; the message names the rank(s)."""


def _plain_worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, timeout_s: float,
                  threads: int, conn: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # first: see the module docstring
    _die_with_parent()
    from tokenloom.comm.launch.rank import plain

    status, payload = "ok", None
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        payload = plain(fn(rank, world_size, *args))
    except BaseException:  # report everything, including SystemExit from a CLI entry
        status, payload = "error", traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    try:
        conn.send((status, payload))
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers inherited from the parent (pytest, Ray, ...)


def spawn_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 120.0,
                threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked ranks over gloo.

    ``fn`` runs with the default process group initialised. Returns each rank's return value (as
    plain data) in rank order. Raises :class:`RankError` naming the rank(s) that raised (with the
    traceback), died, or did not finish within ``timeout`` seconds; survivors are killed.
    """
    if world_size < 1:
        from tokenloom.common.errors import UsageError

        raise UsageError(f"world_size must be >= 1, got {world_size}", field="world_size")
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with _ranks(world_size, _plain_worker, (fn, args, timeout, threads)) as (_, pipes, procs):
        while len(results) < world_size and time.monotonic() < deadline:
            for rank, pipe in enumerate(pipes):
                if rank in results:
                    continue
                if pipe.poll(0.01):
                    try:
                        results[rank] = pipe.recv()
                    except EOFError:
                        results[rank] = ("error", f"rank {rank} exited without a result "
                                                  f"(exit code {procs[rank].exitcode})")
                elif not procs[rank].is_alive() and not pipe.poll(0):
                    results[rank] = ("error", f"rank {rank} died (exit code {procs[rank].exitcode})")
            if any(status == "error" for status, _ in results.values()):
                time.sleep(0.2)  # let the other ranks report their own errors first
                for rank, pipe in enumerate(pipes):
                    if rank not in results and pipe.poll(0):
                        results[rank] = pipe.recv()
                break
    errors = {r: p for r, (status, p) in sorted(results.items()) if status == "error"}
    if errors:
        first = min(errors)
        others = f" (ranks {sorted(errors)} failed)" if len(errors) > 1 else ""
        raise RankError(f"rank {first} failed{others}:\n{errors[first]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RankError(f"ranks {missing} did not finish within {timeout:.0f} s (hang or deadlock)")
    return [results[r][1] for r in range(world_size)]
