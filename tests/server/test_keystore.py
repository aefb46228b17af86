"""The key store: atomic writes, the size cap with LRU eviction, the TTL, restarts."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from he_inference.errors import ServiceError, UnknownKeyError
from server.keystore import KeyStore


class Clock:
    """A settable clock for TTL and LRU tests."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def kid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store(
    root: Path, cap: int = 1000, ttl: float = 3600.0, clock: Clock | None = None
) -> KeyStore:
    return KeyStore(root, cap, ttl, clock=clock or Clock())


def test_put_writes_the_whole_file_owner_only_and_leaves_no_temporary(tmp_path: Path) -> None:
    keys = store(tmp_path)
    data = b"k" * 300
    keys.put("m", kid(data), data)
    path = tmp_path / "m" / f"{kid(data)}.hek"
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "m").iterdir()] == [path.name]
    assert keys.read("m", kid(data)) == data and keys.total_bytes == 300


def test_put_is_idempotent(tmp_path: Path) -> None:
    keys = store(tmp_path)
    data = b"same"
    keys.put("m", kid(data), data)
    keys.put("m", kid(data), data)
    assert len(keys) == 1 and keys.total_bytes == 4


def test_least_recently_used_keys_are_evicted_at_the_cap(tmp_path: Path) -> None:
    clock = Clock()
    keys = store(tmp_path, cap=1000, clock=clock)
    removed: list[tuple[str, str]] = []
    keys.on_remove(lambda model, key_id: removed.append((model, key_id)))
    a, b, c = b"a" * 400, b"b" * 400, b"c" * 400
    keys.put("m", kid(a), a)
    clock.now += 1
    keys.put("m", kid(b), b)
    clock.now += 1
    keys.read("m", kid(a))  # a is now the most recently used
    clock.now += 1
    keys.put("m", kid(c), c)
    assert removed == [("m", kid(b))]
    assert keys.contains("m", kid(a)) and keys.contains("m", kid(c))
    assert not (tmp_path / "m" / f"{kid(b)}.hek").exists()
    with pytest.raises(UnknownKeyError, match="upload the evaluation keys again"):
        keys.read("m", kid(b))
    assert keys.total_bytes == 800


def test_keys_larger_than_the_cap_are_refused(tmp_path: Path) -> None:
    keys = store(tmp_path, cap=10)
    with pytest.raises(ServiceError) as info:
        keys.put("m", kid(b"x" * 11), b"x" * 11)
    assert info.value.status_code == 413


def test_keys_expire_after_the_ttl_since_last_use(tmp_path: Path) -> None:
    clock = Clock()
    keys = store(tmp_path, ttl=100.0, clock=clock)
    data = b"ttl"
    keys.put("m", kid(data), data)
    clock.now += 90
    assert keys.read("m", kid(data)) == data  # a use restarts the clock
    clock.now += 90
    assert keys.contains("m", kid(data))
    clock.now += 101
    assert not keys.contains("m", kid(data))
    assert not (tmp_path / "m" / f"{kid(data)}.hek").exists()


def test_restart_keeps_keys_and_deletes_interrupted_writes(tmp_path: Path) -> None:
    data = b"persist"
    store(tmp_path).put("m", kid(data), data)
    leftover = tmp_path / "m" / f".{kid(b'half')}.1234abcd.tmp"
    leftover.write_bytes(b"half a key")
    stray = tmp_path / "m" / "notes.txt"
    stray.write_text("not a key")

    reopened = store(tmp_path)
    assert reopened.read("m", kid(data)) == data
    assert not leftover.exists()
    assert len(reopened) == 1 and reopened.total_bytes == len(data)


def test_restart_expires_keys_by_their_recorded_last_use(tmp_path: Path) -> None:
    clock = Clock()
    data = b"old"
    store(tmp_path, clock=clock).put("m", kid(data), data)
    path = tmp_path / "m" / f"{kid(data)}.hek"
    os.utime(path, (clock.now - 7200, clock.now - 7200))
    reopened = store(tmp_path, ttl=3600.0, clock=clock)
    assert len(reopened) == 0 and not path.exists()


def test_restart_keeps_the_lru_order_from_file_times(tmp_path: Path) -> None:
    clock = Clock()
    a, b = b"a" * 400, b"b" * 400
    first = store(tmp_path, clock=clock)
    first.put("m", kid(a), a)
    first.put("m", kid(b), b)
    os.utime(tmp_path / "m" / f"{kid(a)}.hek", (clock.now - 10, clock.now - 10))
    os.utime(tmp_path / "m" / f"{kid(b)}.hek", (clock.now - 20, clock.now - 20))
    reopened = store(tmp_path, clock=clock)
    c = b"c" * 400
    reopened.put("m", kid(c), c)
    assert reopened.contains("m", kid(a)) and not reopened.contains("m", kid(b))


def test_malformed_key_ids_never_touch_the_disk(tmp_path: Path) -> None:
    keys = store(tmp_path)
    for bad in ("../../etc/passwd", "A" * 64, "", "0" * 63):
        assert not keys.contains("m", bad)
        with pytest.raises(UnknownKeyError):
            keys.read("m", bad)
        with pytest.raises(UnknownKeyError):
            keys.put("m", bad, b"x")
