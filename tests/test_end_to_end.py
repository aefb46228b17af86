"""A real server process over HTTP on SEAL and OpenFHE: the whole product, as a user runs it.

``he-infer serve`` runs in a subprocess on a free 127.0.0.1 port; the SDK generates keys,
uploads the evaluation keys, and classifies held-out digits with the compiled digits CNN,
compared with onnxruntime on the same inputs. The server is then sent bad requests (each
must be a 4xx and leave it serving) and restarted on the same key store, after which the
same key id must still answer. Every request body the client sent, and every file the key
store holds, is searched for the client's serialised secret key.

Without the compiler or the model zoo, a small hand-built circuit stands in for the CNN.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from client import Client
from he_inference.circuit import Circuit
from he_inference.errors import (
    HEInferenceError,
    InputError,
    MalformedPayloadError,
    ParameterMismatchError,
    ServiceError,
    UnknownKeyError,
)
from tests.servers import free_port, serve_process

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "zoo"
# Held-out digits per backend, packed into one ciphertext (throughput mode) so that each
# check costs one evaluation: about 3 s on SEAL, and on OpenFHE some 15 s at N=32768 (the
# ring noise-flooding decryption needs; the whole test took 83 s on two busy cores).
DIGITS = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _workload(backend: str) -> tuple[Circuit, np.ndarray, np.ndarray]:
    """The circuit, some queries, and their plaintext outputs (onnxruntime or numpy)."""
    try:
        from compiler import compile_model
    except ImportError:
        compile_model = None
    onnx_path = ZOO / "digits_cnn_square.onnx"
    if compile_model is not None and onnx_path.is_file() and (ZOO / "digits.npz").is_file():
        import onnxruntime

        data = np.load(ZOO / "digits.npz")
        circuit = compile_model(
            onnx_path, data["x_calib"], name="digits", batch=DIGITS, backend=backend
        )
        x = data["x_test"][:DIGITS].astype(np.float64)
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        expected = np.concatenate(
            [session.run(None, {feed: x[i : i + 1].astype(np.float32)})[0] for i in range(DIGITS)]
        )
        return circuit, x, expected.reshape(DIGITS, -1)
    from tests.he_inference.circuits import mlp_circuit, mlp_reference

    circuit, weights = mlp_circuit(np.random.default_rng(31), degree=3, batch=DIGITS)
    x = np.random.default_rng(32).uniform(-1, 1, size=(DIGITS, 12))
    return circuit, x, mlp_reference(weights, x)


@contextmanager
def server_process(
    models: Path, key_store: Path, backend: str, port: int, log: Path
) -> Iterator[str]:
    """``he-infer serve`` in a subprocess, ready when /readyz answers 200."""
    arguments = [
        "--models",
        str(models),
        "--key-store",
        str(key_store),
        "--backend",
        backend,
        "--max-body-mb",
        "8",
    ]
    with serve_process(arguments, port, log) as (url, _):
        yield url


def _windows(secret: bytes, width: int = 64) -> list[bytes]:
    """High-entropy substrings of the secret key: any one found in a body means a leak.

    A serialised key starts and ends with structure that every object of the context shares
    (format tags, the moduli), which a ciphertext legitimately repeats; the windows come from
    the coefficients in between, and only those with many distinct bytes count.
    """
    starts = np.linspace(len(secret) // 20, len(secret) * 19 // 20 - width, 16).astype(int)
    windows = [secret[s : s + width] for s in starts.tolist()]
    windows = [w for w in windows if len(set(w)) >= 28]
    assert len(windows) >= 4, "the secret key does not look like random coefficients"
    return windows


def _expect(error: type[HEInferenceError], call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(error):
        call(*args, **kwargs)


def test_encrypted_inference_over_http(real_backend_name: str, tmp_path: Path) -> None:
    circuit, x, expected = _workload(real_backend_name)
    models, key_store = tmp_path / "models", tmp_path / "server-keys"
    models.mkdir()
    circuit.save(models / f"{circuit.name}.hec")
    port, log = free_port(), tmp_path / "server.log"
    sent: list[httpx.Request] = []

    def connect(url: str) -> tuple[Client, httpx.Client]:
        http = httpx.Client(base_url=url, timeout=300, event_hooks={"request": [sent.append]})
        return Client(url, key_dir=tmp_path / "client-keys", http=http, progress=False), http

    with server_process(models, key_store, real_backend_name, port, log) as url:
        server, http = connect(url)
        model = server.model(circuit.name)
        assert model.backend_name == real_backend_name
        info = model.generate_keys()
        assert info.generated
        key_id = model.upload_keys()

        # Bad requests first: each a 4xx, and the prediction after them shows it still serves.
        query = model.encrypt(x)
        infer = f"/v1/models/{model.name}/infer"
        headers = {"x-key-id": key_id}
        half = query[: len(query) // 2]
        _expect(
            MalformedPayloadError, server.request, "POST", infer, content=half, headers=headers
        )
        _expect(
            UnknownKeyError,
            server.request,
            "POST",
            infer,
            content=query,
            headers={"x-key-id": "f" * 64},
        )
        _expect(InputError, server.request, "POST", infer, content=query)
        _expect(
            MalformedPayloadError,
            server.request,
            "POST",
            f"/v1/models/{model.name}/keys",
            content=b"HEIW" + b"\xff" * 64,
        )
        wrong_model = query.replace(model.name.encode(), b"x" * len(model.name), 1)
        _expect(
            ParameterMismatchError,
            server.request,
            "POST",
            infer,
            content=wrong_model,
            headers=headers,
        )
        _expect(ServiceError, server.request, "GET", "/v1/models/no-such-model")
        with pytest.raises(ServiceError) as too_big:
            server.request("POST", infer, content=b"\0" * (9 << 20), headers=headers)
        assert too_big.value.status_code in (413, 500)  # 413, or the connection cut at once

        got = model.predict(x)
        # CKKS at scale 2^40 keeps about 1e-6 relative error; the square activation is
        # exact, so what remains is the float32 of onnxruntime and the encoding noise.
        np.testing.assert_allclose(got, expected, atol=1e-2 * np.abs(expected).max())
        assert np.array_equal(got.argmax(1), expected.argmax(1))
        assert len(model.last_stats) == 1  # all digits in one ciphertext
        http.close()

    # A restart on the same key store and port: the same key id answers, nothing re-sent.
    uploads = sum(r.url.path.endswith("/keys") for r in sent)
    with server_process(models, key_store, real_backend_name, port, log) as url:
        server, http = connect(url)
        again = server.model(circuit.name)
        assert not again.generate_keys().generated and again.key_id == key_id
        np.testing.assert_allclose(again.predict(x), expected, atol=1e-2 * np.abs(expected).max())
        http.close()
    assert sum(r.url.path.endswith("/keys") for r in sent) == uploads  # none after restart

    # The secret key never left the client: not in a request, not in the key store.
    secret = (model.folder.path / "secret_key").read_bytes()
    assert len(secret) > 1000
    windows = _windows(secret)
    for request in sent:
        assert not any(w in request.content for w in windows), request.url
    stored = list(key_store.rglob("*.hek"))
    assert [p.stem for p in stored] == [key_id]
    for path in stored:
        content = path.read_bytes()
        assert not any(w in content for w in windows), path
