"""Writing a file so that a crash leaves the old one or the new one, never half of either.

Both sides keep key material on disk (the client its secret key, the server the uploaded
evaluation keys), and both need the same three steps: write a temporary file next to the
target with owner-only permissions, fsync it, rename it over the target, and fsync the
folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

#: Called with the open descriptor and the bytes before they are written; tests use it to
#: die half-way through a write.
WriteHook = Callable[[int, memoryview], None]


def write_private(
    path: Path, data: bytes, *, tmp_suffix: str = ".tmp", before_write: WriteHook | None = None
) -> None:
    """Atomically replace ``path`` with ``data``, readable by its owner only (0600).

    The temporary file is ``.<name>.<random><tmp_suffix>`` in the same folder and is removed
    when the write fails.

    Raises:
        OSError: the folder cannot be written (full, read-only, forbidden, not a folder).
    """
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{tmp_suffix}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            if before_write is not None:
                before_write(fd, view)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # makes the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError:
        with contextlib.suppress(OSError):  # ENOTDIR/EROFS: there is no file to remove
            tmp.unlink(missing_ok=True)
        raise
