"""Run a function on N local ranks over gloo: the demo's and the tests' multi-process harness.

Why fork with one intra-op thread: spawn re-imports torch in every rank (seconds each), while fork
starts in ~0.1 s. But OpenMP is not fork-safe: once the parent has run a multi-threaded op, a
forked child's first multi-threaded op can hang forever (REFERENCE.md §7). Every rank therefore
calls ``torch.set_num_threads(threads)`` before anything else.

The rendezvous is a FileStore in a fresh temporary directory: no port to pick, so concurrent runs
never collide, and no server thread in the parent (a parent-side TCPStore was seen to hang one
forked rendezvous in three here: its server thread does not survive fork cleanly). Results come back as plain data: tensors become numpy arrays,
because tensors sent through a queue are unreadable once the sending rank has exited.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from tokenloom.errors import UsageError


class RankError(RuntimeError):
    """A rank raised, died, or did not finish in time; the message names the rank(s)."""


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, timeout_s: float,
            threads: int, conn: Any) -> None:
    torch.set_num_threads(threads)  # first: see the module docstring
    status, payload = "ok", None
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        payload = _plain(fn(rank, world_size, *args))
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
        raise UsageError(f"world_size must be >= 1, got {world_size}", field="world_size")
    ctx = mp.get_context("fork")
    tmpdir = tempfile.TemporaryDirectory(prefix="tokenloom-ranks-")
    store_path = os.path.join(tmpdir.name, "store")
    pipes, procs = [], []
    for rank in range(world_size):
        recv_end, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(rank, world_size, store_path, fn, args, timeout,
                                                 threads, send_end), daemon=True)
        proc.start()
        send_end.close()
        pipes.append(recv_end)
        procs.append(proc)
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
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
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        tmpdir.cleanup()
    errors = {r: p for r, (status, p) in sorted(results.items()) if status == "error"}
    if errors:
        first = min(errors)
        others = f" (ranks {sorted(errors)} failed)" if len(errors) > 1 else ""
        raise RankError(f"rank {first} failed{others}:\n{errors[first]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RankError(f"ranks {missing} did not finish within {timeout:.0f} s (hang or deadlock)")
    return [results[r][1] for r in range(world_size)]
