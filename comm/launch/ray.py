"""The Ray launcher and Ray fan-out; the only tokenloom module that imports ``ray``.

* :func:`map_tasks` runs ``fn(item)`` for every item as Ray tasks (independent work: placement
  problems per layer, simulations in a sweep) and returns the results in order.
* :func:`run` runs an SPMD job on ``world_size`` rank actors: one placement group packs the ranks
  of a node together (one GPU per rank on GPU nodes; on CPU a token 0.01 CPU each, so the ranks
  never take every CPU slot and later tasks still run); the driver hosts the c10d TCPStore the
  ranks rendezvous on (so it outlives any rank), every rank runs
  :func:`tokenloom.comm.launch.rank.run_rank` (gloo on CPU, NCCL on GPU), and the driver gathers every
  rank's result. The driver watches the heartbeats too and, when an actor dies, writes the abort
  record naming its rank, node and step; actors and the placement group are always released,
  also on Ctrl-C.

Without ``address`` (or with ``address=None`` and no running session) a local Ray starts with the
dashboard off and a small object store. Tests set ``RAY_AUTH_MODE=disabled`` and a temp dir.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable, Iterable

import ray

from tokenloom.comm import health
from tokenloom.comm.launch.summary import Outcome, raise_for

OBJECT_STORE_BYTES = 256 * 2**20


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               temp_dir: str | None = None) -> None:
    """Connect to ``address`` (e.g. "auto"), or start a small local Ray; no-op if connected."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    kwargs: dict[str, Any] = {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False,
                              "object_store_memory": OBJECT_STORE_BYTES, "log_to_driver": False}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)


def _call(fn: Callable, item: Any) -> Any:
    return fn(item)


def map_tasks(fn: Callable, items: Iterable[Any], *, address: str | None = None,
              num_cpus: float = 1) -> list:
    """``[fn(item) for item in items]``, each call a Ray task; results in the order of ``items``.

    ``fn`` and the items must pickle (module-level functions, plain data). A task's exception is
    re-raised here with its original type when Ray can (``RayTaskError`` subclasses it).
    """
    items = list(items)
    if not items:
        return []
    ensure_ray(address)
    task = ray.remote(num_cpus=num_cpus, max_retries=0)(_call)
    refs = [task.remote(fn, item) for item in items]
    try:
        return ray.get(refs)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


# ---------------------------------------------------------------------------- rank actors
class _Rank:
    """One rank of a job, as a Ray actor (wrapped by ``ray.remote`` in :func:`_actor_class`)."""

    def where(self) -> dict:
        return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def run(self, job: Callable, config: Any, rank: int, world_size: int, host: str, port: int,
            timeout_s: float, backend: str | None, threads: int) -> tuple[str, Any]:
        import datetime

        import torch
        import torch.distributed as dist

        from tokenloom.comm.launch.rank import run_rank

        torch.set_num_threads(threads)
        try:
            store = dist.TCPStore(host, port, world_size=None, is_master=False,
                                  timeout=datetime.timedelta(seconds=max(30.0, timeout_s)))
            return "ok", run_rank(job, config, store=dist.PrefixStore("tokenloom", store), rank=rank,
                                  world_size=world_size, timeout_s=timeout_s, backend=backend)
        except BaseException as exc:
            return "error", Outcome.from_exception(exc, traceback.format_exc())


_ACTOR: list = []


def _actor_class() -> Any:
    if not _ACTOR:
        _ACTOR.append(ray.remote(max_restarts=0, max_concurrency=1)(_Rank))
    return _ACTOR[0]


def _gpus_per_rank(backend: str | None) -> int:
    if backend == "gloo":
        return 0
    gpus = ray.cluster_resources().get("GPU", 0)
    if backend == "nccl" and not gpus:
        from tokenloom.common.errors import UsageError

        raise UsageError("backend: nccl needs GPUs in the Ray cluster; it has none", field="backend")
    return 1 if gpus else 0


def run(job: Callable, config: Any, *, world_size: int, timeout_s: float = 60.0,
        address: str | None = None, backend: str | None = None, threads: int = 1,
        placement_timeout_s: float = 120.0) -> list[Any]:
    """Run ``job(comm, config)`` on ``world_size`` Ray rank actors; results in rank order.

    Raises :class:`tokenloom.comm.launch.summary.JobError` naming every lost (dead, stopped) and failed
    rank with its node and step, within ``timeout_s`` of the loss.
    """
    import datetime

    import torch.distributed as dist
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ensure_ray(address)
    gpus = _gpus_per_rank(backend)
    bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 0.01}
    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(30.0, timeout_s)))
    observer = health.Monitor(dist.PrefixStore("tokenloom", store), None, world_size, timeout_s=timeout_s)
    actors: list = []
    pg = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
        if not ready:
            from tokenloom.common.errors import UsageError

            raise UsageError(f"world_size: the Ray cluster cannot place {world_size} rank(s) of "
                             f"{bundle} within {placement_timeout_s:g} s", field="world_size")
        cls = _actor_class()
        for rank in range(world_size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank)
            actors.append(cls.options(num_cpus=bundle["CPU"], num_gpus=gpus,
                                      scheduling_strategy=strategy).remote())
        where = ray.get([a.where.remote() for a in actors], timeout=placement_timeout_s)
        refs = [a.run.remote(job, config, rank, world_size, host, store.port, timeout_s, backend, threads)
                for rank, a in enumerate(actors)]
        outcomes = _collect(refs, where, observer, timeout_s)
        try:
            observer.poll()
        except Exception:
            pass
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)
        del store
    return raise_for(outcomes, observer.failure, world_size)


def _collect(refs: list, where: list[dict], observer: health.Monitor, timeout_s: float) -> dict[int, Outcome]:
    """Every rank's outcome; a dead actor is published as lost at once (with its node), a stopped
    one by the heartbeats; after an abort the survivors get ``timeout_s`` (plus slack) to report."""
    rank_of = {ref.hex(): r for r, ref in enumerate(refs)}
    pending = list(refs)
    outcomes: dict[int, Outcome] = {}
    abort_seen = None
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=observer.interval_s)
        for ref in done:
            rank = rank_of[ref.hex()]
            try:
                status, payload = ray.get(ref)
                outcomes[rank] = Outcome.ok(payload) if status == "ok" else payload
            except ray.exceptions.RayActorError as exc:
                node = where[rank]
                why = (f"died (its Ray actor, pid {node['pid']} on {node['host']} ({node['ip']}), "
                       f"exited: {type(exc).__name__})")
                outcomes[rank] = Outcome.lost(why)
                if observer.failure is None or not observer.failure.get("lost"):
                    observer.publish([rank], why, by="the launcher")
        try:
            observer.poll()
        except Exception:
            pass
        now = time.monotonic()
        if observer.failure is not None and abort_seen is None:
            abort_seen = now
        if abort_seen is not None:
            waiting = {rank_of[r.hex()] for r in pending}
            if waiting <= set(observer.failure.get("lost", [])) or now - abort_seen > timeout_s + 5:
                break
    lost = set(observer.failure.get("lost", [])) if observer.failure else set()
    for ref in pending:
        rank = rank_of[ref.hex()]
        why = "not responding (no heartbeat)" if rank in lost else "did not report after the abort"
        outcomes[rank] = Outcome.lost(f"{why}; its actor (pid {where[rank]['pid']} on "
                                      f"{where[rank]['host']}) was killed by the launcher")
    return outcomes
