"""Optional API tokens: 401 without one, per-token query budgets and rate limits (429)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client import Client
from he_inference.cli import _server_settings
from he_inference.errors import ServiceError
from server import create_app
from server.auth import TokenBucket, TokenGuard
from tests.server.apps import MODEL, serve
from tests.server.test_app import client_keys, query, upload, x_in_range

TOKENS = {"alice-token-1234567890": "alice", "bob-token-0987654321": "bob"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_tokens_configured_the_service_is_open(tmp_path: Path, models: object) -> None:
    with serve(tmp_path) as http:
        assert http.get("/v1/models").status_code == 200


def test_every_endpoint_but_the_probes_needs_a_valid_token(tmp_path: Path, models: object) -> None:
    with serve(tmp_path, api_tokens=TOKENS) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Basic abc"}, bearer("not-a-token")):
            response = http.get("/v1/models", headers=headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "not-a-token" not in response.text
        assert http.get("/v1/no-such-path").status_code == 401  # no probing without a token
        assert http.get("/v1/models", headers=bearer("alice-token-1234567890")).status_code == 200
        assert http.get(f"/v1/models/{MODEL}", headers=bearer("bob-token-0987654321")).is_success


def test_query_budget_counts_answered_queries_per_token(
    tmp_path: Path, models: dict[str, tuple[object, object]]
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)  # type: ignore[arg-type]
    body = query(circuit, backend, x_in_range())  # type: ignore[arg-type]
    alice, bob = bearer("alice-token-1234567890"), bearer("bob-token-0987654321")
    with serve(tmp_path, api_tokens=TOKENS, max_queries_per_token=2) as http:
        http.headers.update(alice)
        key_id = upload(http, MODEL, backend)
        infer = f"/v1/models/{MODEL}/infer"
        # A refused query (unknown key) is not an answer and costs nothing.
        assert http.post(infer, content=body, headers={"x-key-id": "f" * 64}).status_code == 404
        for _ in range(2):
            assert http.post(infer, content=body, headers={"x-key-id": key_id}).status_code == 200
        spent = http.post(infer, content=body, headers={"x-key-id": key_id})
        assert spent.status_code == 429 and "budget of 2" in spent.json()["detail"]
        assert "retry-after" not in spent.headers  # waiting does not refill a budget
        # Other tokens keep their own budget; other endpoints stay open to alice.
        again = {**bob, "x-key-id": key_id}
        assert http.post(infer, content=body, headers=again).status_code == 200
        assert http.get(f"/v1/models/{MODEL}").status_code == 200
        assert app_guard(http).used("alice") == 2


def app_guard(http: object) -> TokenGuard:
    guard = http.app.state.token_guard  # type: ignore[attr-defined]
    assert isinstance(guard, TokenGuard)
    return guard


def test_rate_limit_is_a_429_with_retry_after(
    tmp_path: Path, models: dict[str, tuple[object, object]]
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)  # type: ignore[arg-type]
    body = query(circuit, backend, x_in_range())  # type: ignore[arg-type]
    with serve(tmp_path, api_tokens=TOKENS, token_rate_per_s=0.01, token_burst=2) as http:
        http.headers.update(bearer("alice-token-1234567890"))
        key_id = upload(http, MODEL, backend)
        infer, headers = f"/v1/models/{MODEL}/infer", {"x-key-id": key_id}
        assert [http.post(infer, content=body, headers=headers).status_code for _ in range(2)] == [
            200,
            200,
        ]
        paced = http.post(infer, content=body, headers=headers)
        assert paced.status_code == 429, paced.text
        assert 1 <= int(paced.headers["retry-after"]) <= 100
        assert paced.json()["error"] == "OverloadedError"


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, level=2.0, updated=0.0)
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0


def test_sdk_sends_its_token_and_serve_reads_a_tokens_file(tmp_path: Path, models: object) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"carol-token-5555555555": "carol"}))
    settings = _server_settings(
        tmp_path / "models",
        tmp_path / "keys",
        "plain",
        1,
        2,
        8.0,
        1.0,
        1.0,
        tokens=tokens_file,
        token_queries=5,
    )
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        keys = tmp_path / "client"
        with pytest.raises(ServiceError) as refused:
            Client("http://testserver", key_dir=keys, http=http).models()
        assert refused.value.status_code == 401
        client = Client(
            "http://testserver", key_dir=keys, http=http, token="carol-token-5555555555"
        )
        model = client.model(MODEL)
        model.generate_keys()
        out = model.predict(np.random.default_rng(0).uniform(-1, 1, size=(1, 12)))
        assert out.shape == (1, 5)
        assert app_guard(http).used("carol") == 1
