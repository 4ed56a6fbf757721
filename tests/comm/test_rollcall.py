"""A lost rank is named under the user's own process group (no tokenloom launcher, no watchdog).

Four forked ranks call ``dist.init_process_group("gloo", init_method="tcp://...")`` themselves, as
a user's script does; one of them exits before the first exchange, or skips the call. Every
survivor must fail with an error that names that rank.
"""

import datetime
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from bounds import DETECTION_SLACK_S

WORLD = 4
LOST = 2
PG_TIMEOUT_S = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # first: OpenMP is not fork-safe (REFERENCE.md section 7)
    import torch.distributed as dist

    from tokenloom.parallel import token_ring_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    if rank == LOST:
        if mode in ("exit", "exit, then p2p"):
            os._exit(0)
        time.sleep(PG_TIMEOUT_S + 12)  # "skips the call": busy elsewhere, never enters it
        os._exit(0)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
    if mode == "exit, then p2p":
        time.sleep(1.5)  # rank 2 is long gone: posting a transfer to it fails at once
    t0 = time.monotonic()
    try:
        if mode == "exit, then p2p":
            from tokenloom.comm.communicator import P2P, Communicator

            Communicator().batch_p2p([P2P("send", LOST, q), P2P("recv", LOST, torch.empty_like(q))]).wait()
        else:
            token_ring_attention(q, k, v, causal=True)
        message = "no error"
    except Exception as exc:  # noqa: BLE001 -- the test reads the message
        message = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"{rank}.txt").write_text(f"{time.monotonic() - t0:.2f}\n{message}")
    os._exit(0)


def _run(mode: str, tmp_path: Path) -> dict[int, tuple[float, str]]:
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, mode, str(tmp_path)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = {}
    for r in range(WORLD):
        f = tmp_path / f"{r}.txt"
        if f.exists():
            seconds, message = f.read_text().split("\n", 1)
            results[r] = (float(seconds), message)
    return results


@pytest.mark.parametrize("mode", ["exit", "skip", "exit, then p2p"])
def test_every_survivor_names_the_lost_rank(mode, tmp_path):
    results = _run(mode, tmp_path)
    survivors = [r for r in range(WORLD) if r != LOST]
    assert sorted(results) == survivors, results
    for r in survivors:
        seconds, message = results[r]
        assert message.startswith("CommError"), message
        assert f"lost: rank(s) {LOST} did not answer" in message, message
        assert "answered: " + ", ".join(map(str, survivors)) in message, message
        # bounded: the group's timeout (skip) plus the roll call's grace, not forever
        assert seconds < PG_TIMEOUT_S + 5 + DETECTION_SLACK_S, (r, seconds)
