"""The evaluation-key store: uploaded key envelopes on disk, by model and content hash.

Layout: ``<root>/<model>/<key_id>.hek``, where ``key_id`` is the SHA-256 of the envelope
(``wire.key_id``), so an upload is idempotent and a file names its own content. A write goes
to a temporary file in the same folder, is fsynced and then renamed over the final name
(``os.replace`` is atomic on POSIX), so a reader sees either no file or a whole one; a crash
leaves at most a ``*.tmp`` file, which the next start deletes without reading.

Two limits bound the disk: a total size cap, enforced by evicting the least recently used
keys, and a time-to-live counted from each key's last use. The last use is kept in memory
and written to the file's mtime at most once a minute, so a restart keeps the order to
within that minute. Galois keys are the largest upload the service takes (tens to hundreds
of MB at N=16384), so the cap is what keeps a busy server's disk bounded.

A store that cannot be written (a full disk, a read-only mount, a folder replaced by a
file, lost permissions) refuses the upload with a :class:`StorageError` (507) that says what
to do for that cause, logs the path for the operator, and leaves no file behind; keys
already stored keep answering, and a key that cannot be unlinked on eviction or expiry is
forgotten in memory and logged (the next start finds and expires it again).

This class holds bytes only; the loaded backend contexts live in ``server/contexts.py``,
which listens for evictions so that a removed key is also dropped from memory.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from he_inference.errors import ServiceError, StorageError, UnknownKeyError
from he_inference.files import write_private

logger = logging.getLogger(__name__)

KEY_ID = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".hek"
TMP_SUFFIX = ".tmp"
# Persist the last use to the file's mtime at most this often (one syscall per query saved).
TOUCH_INTERVAL_S = 60.0
# Tests only: SIGKILL the process halfway through a key write, to show that a crash there
# leaves nothing a restart would serve (tests/server/test_load_faults.py).
KILL_IN_WRITE_ENV = "HE_INFERENCE_TEST_KILL_IN_KEY_WRITE"

EvictionListener = Callable[[str, str], None]


@dataclass
class _Entry:
    size: int
    last_used: float
    touched: float


class KeyStore:
    """Evaluation-key envelopes on disk with a size cap (LRU eviction) and a TTL.

    Thread-safe: uploads and loads run in worker threads.
    """

    def __init__(
        self,
        root: Path,
        cap_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.cap_bytes = cap_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._listeners: list[EvictionListener] = []
        self._open()

    # -- public -----------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of all stored keys."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def on_remove(self, listener: EvictionListener) -> None:
        """Call ``listener(model, key_id)`` whenever a key is evicted, expired or deleted."""
        self._listeners.append(listener)

    def contains(self, model: str, key_id: str) -> bool:
        """Whether live keys are stored under this id (a hit counts as a use)."""
        with self._lock:
            entry = self._live_entry(model, key_id)
            if entry is None:
                return False
            self._touch(model, key_id, entry)
            return True

    def put(self, model: str, key_id: str, data: bytes) -> None:
        """Store an envelope atomically, evicting least recently used keys to make room.

        Raises:
            ServiceError: (413) the envelope alone is larger than the store's cap.
            StorageError: the file cannot be written.
        """
        _check_key_id(key_id)
        if len(data) > self.cap_bytes:
            raise ServiceError(
                f"the evaluation keys take {len(data)} bytes and the key store holds at most "
                f"{self.cap_bytes}: compile the model with fewer rotation steps",
                413,
            )
        with self._lock:
            self._expire()
            if (model, key_id) in self._entries:
                self._touch(model, key_id, self._entries[(model, key_id)])
                return
            while self._entries and self.total_bytes + len(data) > self.cap_bytes:
                (old_model, old_id), _ = next(iter(self._entries.items()))
                logger.info("evicting keys %s of model %s (size cap)", old_id[:12], old_model)
                self._remove(old_model, old_id)
            self._write(self._path(model, key_id), data)
            now = self._clock()
            self._entries[(model, key_id)] = _Entry(len(data), now, now)
        logger.info("stored keys %s of model %s: %d bytes", key_id[:12], model, len(data))

    def read(self, model: str, key_id: str) -> bytes:
        """The envelope stored under this id (a read counts as a use).

        Raises:
            UnknownKeyError: no live keys are stored under it (never uploaded, evicted or
                expired).
            StorageError: the file cannot be read.
        """
        with self._lock:
            entry = self._live_entry(model, key_id)
            if entry is None:
                raise _unknown(model, key_id)
            path = self._path(model, key_id)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                self._entries.pop((model, key_id), None)
                raise _unknown(model, key_id) from None
            except OSError as exc:
                raise StorageError(
                    f"the key store cannot read keys {key_id[:12]} of model {model}: "
                    f"{exc.strerror}; the operator's log has the cause"
                ) from exc
            self._touch(model, key_id, entry)
            return data

    def delete(self, model: str, key_id: str) -> None:
        """Remove stored keys.

        Raises:
            UnknownKeyError: no keys are stored under this id.
            StorageError: the file cannot be removed (the keys stay stored and usable).
        """
        with self._lock:
            if self._live_entry(model, key_id) is None:
                raise _unknown(model, key_id)
            self._remove(model, key_id, strict=True)
        logger.info("deleted keys %s of model %s", key_id[:12], model)

    # -- internals ----------------------------------------------------------------------

    def _open(self) -> None:
        """Index the files on disk; delete leftovers of interrupted writes and expired keys."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            files = sorted(self.root.glob("*/*"))
        except OSError as exc:
            raise StorageError(f"cannot open the key store {self.root}: {exc.strerror}") from exc
        found = []
        for path in files:
            if path.name.endswith(TMP_SUFFIX):
                logger.warning("deleting interrupted key write %s", path)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:  # never read, so harmless: a read-only store still serves
                    logger.error("cannot delete %s: %s", path, exc.strerror)
                continue
            if path.suffix != SUFFIX or not KEY_ID.match(path.stem):
                continue
            stat = path.stat()
            found.append((stat.st_mtime, path.parent.name, path.stem, stat.st_size))
        for mtime, model, key_id, size in sorted(found):
            self._entries[(model, key_id)] = _Entry(size, mtime, mtime)
        self._expire()
        logger.info("key store %s: %d keys, %d bytes", self.root, len(self), self.total_bytes)

    def _live_entry(self, model: str, key_id: str) -> _Entry | None:
        if not KEY_ID.match(key_id):
            return None
        entry = self._entries.get((model, key_id))
        if entry is not None and self._clock() - entry.last_used > self.ttl_s:
            logger.info("keys %s of model %s expired", key_id[:12], model)
            self._remove(model, key_id)
            return None
        return entry

    def _expire(self) -> None:
        now = self._clock()
        for (model, key_id), entry in list(self._entries.items()):
            if now - entry.last_used > self.ttl_s:
                logger.info("keys %s of model %s expired", key_id[:12], model)
                self._remove(model, key_id)

    def _touch(self, model: str, key_id: str, entry: _Entry) -> None:
        now = self._clock()
        entry.last_used = now
        self._entries.move_to_end((model, key_id))
        if now - entry.touched >= TOUCH_INTERVAL_S:
            entry.touched = now
            try:
                os.utime(self._path(model, key_id), (now, now))
            except OSError as exc:  # the order survives in memory; only a restart loses it
                logger.warning("cannot record the use of keys %s: %s", key_id[:12], exc)

    def _remove(self, model: str, key_id: str, strict: bool = False) -> None:
        """Forget keys and unlink their file; ``strict`` raises when the unlink fails."""
        path = self._path(model, key_id)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.error("cannot delete keys %s: %s", path, exc.strerror)
            if strict:
                raise StorageError(
                    f"the key store cannot delete keys {key_id[:12]} of model {model}: "
                    f"{exc.strerror}; {_advice(exc.errno)}, then delete them again"
                ) from exc
        self._entries.pop((model, key_id), None)
        for listener in self._listeners:
            listener(model, key_id)

    def _path(self, model: str, key_id: str) -> Path:
        return self.root / model / f"{key_id}{SUFFIX}"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        kill = _die_halfway if os.environ.get(KILL_IN_WRITE_ENV) == "1" else None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, data, tmp_suffix=TMP_SUFFIX, before_write=kill)
        except OSError as exc:
            logger.error("cannot write keys %s: %s", path, exc.strerror)
            # The message goes to the client (507), so it names the key, not the server's path.
            raise StorageError(
                f"the key store cannot take keys {path.stem[:12]} of model {path.parent.name}: "
                f"{exc.strerror}; stored keys still work; {_advice(exc.errno)}, then retry "
                f"the upload"
            ) from exc


def _advice(code: int | None) -> str:
    """What to do about a failed key-store write, by its errno."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the server's operator must free space in the key store or raise its quota"
    if code == errno.EROFS:
        return "the key store is on a read-only file system: the operator must remount it"
    if code in (errno.EACCES, errno.EPERM):
        return "the server may not write to the key store: the operator must grant it"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "a file stands where the key store expects a folder: the operator must move it away"
    return "the server's operator must repair the key store (the log names the path)"


def _die_halfway(fd: int, view: memoryview) -> None:
    os.write(fd, view[: len(view) // 2])
    os.fsync(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _check_key_id(key_id: str) -> None:
    if not KEY_ID.match(key_id):
        raise UnknownKeyError(f"{key_id[:80]!r} is not a key id (64 lowercase hex characters)")


def _unknown(model: str, key_id: str) -> UnknownKeyError:
    return UnknownKeyError(
        f"no evaluation keys {key_id[:16]}... for model {model} (never uploaded, evicted or "
        f"expired): upload the evaluation keys again"
    )
