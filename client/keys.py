"""The client's key folder: the secret key stays here, owner-only, and is never sent.

Layout: ``<key_dir>/<model>/<params fingerprint>/`` holds ``secret_key`` and ``public_key``
(the library's own serialisation), ``evaluation_keys.hew`` (the wire envelope that is
uploaded, kept so that a re-upload sends the same bytes and so gets the same key id) and
``keys.json`` (backend, rotation steps, key id and the servers that hold the keys). Folders
are 0700 and files 0600, set explicitly rather than trusted to the umask; every file is
written to a temporary name and renamed, so an interrupted write never leaves half a key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from he_inference.errors import StorageError
from he_inference.files import write_private

logger = logging.getLogger(__name__)

DEFAULT_KEY_DIR = Path("~/.he-inference/keys")
SECRET_FILES = ("secret_key", "public_key")
ENVELOPE_FILE = "evaluation_keys.hew"
META_FILE = "keys.json"


@dataclass
class KeyRecord:
    """What ``keys.json`` remembers about one key set."""

    backend: str
    rotation_steps: list[int]
    key_id: str
    created: float = field(default_factory=time.time)
    uploaded_to: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


class KeyFolder:
    """The files of one model's key set for one parameter fingerprint."""

    def __init__(self, key_dir: Path, model: str, fingerprint: str) -> None:
        self.root = Path(key_dir).expanduser()
        self.path = self.root / model / fingerprint

    def exists(self) -> bool:
        """Whether a complete key set is stored here."""
        names = (*SECRET_FILES, ENVELOPE_FILE, META_FILE)
        return all((self.path / name).is_file() for name in names)

    def load(self) -> tuple[dict[str, bytes], bytes, KeyRecord]:
        """The secret and public keys, the evaluation-key envelope and the record.

        Raises:
            StorageError: a file is missing, unreadable or not private to its owner.
        """
        try:
            keys = {}
            for name in SECRET_FILES:
                path = self.path / name
                mode = path.stat().st_mode & 0o777
                if mode & 0o077:
                    raise StorageError(
                        f"{path} is readable by others (mode {mode:o}): it holds a secret "
                        f"key; run chmod 600 on it, or delete the folder to make new keys"
                    )
                keys[name] = path.read_bytes()
            envelope = (self.path / ENVELOPE_FILE).read_bytes()
            record = KeyRecord(**json.loads((self.path / META_FILE).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise StorageError(f"cannot read the keys in {self.path}: {exc}") from exc
        return keys, envelope, record

    def save(self, secret: dict[str, bytes], envelope: bytes, record: KeyRecord) -> None:
        """Write a new key set (secret files last-but-one, the record last).

        Raises:
            StorageError: the folder cannot be written.
        """
        try:
            self._make_private_dirs()
            for name, data in secret.items():
                write_private(self.path / name, data)
            write_private(self.path / ENVELOPE_FILE, envelope)
            self.save_record(record)
        except OSError as exc:
            raise StorageError(f"cannot write keys to {self.path}: {exc.strerror}") from exc
        logger.info("saved keys for %s in %s", record.key_id[:12], self.path)

    def save_record(self, record: KeyRecord) -> None:
        """Rewrite ``keys.json`` (after an upload)."""
        write_private(self.path / META_FILE, json.dumps(record.to_dict(), indent=1).encode())

    def _make_private_dirs(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = self.path
        while True:  # the model folder and the key root too, not only the leaf
            os.chmod(folder, 0o700)
            if folder == self.root or folder.parent == folder:
                break
            folder = folder.parent
