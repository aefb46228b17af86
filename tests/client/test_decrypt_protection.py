"""Decryption-result protection on the client: what it keeps to itself after decrypting.

CKKS decryption returns the message plus the noise, and that noise is a function of the
secret key: anyone who gets a decrypted result at full precision together with its
ciphertext can recover the key (Li and Micciancio, EUROCRYPT 2021). The server holds every
ciphertext, so the client must never hand a decrypted value back. OpenFHE's noise-flooding
decryption is not used (the reason is next to ``OpenFheBackend.decrypt``); these tests show
the client's part instead: decrypted values go to the caller only, never into a request,
and only the output layout's slots are decoded, so spare slots never reach the caller.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from client import Client
from he_inference import wire
from tests.server.apps import MODEL, serve


def test_decrypted_outputs_never_go_into_a_request(tmp_path: Path, models: object) -> None:
    sent: list[httpx.Request] = []
    with serve(tmp_path) as http:
        http.event_hooks = {"request": [sent.append], "response": []}
        model = Client("http://testserver", key_dir=tmp_path / "c", http=http).model(MODEL)
        first = model.predict(np.random.default_rng(1).uniform(-1, 1, size=(2, 1, 12)))
        model.predict(np.random.default_rng(2).uniform(-1, 1, size=(2, 1, 12)))
    forms = [np.float64(v).tobytes() for v in first.ravel()]
    forms += [repr(float(v)).encode() for v in first.ravel()]
    for request in sent:
        assert not any(f in request.content for f in forms), request.url
        assert not any(f in str(request.url).encode() for f in forms)
    kinds = {(r.method, r.url.path.rsplit("/", 1)[-1]) for r in sent}
    assert kinds <= {("GET", MODEL), ("POST", "keys"), ("POST", "infer")}


def test_only_the_output_layout_slots_are_decoded(tmp_path: Path, models: object) -> None:
    with serve(tmp_path) as http:
        model = Client("http://testserver", key_dir=tmp_path / "c", http=http).model(MODEL)
        backend = model._keys()[0]
    slots = model.params.slots
    layout = model.output_layout
    values = np.full(layout.chunks * slots, 7.0)  # a server that fills every spare slot
    values[layout.slot_indices(slots)] = 0.25
    cts = [backend.encrypt(v) for v in values.reshape(layout.chunks, slots)]
    decoded = model.decrypt(wire.encode_ciphertexts(backend, cts, model=MODEL))
    assert decoded.shape == (layout.batch, *layout.shape)
    assert np.all(decoded == 0.25)
