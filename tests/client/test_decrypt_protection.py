"""Decryption-result protection on the client: noise flooding, and what it keeps to itself.

CKKS decryption returns the message plus the noise, and that noise is a function of the
secret key: anyone who gets a decrypted result at full precision together with its
ciphertext can recover the key (Li and Micciancio, EUROCRYPT 2021). The server holds every
ciphertext. On OpenFHE the client therefore decrypts with noise flooding: the compiler
measures the circuit's output noise (compiler/flooding.py), the manifest publishes it in the
CKKS parameters, and the client's context, built from them, adds a Gaussian that hides the
ciphertext's own noise. These tests show that a real OpenFHE server and a client built from
its manifest agree on it, that results still decrypt to the precision the manifest states,
and that every decryption of one result draws fresh flooding noise of the published size.
SEAL has no flooding decryption, so on every backend the client also never hands a
decrypted value back: decrypted values go to the caller only, never into a request, and
only the output layout's slots are decoded, so spare slots never reach the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from client import Client
from client.model import Model
from compiler.flooding import add_noise_flooding
from he_inference import wire
from he_inference.circuit import Circuit
from tests.conftest import require_backend
from tests.he_inference.circuits import mlp_circuit, mlp_reference
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


# -- noise flooding over a real OpenFHE server --------------------------------------------


@dataclass
class Flooded:
    """An OpenFHE server over a flooding circuit, and a client model built from its manifest."""

    http: httpx.Client
    circuit: Circuit
    weights: dict[str, np.ndarray]
    model: Model
    manifest: dict[str, object]


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flooded]:
    require_backend("openfhe")
    root = tmp_path_factory.mktemp("flooded")
    plain, weights = mlp_circuit(np.random.default_rng(11), degree=3)
    calibration = np.random.default_rng(5).uniform(-1, 1, size=(4, 1, 12))
    circuit = add_noise_flooding(plain, calibration)
    (root / "models").mkdir()
    circuit.save(root / "models" / f"{MODEL}.hec")
    with serve(root, backend="openfhe") as http:
        manifest = http.get(f"/v1/models/{MODEL}").json()
        model = Client("http://testserver", key_dir=root / "c", http=http).model(MODEL)
        yield Flooded(http, circuit, weights, model, manifest)


def test_the_manifest_publishes_the_noise_estimate(flooded: Flooded) -> None:
    flooding = flooded.circuit.params.noise_flooding
    assert flooding is not None
    params = flooded.manifest["params"]
    assert isinstance(params, dict)
    assert params["noise_flooding"] == flooding.to_dict()
    assert params["scale_bits"] == 59
    # The client's context is the server's: same parameters, noise estimate included.
    assert flooded.model.params == flooded.circuit.params
    assert flooded.model.noise_flooding
    details = flooded.circuit.metadata["noise_flooding"]
    assert details["precision_bits"] > 20
    degree = flooded.circuit.params.poly_modulus_degree
    assert details["without_flooding"]["poly_modulus_degree"] < degree


def test_a_client_from_the_manifest_decrypts_flooded_results_to_their_precision(
    flooded: Flooded,
) -> None:
    x = np.random.default_rng(21).uniform(-1, 1, size=(1, 12))
    logits = flooded.model.predict(x)
    expected = mlp_reference(flooded.weights, x)
    flooding = flooded.circuit.params.noise_flooding
    assert flooding is not None
    # Eight standard deviations of the flooding, which dwarfs the evaluation's error at 2^59.
    noise = flooding.slot_noise(flooded.circuit.params.poly_modulus_degree)
    assert np.max(np.abs(logits.reshape(expected.shape) - expected)) < 8 * noise


def test_decryptions_of_one_result_differ_by_the_flooding_noise(flooded: Flooded) -> None:
    model = flooded.model
    key_id = model.upload_keys()
    x = np.random.default_rng(22).uniform(-1, 1, size=(1, 12))
    response = flooded.http.post(
        f"/v1/models/{MODEL}/infer",
        content=model.encrypt(x),
        headers={"content-type": "application/octet-stream", "x-key-id": key_id},
    )
    assert response.status_code == 200, response.text
    assert not np.array_equal(model.decrypt(response.content), model.decrypt(response.content))

    # Over every slot: two decryptions differ by two independent draws of the flooding.
    backend = model._keys()[0]
    chunks = model.output_layout.chunks
    (ct,) = wire.decode_ciphertexts(backend, response.content, chunks, model=MODEL)[:1]
    first, second = backend.decrypt(ct), backend.decrypt(ct)
    flooding = flooded.circuit.params.noise_flooding
    assert flooding is not None
    params = flooded.circuit.params
    noise = flooding.slot_noise(params.poly_modulus_degree)
    spread = float(np.std(first - second)) / math.sqrt(2)
    assert 0.7 * noise < spread < 1.4 * noise
    # Far above the ciphertext's own noise, which is all a plain decryption would vary by.
    own = 2.0 ** (flooding.noise_bits - params.scale_bits) * math.sqrt(params.poly_modulus_degree)
    assert spread > 1000 * own


def test_an_openfhe_circuit_from_before_flooding_loads_with_plain_decryption(
    caplog: pytest.LogCaptureFixture,
) -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(11), degree=3)
    circuit.metadata["backend"] = "openfhe"
    with caplog.at_level(logging.WARNING, logger="he_inference.circuit"):
        loaded = Circuit.from_bytes(circuit.to_bytes())
    assert loaded.params.noise_flooding is None
    assert "before noise-flooding" in caplog.text
    caplog.clear()
    circuit.metadata["noise_flooding"] = "off"  # what compiling with flooding off records
    with caplog.at_level(logging.WARNING, logger="he_inference.circuit"):
        Circuit.from_bytes(circuit.to_bytes())
    assert "before noise-flooding" not in caplog.text
