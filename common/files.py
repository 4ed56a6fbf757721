"""File edges: atomic outputs checked before any work starts, and guarded input reads.

Rules (one mechanism for every command):

- An output path is checked *before* the work: absent or a regular file (a symlink is followed to
  its target), its directory exists and is writable, and it is not one of the command's inputs.
  A device node, a FIFO, a directory or an input is refused with a :class:`UsageError` naming the
  flag; nothing is ever renamed over anything but a regular file.
- Every output is written to a temp file beside its target and renamed into place only after the
  whole computation succeeded (:func:`atomic_write`; a command's several outputs go through
  ``tokenloom.commands.outputs.OutputFiles``): a command with two outputs leaves neither when
  either fails.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from tokenloom.common.errors import UsageError, one_line

MAX_INPUT_BYTES = 2 << 30  # refuse to slurp more than 2 GiB from one input file
# JSON is ~10x its size once parsed into Python objects (a 2 GiB file would need ~20 GB of
# memory), so read_json refuses more than 256 MiB unless the caller passes its own max_bytes.
MAX_JSON_BYTES = 256 << 20


def resolve_output(path: str | os.PathLike, field: str = "output",
                   inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The real path an output will be written to; :class:`UsageError` if it may not be."""
    text = os.fspath(path)
    if not text:
        raise UsageError(f"{field}: empty path", field=field)
    try:
        return _resolve_output(text, field, inputs)
    except (OSError, ValueError) as exc:  # name too long, NUL byte, loop of links, ...
        if isinstance(exc, UsageError):
            raise
        why = getattr(exc, "strerror", None) or one_line(exc)
        raise UsageError(f"{field}: cannot write {text}: {why}", field=field) from None


def _resolve_output(text: str, field: str, inputs: Iterable[str | os.PathLike | None]) -> Path:
    if text.endswith(("/", os.sep)) or os.path.basename(text) in (".", ".."):
        raise UsageError(f"{field}: {text} names a directory; give a file name", field=field)
    target = Path(os.path.realpath(text))  # follow symlinks: write the target, keep the link
    if target.exists() or target.is_symlink():
        try:
            mode = os.stat(target).st_mode
        except OSError as exc:
            raise UsageError(f"{field}: cannot use {text}: {exc.strerror}", field=field) from None
        if stat.S_ISDIR(mode):
            raise UsageError(f"{field}: {text} is a directory; give a file name", field=field)
        if not stat.S_ISREG(mode):
            raise UsageError(f"{field}: {text} is not a regular file (device, FIFO or socket); "
                             f"refusing to replace it", field=field)
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"{field}: directory {parent} does not exist", field=field)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{field}: directory {parent} is not writable", field=field)
    for other in inputs:
        if other is not None and _same_file(target, other):
            raise UsageError(f"{field}: {text} is also an input of this command; writing it would "
                             f"destroy the input", field=field)
    return target


def _same_file(target: Path, other: str | os.PathLike) -> bool:
    with contextlib.suppress(OSError):
        if target.exists() and os.path.exists(other):
            return os.path.samefile(target, other)
    return target == Path(os.path.realpath(os.fspath(other)))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds.

    The path is checked as by :func:`resolve_output` (a symlink's target is written, never a
    device, FIFO or directory).
    """
    if mode not in ("w", "wb"):
        raise UsageError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}", field="mode")
    target = resolve_output(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode of a new file
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _probe(target: Path, field: str) -> None:
    """Create and delete an empty file beside ``target``: ``os.access`` says yes to root on a
    read-only mount and in ``/sys``; only trying tells."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
    except OSError as exc:
        raise UsageError(f"{field}: cannot create a file in {target.parent}: {exc.strerror}",
                         field=field) from None
    os.close(fd)
    os.unlink(tmp)


def check_input_file(path: str | os.PathLike, field: str, *, max_bytes: int = MAX_INPUT_BYTES) -> Path:
    """``path`` as an existing regular file of at most ``max_bytes``; UsageError otherwise.

    Only ``stat`` is used, so a FIFO or a device is refused without ever being opened (opening a
    FIFO with no writer would block forever).
    """
    text = os.fspath(path)
    if not text:
        raise UsageError(f"{field}: empty path", field=field)
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise UsageError(f"{field}: no such file: {text}", field=field) from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        why = getattr(exc, "strerror", None) or one_line(exc)
        raise UsageError(f"{field}: cannot read {text}: {why}", field=field) from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{field}: {text} is a directory, not a file", field=field)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{field}: {text} is not a regular file (device, FIFO or socket)", field=field)
    if st.st_size > max_bytes:
        raise UsageError(f"{field}: {text} is {_size(st.st_size)}; the limit is {_size(max_bytes)}",
                         field=field)
    return Path(text)


def _size(num_bytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / (1 << shift):.1f} {unit}"
    return f"{num_bytes} bytes"


def read_json(path: str | os.PathLike, field: str, *, max_bytes: int = MAX_JSON_BYTES) -> object:
    """Parse a JSON file strictly: UTF-8, finite numbers only (no NaN/Infinity, no 1e400), integers
    of at most 4300 digits, bounded nesting; every error is a UsageError naming the file and the flag."""
    import json

    checked = check_input_file(path, field, max_bytes=max_bytes)
    try:
        text = checked.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{field}: {path} is not UTF-8 text (byte {exc.start})", field=field) from None
    except OSError as exc:
        raise UsageError(f"{field}: cannot read {path}: {exc.strerror}", field=field) from None

    def no_constant(name: str) -> None:
        raise UsageError(f"{field}: {path} contains {name}; only finite numbers are allowed", field=field)

    def finite_float(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise UsageError(f"{field}: {path} contains {token}, which overflows a float; only finite "
                             f"numbers are allowed", field=field)
        return value

    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite_float)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{field}: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg})", field=field) from None
    except UsageError:
        raise
    except RecursionError:
        raise UsageError(f"{field}: {path} nests arrays or objects too deeply", field=field) from None
    except ValueError as exc:  # an integer literal longer than Python's 4300-digit limit
        raise UsageError(f"{field}: {path} is not usable JSON ({one_line(exc)})", field=field) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
