"""All of a command's outputs, checked before any work and renamed into place together.

The checks and the atomic single-file write are :mod:`tokenloom.common.files`; this is the
transaction the CLI commands wrap around their work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from tokenloom.common.errors import UsageError
from tokenloom.common.files import _probe, _umask, resolve_output


class OutputFiles:
    """All of a command's outputs, checked up front and renamed into place together at the end.

    >>> with OutputFiles(inputs=[args.trace]) as out:
    ...     out.claim("--out", args.out)           # before any work: UsageError if unusable
    ...     plan = expensive()
    ...     out.write("--out", lambda p: save_plan(plan, p))
    ...     out.commit()                           # only now do the targets change

    ``claim`` checks the path and creates (and at once deletes) a probe file beside the target, so
    a directory that only *looks* writable (root on a read-only mount, ``/sys``, a full quota) is
    refused before the work, not after it. ``write`` runs the writer on a temp path beside the
    target (disk-full or a writer error surfaces before anything is replaced); leaving the block
    without ``commit`` deletes the temps.
    """

    def __init__(self, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
        self._inputs = [i for i in inputs if i is not None]
        self._targets: dict[str, Path] = {}
        self._staged: dict[str, str] = {}  # field -> its temp file (from claim on)
        self._written: set[str] = set()

    def claim(self, field: str, path: str | os.PathLike | None) -> Path | None:
        """Check and reserve ``path`` for ``field``; ``None`` (flag not given) passes through."""
        if path is None:
            return None
        target = resolve_output(path, field, self._inputs)
        for other_field, other in self._targets.items():
            if other == target:
                raise UsageError(f"{field} and {other_field} name the same file {os.fspath(path)}", field=field)
        _probe(target, field)
        self._targets[field] = target
        return target

    def write(self, field: str, writer: Callable[[Path], None]) -> None:
        """Run ``writer(temp_path)`` for the claimed ``field``; no-op if the flag was not given."""
        target = self._targets.get(field)
        if target is None:
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._staged[field] = tmp
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        self._written.add(field)

    def commit(self) -> None:
        """Rename every written file over its target (claimed but unwritten ones are dropped)."""
        for field in self._written:  # still usable? (checked again: cheap, and the work may
            resolve_output(self._targets[field], field, self._inputs)  # have taken minutes)
        for field in sorted(self._written, key=list(self._targets).index):
            os.replace(self._staged.pop(field), self._targets[field])
        self._written.clear()
        self.discard()

    def discard(self) -> None:
        for tmp in self._staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._staged.clear()
        self._written.clear()

    def __enter__(self) -> "OutputFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
