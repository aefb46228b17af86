"""Optional API tokens: 401 without one, per-token query budgets and rate limits (429).

Budgets are counted in a SQLite ledger: a real server restarted (even after SIGKILL) keeps
refusing a spent token, and a ledger that is not one stops the server at start.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from client import Client
from he_inference.cli import _server_settings
from he_inference.errors import ServiceError
from server import create_app
from server.auth import TokenBucket, TokenGuard
from server.ledger import QueryLedger
from tests.server.apps import MODEL, serve
from tests.server.test_app import client_keys, query, upload, x_in_range
from tests.servers import ROOT, free_port, serve_process

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


# -- budgets survive restarts -----------------------------------------------------------


def serve_arguments(root: Path, tokens_file: Path, queries: int) -> list[str]:
    tokens_file.write_text(json.dumps(TOKENS))
    return [
        "--models",
        str(root / "models"),
        "--key-store",
        str(root / "keys"),
        "--backend",
        "plain",
        "--tokens",
        str(tokens_file),
        "--token-queries",
        str(queries),
    ]


@pytest.mark.timeout(180)
def test_a_spent_budget_stays_spent_across_a_real_restart(
    tmp_path: Path, models: dict[str, tuple[object, object]]
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)  # type: ignore[arg-type]
    body = query(circuit, backend, x_in_range())  # type: ignore[arg-type]
    arguments = serve_arguments(tmp_path, tmp_path / "tokens.json", queries=2)
    alice = bearer("alice-token-1234567890")
    log = tmp_path / "server.log"
    with serve_process(arguments, free_port(), log) as (url, process):
        with httpx.Client(base_url=url, headers=alice, timeout=30) as http:
            headers = {"x-key-id": upload(http, MODEL, backend)}
            infer = f"/v1/models/{MODEL}/infer"
            assert http.post(infer, content=body, headers=headers).status_code == 200
        process.send_signal(signal.SIGKILL)  # a crash: nothing is flushed on the way out
        process.wait(10)
    with serve_process(arguments, free_port(), log) as (url, process):
        with httpx.Client(base_url=url, headers=alice, timeout=30) as http:
            assert http.post(infer, content=body, headers=headers).status_code == 200
            spent = http.post(infer, content=body, headers=headers)
            assert spent.status_code == 429 and "budget of 2" in spent.json()["detail"]
        process.terminate()
        process.wait(20)
    with (
        serve_process(arguments, free_port(), log) as (url, _),
        httpx.Client(base_url=url, headers=alice, timeout=30) as http,
    ):
        spent = http.post(infer, content=body, headers=headers)
        assert spent.status_code == 429, spent.text
        bob = {**bearer("bob-token-0987654321"), **headers}
        assert http.post(infer, content=body, headers=bob).status_code == 200


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(b"not a database" * 512), id="garbage"),
        pytest.param(lambda path: path.mkdir(parents=True), id="a folder"),
        pytest.param(
            lambda path: (
                sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.commit()
            ),
            id="another database",
        ),
    ],
)
def test_an_unusable_token_ledger_stops_the_server_at_start(
    tmp_path: Path, models: object, damage: Callable[[Path], object]
) -> None:
    ledger = tmp_path / "keys" / "token-usage.sqlite3"
    ledger.parent.mkdir(parents=True)
    damage(ledger)
    before = ledger.read_bytes() if ledger.is_file() else b""
    command = [sys.executable, "-m", "he_inference.cli", "serve"]
    command += [*serve_arguments(tmp_path, tmp_path / "tokens.json", 2), "--port", "9"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert "StorageError" in message and "token usage ledger" in message, message
    assert "deleting it resets every token's answered-query count" in message
    if before:
        assert ledger.read_bytes() == before  # refused, never silently reset


def test_a_ledger_that_cannot_record_the_query_refuses_it_with_507(
    tmp_path: Path, models: dict[str, tuple[object, object]]
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)  # type: ignore[arg-type]
    body = query(circuit, backend, x_in_range())  # type: ignore[arg-type]
    with serve(tmp_path, api_tokens=TOKENS, max_queries_per_token=5) as http:
        http.headers.update(bearer("alice-token-1234567890"))
        headers = {"x-key-id": upload(http, MODEL, backend)}
        infer = f"/v1/models/{MODEL}/infer"
        assert http.post(infer, content=body, headers=headers).status_code == 200
        ledger = app_guard(http).ledger
        writable = ledger._db
        ledger._db = sqlite3.connect(
            f"file:{ledger.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        refused = http.post(infer, content=body, headers=headers)
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"] == "StorageError"
        assert "did not run it" in refused.json()["detail"]
        assert str(tmp_path) not in refused.text
        ledger._db.close()
        ledger._db = writable
        assert http.post(infer, content=body, headers=headers).status_code == 200
        assert app_guard(http).used("alice") == 2


def test_the_ledger_keeps_counts_across_reopening_and_refunds(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = QueryLedger(path)
    assert [ledger.reserve("alice", lambda used: None) for _ in range(3)] == [0, 1, 2]
    ledger.refund("alice")

    def spent(used: int) -> None:
        raise ServiceError(f"spent at {used}", 429)

    with pytest.raises(ServiceError, match="spent at 2"):
        ledger.reserve("alice", spent)
    ledger.close()
    again = QueryLedger(path)
    assert (again.used("alice"), again.used("bob")) == (2, 0)
    again.refund("bob")  # nothing to refund: the count stays at zero
    assert again.used("bob") == 0
    again.close()
