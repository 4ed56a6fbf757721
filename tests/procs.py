"""Starting processes from tests: independent of what the test process inherited, and no leaks.

Every child starts in a session (and process group) of its own with SIGINT at its default
disposition, whatever the pytest process had: a suite started as a background job of a POSIX shell
runs with SIGINT ignored, and an ignored signal is inherited through fork and exec, so a test that
sends Ctrl-C to a launcher would otherwise exercise nothing and wait. When the test is done, failed
or timed out, the whole group is killed, grandchildren (ranks, torchrun workers) included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Iterator, Sequence


@contextlib.contextmanager
def _sigint_default_for_children() -> Iterator[None]:
    # A handled signal is reset to its default by exec; only an ignored one is inherited. So the
    # parent installs Python's handler for the duration of the fork+exec if it was ignoring SIGINT.
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (its session: every descendant that stayed in it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def popen(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session with SIGINT at its default disposition."""
    with _sigint_default_for_children():
        return subprocess.Popen(list(cmd), start_new_session=True, **kwargs)


@contextlib.contextmanager
def started(cmd: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``with started(cmd) as proc:``; the process group is killed on leaving, however we leave."""
    proc = popen(cmd, **kwargs)
    try:
        yield proc
    finally:
        kill_group(proc)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


def run(cmd: Sequence[str], *, timeout: float, input: str | None = None, **kwargs
        ) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=...)``, but a timeout or
    any failure kills the whole process group, not just the direct child."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with started(cmd, **kwargs) as proc:
        out, err = proc.communicate(input=input, timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
