"""What the server learns: a full SDK session on SEAL, with every log record and byte kept.

The server, its key store and its logs must never hold a plaintext input, a decrypted result
or the secret key; the secret key must never be in a request; and a result ciphertext must
carry nothing but the outputs (every slot outside the output layout decrypts to noise), so
that a client learns nothing of the model's intermediate values through spare slots.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from client import Client
from client.model import Model
from tests.conftest import require_backend
from tests.server.apps import MODEL, serve, write_models
from tests.test_end_to_end import _windows

pytestmark = pytest.mark.seal


class Session:
    """One client's whole session against an in-process SEAL server."""

    def __init__(self, model: Model, sent: list[httpx.Request], x: np.ndarray[Any, Any]) -> None:
        self.model = model
        self.sent = sent
        self.x = x
        self.outputs = model.predict(x)
        self.secret = (model.folder.path / "secret_key").read_bytes()
        body = model.encrypt(x)
        self.result = model.client.request(
            "POST", f"/v1/models/{MODEL}/infer", content=body, headers={"x-key-id": model.key_id}
        ).content


@pytest.fixture(scope="module")
def session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Session, str, Path]]:
    require_backend("seal")
    root = tmp_path_factory.mktemp("privacy")
    write_models(root / "models")
    sent: list[httpx.Request] = []
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with serve(root, backend="seal") as http:
            http.event_hooks = {"request": [sent.append], "response": []}
            client = Client(
                "http://testserver", key_dir=root / "client", http=http, progress=False
            )
            x = np.random.default_rng(21).uniform(-1, 1, size=(1, 12))
            result = Session(client.model(MODEL), sent, x)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in records)
    assert "stored keys" in text  # the server's own lines were captured
    yield result, text, root / "keys"


def _value_forms(values: np.ndarray[Any, Any]) -> list[str]:
    """How a value would look if printed: its repr and six decimals."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return [repr(float(v)) for v in flat] + [f"{v:.6f}" for v in flat]


def test_logs_hold_no_input_output_or_secret_key(session: tuple[Session, str, Path]) -> None:
    result, text, _ = session
    for form in _value_forms(result.x) + _value_forms(result.outputs):
        assert form not in text, form
    for window in _windows(result.secret):
        for encoded in (window.hex(), base64.b64encode(window).decode(), repr(window)[2:40]):
            assert encoded not in text


def test_key_store_holds_only_evaluation_keys(session: tuple[Session, str, Path]) -> None:
    result, _, store = session
    files = [p for p in store.rglob("*") if p.is_file()]
    assert [p.name for p in files] == [f"{result.model.key_id}.hek"]
    values = [
        np.float64(v).tobytes() for v in np.concatenate([result.x.ravel(), result.outputs.ravel()])
    ]
    for path in files:
        content = path.read_bytes()
        assert not any(w in content for w in _windows(result.secret)), path
        assert not any(v in content for v in values), path


def test_secret_key_and_plaintexts_never_leave_the_client(
    session: tuple[Session, str, Path],
) -> None:
    result, _, _ = session
    windows = _windows(result.secret)
    plain = [np.float64(v).tobytes() for v in result.x.ravel()]
    # Eight-byte doubles only: a four-byte float32 pattern turns up by chance in tens of MB
    # of Galois keys.
    plain += [np.float64(v).tobytes() for v in result.outputs.ravel()]
    assert {(r.method, r.url.path.rsplit("/", 1)[-1]) for r in result.sent} <= {
        ("GET", MODEL),
        ("POST", "keys"),
        ("POST", "infer"),
    }
    for request in result.sent:
        assert not any(w in request.content for w in windows), request.url
        assert not any(p in request.content for p in plain), request.url


def test_result_slots_outside_the_output_layout_are_zero(
    session: tuple[Session, str, Path],
) -> None:
    result, _, _ = session
    model = result.model
    backend = model._keys()[0]
    from he_inference import wire

    cts = wire.decode_ciphertexts(backend, result.result, 4, model=MODEL)
    slots = model.params.slots
    raw = np.concatenate([backend.decrypt(ct) for ct in cts])
    used = np.zeros(raw.size, dtype=bool)
    used[model.output_layout.slot_indices(slots)] = True
    assert np.abs(raw[used]).max() > 0.05  # the outputs are there
    # CKKS at scale 2^40 leaves noise near 2^-20 after the rescales; 1e-4 is far above it
    # and far below any value the model computes.
    assert np.abs(raw[~used]).max() < 1e-4
