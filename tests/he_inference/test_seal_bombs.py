"""A SEAL ciphertext whose compressed body inflates far past any real one is refused cheaply."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from he_inference.errors import MalformedPayloadError
from he_inference.params import CkksParameters
from tests.conftest import require_backend

pytestmark = pytest.mark.seal


def test_zstd_bomb_is_refused_before_seal_inflates_it() -> None:
    require_backend("seal")
    import zstandard

    from he_inference.backends.seal import SealBackend

    backend = SealBackend(CkksParameters(8192, (60, 40, 40, 60), 40))
    backend.generate_keys([])
    valid = backend.serialize_ciphertext(backend.encrypt(np.zeros(4)))
    header = bytearray(valid[:16])
    body = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    struct.pack_into("<Q", header, 8, 16 + len(body))  # the header's total size field
    header[5] = 2  # the compression mode: zstd
    bomb = bytes(header) + body

    tracemalloc.start()
    with pytest.raises(MalformedPayloadError, match="inflates beyond"):
        backend.load_ciphertext(bomb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Inflation stops just past the context's largest ciphertext (under 1 MB here), not at
    # the 64 MiB the bomb holds.
    assert peak < 16 << 20
    assert backend.load_ciphertext(valid) is not None
