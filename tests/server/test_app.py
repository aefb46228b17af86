"""The app in-process on the plain backend: endpoints, error mapping, limits, metrics, logs."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from he_inference import wire
from he_inference.backends import make_backend
from he_inference.circuit import Circuit
from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input
from tests.he_inference.circuits import mlp_reference
from tests.server.apps import MODEL, OTHER, serve

Models = dict[str, tuple[Circuit, dict[str, np.ndarray]]]


def client_keys(circuit: Circuit, steps: tuple[int, ...] | None = None) -> Any:
    """A client-side plain context with keys for the circuit's rotation steps."""
    backend = make_backend("plain", circuit.params)
    backend.generate_keys(circuit.rotation_steps if steps is None else steps)
    return backend


def upload(http: Any, name: str, backend: Any) -> str:
    response = http.post(f"/v1/models/{name}/keys", content=wire.encode_evaluation_keys(backend))
    assert response.status_code in (200, 201), response.text
    return str(response.json()["key_id"])


def query(circuit: Circuit, backend: Any, x: np.ndarray, model: str = MODEL) -> bytes:
    return wire.encode_ciphertexts(backend, encrypt_input(circuit, backend, x), model=model)


def x_in_range(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(1, 12))


def assert_error(response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == error, body
    assert "Traceback" not in response.text
    return body


def assert_still_serves(http: Any, circuit: Circuit, backend: Any, key_id: str) -> None:
    x = x_in_range(99)
    response = http.post(
        f"/v1/models/{MODEL}/infer",
        content=query(circuit, backend, x),
        headers={"X-Key-Id": key_id},
    )
    assert response.status_code == 200, response.text
    cts = wire.decode_ciphertexts(backend, response.content, 4, model=MODEL)
    expected = Evaluator(circuit, backend).run(encrypt_input(circuit, backend, x))[0]
    np.testing.assert_allclose(
        decrypt_output(circuit, backend, cts), decrypt_output(circuit, backend, expected)
    )


# -- the happy path ---------------------------------------------------------------------


def test_listing_and_manifest_name_the_backend_and_hold_no_weights(
    tmp_path: Path, models: Models
) -> None:
    with serve(tmp_path) as http:
        listing = http.get("/v1/models").json()
        assert listing["backend"] == "plain"
        assert sorted(m["name"] for m in listing["models"]) == [MODEL, OTHER]
        manifest = http.get(f"/v1/models/{MODEL}").json()
    circuit = models[MODEL][0]
    assert manifest["backend"] == "plain"
    assert manifest["params"] == circuit.params.to_dict()
    assert manifest["rotation_steps"] == list(circuit.rotation_steps)
    text = json.dumps(manifest)
    assert "diagonals" not in text and "coefficients" not in text


def test_upload_is_idempotent_and_named_by_content_hash(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    envelope = wire.encode_evaluation_keys(client_keys(circuit))
    with serve(tmp_path) as http:
        first = http.post(f"/v1/models/{MODEL}/keys", content=envelope)
        again = http.post(f"/v1/models/{MODEL}/keys", content=envelope)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json() == {"key_id": wire.key_id(envelope)}
    stored = tmp_path / "keys" / MODEL / f"{wire.key_id(envelope)}.hek"
    assert stored.read_bytes() == envelope


def test_infer_matches_the_reference_and_reports_per_node_timings(
    tmp_path: Path, models: Models
) -> None:
    circuit, weights = models[MODEL]
    backend = client_keys(circuit)
    x = x_in_range(3)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(circuit, backend, x),
            headers={"X-Key-Id": key_id},
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    cts = wire.decode_ciphertexts(backend, response.content, 4, model=MODEL)
    got = decrypt_output(circuit, backend, cts)
    np.testing.assert_allclose(got.reshape(1, -1), mlp_reference(weights, x[None]), atol=1e-9)
    timings = json.loads(response.headers["x-he-timings"])
    assert [t["name"] for t in timings] == [node.name for node in circuit.nodes]
    assert float(response.headers["x-he-eval-seconds"]) >= sum(t["seconds"] for t in timings)


def test_restart_keeps_uploaded_keys(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
    with serve(tmp_path) as http:
        assert_still_serves(http, circuit, backend, key_id)


def test_health_readiness_and_metrics(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready", "models": 2}
        key_id = upload(http, MODEL, backend)
        assert_still_serves(http, circuit, backend, key_id)
        http.post(f"/v1/models/{MODEL}/infer", content=b"junk", headers={"X-Key-Id": key_id})
        text = http.get("/metrics").text
    assert 'endpoint="/v1/models/{name}/infer",method="POST",status="200"} 1.0' in text
    assert 'endpoint="/v1/models/{name}/infer",method="POST",status="400"} 1.0' in text
    assert 'he_inference_eval_seconds_count{model="mlp"} 1.0' in text
    assert "he_inference_queue_depth 0.0" in text
    size = (tmp_path / "keys" / MODEL / f"{key_id}.hek").stat().st_size
    assert f"he_inference_key_store_bytes {float(size)}" in text


def test_not_ready_without_models(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with serve(tmp_path) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 503


def test_one_info_line_per_request_with_ids_and_sizes_only(
    tmp_path: Path, models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        body = query(circuit, backend, x_in_range())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="server"):
            response = http.post(
                f"/v1/models/{MODEL}/infer",
                content=body,
                headers={"X-Key-Id": key_id, "X-Request-Id": "abc-123"},
            )
    lines = [r.getMessage() for r in caplog.records if r.name == "server.middleware"]
    assert len(lines) == 1
    line = lines[0]
    assert "id=abc-123" in line and f"model={MODEL}" in line and f"key={key_id[:12]}" in line
    assert f"in_bytes={len(body)}" in line and f"out_bytes={len(response.content)}" in line
    assert "status=200" in line and key_id not in line
    assert response.headers["x-request-id"] == "abc-123"


# -- refusals, each followed by a good request -------------------------------------------


def test_unknown_key_id_is_404(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        for bad in ("0" * 64, "not-a-key-id", "../../etc/passwd"):
            response = http.post(
                f"/v1/models/{MODEL}/infer",
                content=query(circuit, backend, x_in_range()),
                headers={"X-Key-Id": bad},
            )
            assert_error(response, 404, "UnknownKeyError")
        assert_still_serves(http, circuit, backend, key_id)


def test_bad_queries_are_400_and_the_server_keeps_serving(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        good = query(circuit, backend, x_in_range())
        url = f"/v1/models/{MODEL}/infer"
        cases = {
            "truncated": good[: len(good) // 2],
            "garbage": b"\x00" * 100,
            "empty": b"",
            "two ciphertexts": wire.encode_ciphertexts(
                backend, encrypt_input(circuit, backend, x_in_range()) * 2, model=MODEL
            ),
        }
        for name, body in cases.items():
            response = http.post(url, content=body, headers={"X-Key-Id": key_id})
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"] in ("MalformedPayloadError", "InputError"), name
        assert_error(http.post(url, content=good), 400, "InputError")  # no X-Key-Id
        assert_still_serves(http, circuit, backend, key_id)


def test_level_consumed_query_is_refused(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    cts = [backend.rescale(ct) for ct in encrypt_input(circuit, backend, x_in_range())]
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=wire.encode_ciphertexts(backend, cts, model=MODEL),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 400, "InputError")
        assert_still_serves(http, circuit, backend, key_id)


def test_oversized_bodies_are_413(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    envelope = wire.encode_evaluation_keys(backend)
    with serve(tmp_path, max_body_bytes=1000, max_key_bytes=len(envelope)) as http:
        key_id = upload(http, MODEL, backend)
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(circuit, backend, x_in_range()),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 413, "ServiceError")
        big = http.post(f"/v1/models/{MODEL}/keys", content=envelope + b"x")
        assert_error(big, 413, "ServiceError")


def test_too_many_ciphertexts_are_400(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    cts = encrypt_input(circuit, backend, x_in_range()) * 3
    with serve(tmp_path, max_ciphertexts=2) as http:
        key_id = upload(http, MODEL, backend)
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=wire.encode_ciphertexts(backend, cts, model=MODEL),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 400, "MalformedPayloadError")
        assert_still_serves(http, circuit, backend, key_id)


def test_ciphertexts_and_keys_for_another_model_are_refused(
    tmp_path: Path, models: Models
) -> None:
    circuit, other = models[MODEL][0], models[OTHER][0]
    backend, other_backend = client_keys(circuit), client_keys(other)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        # Same parameters, but the envelope names another model.
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(circuit, backend, x_in_range(), model=OTHER),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 409, "ParameterMismatchError")
        # Another model's parameters altogether.
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(other, other_backend, x_in_range()),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 409, "ParameterMismatchError")
        keys = http.post(
            f"/v1/models/{MODEL}/keys", content=wire.encode_evaluation_keys(other_backend)
        )
        assert_error(keys, 409, "ParameterMismatchError")
        assert_still_serves(http, circuit, backend, key_id)


def test_secret_key_uploads_are_refused(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    keys = backend.serialize_keys(["secret_key", "relin_keys", "galois_keys"])
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        # An envelope that names a secret_key, built by hand past the encoder's own refusal.
        named = _envelope(
            circuit, ["secret_key", "relin_keys"], [keys["secret_key"], keys["relin_keys"]]
        )
        assert_error(
            http.post(f"/v1/models/{MODEL}/keys", content=named), 400, "SecretKeyLeakError"
        )
        # The secret key smuggled in under an evaluation-key name does not load as one.
        disguised = _envelope(
            circuit, ["relin_keys", "galois_keys"], [keys["secret_key"], keys["galois_keys"]]
        )
        response = http.post(f"/v1/models/{MODEL}/keys", content=disguised)
        assert response.status_code == 400, response.text
        for refused in (named, disguised):
            assert not (tmp_path / "keys" / MODEL / f"{wire.key_id(refused)}.hek").exists()
        assert_still_serves(http, circuit, backend, key_id)


def _envelope(circuit: Circuit, names: list[str], blobs: list[bytes]) -> bytes:
    import msgpack

    header = msgpack.packb(
        {
            "version": wire.FORMAT_VERSION,
            "kind": wire.KIND_EVALUATION_KEYS,
            "backend": "plain",
            "library_version": "x",
            "params": circuit.params.fingerprint(),
            "model": None,
            "count": len(blobs),
            "sizes": [len(b) for b in blobs],
            "names": names,
        },
        use_bin_type=True,
    )
    return (
        wire.PREFIX.pack(wire.MAGIC, wire.FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    )


def test_keys_missing_rotation_steps_are_refused(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    short = client_keys(circuit, circuit.rotation_steps[1:])
    with serve(tmp_path) as http:
        response = http.post(
            f"/v1/models/{MODEL}/keys", content=wire.encode_evaluation_keys(short)
        )
        body = assert_error(response, 400, "KeyError_")
        assert "rotation steps" in body["detail"]


def test_unknown_model_and_route_are_404(tmp_path: Path, models: Models) -> None:
    with serve(tmp_path) as http:
        assert_error(http.get("/v1/models/nope"), 404, "ServiceError")
        assert_error(http.post("/v1/models/nope/keys", content=b"x"), 404, "ServiceError")
        assert_error(http.get("/v2/else"), 404, "NotFound")
        assert http.get(f"/v1/models/{MODEL}").status_code == 200


def test_deleted_keys_are_gone(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)
        assert http.delete(f"/v1/models/{MODEL}/keys/{key_id}").status_code == 200
        assert_error(http.delete(f"/v1/models/{MODEL}/keys/{key_id}"), 404, "UnknownKeyError")
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(circuit, backend, x_in_range()),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 404, "UnknownKeyError")


def test_unexpected_errors_are_a_generic_500(
    tmp_path: Path, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    with serve(tmp_path) as http:
        key_id = upload(http, MODEL, backend)

        def broken(*args: object) -> None:
            raise RuntimeError("internal detail /srv/secret/path")

        service = http.app.state.service  # type: ignore[attr-defined]
        monkeypatch.setattr(service, "infer", broken)
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(circuit, backend, x_in_range()),
            headers={"X-Key-Id": key_id},
        )
        body = assert_error(response, 500, "InternalServerError")
        assert "/srv/secret" not in response.text and "RuntimeError" not in response.text
        assert response.headers["x-request-id"] in body["detail"]
        monkeypatch.undo()
        assert_still_serves(http, circuit, backend, key_id)


def test_full_queue_answers_503_with_retry_after(
    tmp_path: Path, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    body = query(circuit, backend, x_in_range())
    with serve(tmp_path, max_concurrency=1, max_queue=0, retry_after_s=7) as http:
        key_id = upload(http, MODEL, backend)
        service = http.app.state.service  # type: ignore[attr-defined]
        real_infer = service.infer
        started, release = threading.Event(), threading.Event()

        def slow(*args: Any) -> Any:
            started.set()
            release.wait(10)
            return real_infer(*args)

        monkeypatch.setattr(service, "infer", slow)
        results: list[Any] = []
        url, headers = f"/v1/models/{MODEL}/infer", {"X-Key-Id": key_id}
        worker = threading.Thread(
            target=lambda: results.append(http.post(url, content=body, headers=headers))
        )
        worker.start()
        assert started.wait(10)
        busy = http.post(url, content=body, headers=headers)
        release.set()
        worker.join(10)
        assert_error(busy, 503, "OverloadedError")
        assert busy.headers["retry-after"] == "7"
        assert results[0].status_code == 200
        monkeypatch.undo()
        assert_still_serves(http, circuit, backend, key_id)


def test_evicted_keys_leave_memory_too_and_answer_404(tmp_path: Path, models: Models) -> None:
    circuit, other = models[MODEL][0], models[OTHER][0]
    backend, other_backend = client_keys(circuit), client_keys(other)
    size = len(wire.encode_evaluation_keys(backend))
    with serve(tmp_path, key_store_cap_bytes=size + 10) as http:
        key_id = upload(http, MODEL, backend)
        service = http.app.state.service  # type: ignore[attr-defined]
        assert len(service.contexts) == 1
        upload(http, OTHER, other_backend)  # over the cap: the mlp keys go
        assert len(service.contexts) == 1 and not service.store.contains(MODEL, key_id)
        response = http.post(
            f"/v1/models/{MODEL}/infer",
            content=query(circuit, backend, x_in_range()),
            headers={"X-Key-Id": key_id},
        )
        assert_error(response, 404, "UnknownKeyError")
