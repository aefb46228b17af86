"""Queries are trial-parsed in a persistent, memory-limited worker before the server parses them.

OpenFHE's parser believes the lengths inside a ciphertext, so the forgeries here keep every
envelope check valid (sizes, header, key tag) and alter a length or type id inside the one
ciphertext: parsed in the server, they would cost it gigabytes or kill it (SIGSEGV). Each is
a 400 with the server's memory untouched, in-process and from a real ``he-infer serve``.
The worker's own life (restart after a death, the kill on a timeout, the shutdown) is shown
on the plain backend, where a parse takes microseconds.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from he_inference import wire
from he_inference.circuit import Circuit
from he_inference.errors import MalformedPayloadError, ParameterMismatchError
from he_inference.params import CkksParameters
from server.parsing import worker_memory_bytes
from server.query_worker import QueryParseWorker
from tests.conftest import require_backend
from tests.server.apps import MODEL, OTHER, serve, write_models
from tests.server.test_app import client_keys, query, upload, x_in_range
from tests.server.test_hostile import (
    RSS_GROWTH_BOUND,
    Target,
    assert_refused,
    assert_serves,
    blob_of,
    client_for,
    encrypt,
    peak_rss,
    small_circuit,
    with_blob,
)

# The key tag, 32 hex characters after their 8-byte length; the polynomials follow it.
_TAG = re.compile(rb"\x20\x00{7}[0-9a-f]{32}")


def worker_of(http: Any) -> QueryParseWorker | None:
    """The query worker of the app behind a TestClient."""
    worker: QueryParseWorker | None = http.app.state.service.query_worker
    return worker


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def openfhe_fields(blob: bytes, params: CkksParameters) -> dict[str, int]:
    """Offsets of the lengths an OpenFHE ciphertext carries after its key tag."""
    tag = _TAG.search(blob)
    assert tag is not None, "no key tag in the ciphertext"
    fields = {"polynomials": tag.end(), "towers": tag.end() + 12}
    fields["coefficients"] = blob.index(_u64(params.poly_modulus_degree), fields["towers"])
    assert blob[fields["polynomials"] : fields["polynomials"] + 8] == _u64(2)
    assert blob[fields["towers"] : fields["towers"] + 8] == _u64(params.depth + 1)
    return fields


def _set(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value) :]


def forgeries(blob: bytes, params: CkksParameters) -> dict[str, bytes]:
    """Blobs of the valid size whose lengths or type ids lie, and what each costs in-process."""
    at = openfhe_fields(blob, params)
    return {
        # std::bad_alloc at once.
        "2^40 polynomials": _set(blob, at["polynomials"], _u64(1 << 40)),
        # 0.7 GiB of polynomial objects over 3 s, then std::bad_alloc.
        "10^8 polynomials": _set(blob, at["polynomials"], _u64(10**8)),
        "10^6 towers": _set(blob, at["towers"], _u64(10**6)),
        # 2 GiB zero-filled over 4 s before the parser finds the bytes missing.
        "2^28 coefficients": _set(blob, at["coefficients"], _u64(1 << 28)),
        # A polymorphic type id in the trailer: the parser dereferences garbage (SIGSEGV).
        "crashing type id": _set(blob, len(blob) - 12, (7).to_bytes(4, "little")),
    }


@pytest.fixture(scope="module")
def openfhe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    require_backend("openfhe")
    root = tmp_path_factory.mktemp("worker-openfhe")
    (root / "models").mkdir()
    circuit = small_circuit()
    circuit.save(root / "models" / "lin.hec")
    client = client_for(circuit, "openfhe")
    keys = wire.encode_evaluation_keys(client)
    with serve(root, backend="openfhe") as http:
        response = http.post("/v1/models/lin/keys", content=keys)
        assert response.status_code == 201, response.text
        yield Target(
            http,
            circuit,
            client,
            response.json()["key_id"],
            keys,
            encrypt(circuit, client),
            b"",
            b"",
        )


@pytest.mark.openfhe
def test_forged_openfhe_lengths_are_refused_by_the_worker(openfhe: Target) -> None:
    worker = worker_of(openfhe.http)
    assert isinstance(worker, QueryParseWorker)
    blob = blob_of(openfhe.query)
    before = peak_rss()
    for name, forged in forgeries(blob, openfhe.circuit.params).items():
        assert len(forged) == len(blob)
        start = time.monotonic()
        response = openfhe.infer(with_blob(openfhe.query, 0, forged))
        assert_refused(response, (400,))
        assert response.json()["error"] == "MalformedPayloadError", (name, response.text)
        assert time.monotonic() - start < 10, name
        assert_serves(openfhe)
    assert peak_rss() - before < RSS_GROWTH_BOUND
    assert worker.starts <= 2  # only the crashing type id kills it (openfhe 1.6)


@pytest.mark.openfhe
@pytest.mark.timeout(180)
def test_a_real_server_survives_queries_that_break_the_parser(tmp_path: Path) -> None:
    from tests.servers import free_port
    from tests.test_end_to_end import server_process

    require_backend("openfhe")
    circuit = small_circuit()
    (tmp_path / "models").mkdir()
    circuit.save(tmp_path / "models" / "lin.hec")
    client = client_for(circuit, "openfhe")
    query = encrypt(circuit, client)
    port, log = free_port(), tmp_path / "server.log"
    process = server_process(tmp_path / "models", tmp_path / "keys", "openfhe", port, log)
    with process as url, httpx.Client(base_url=url, timeout=60) as http:
        key_id = http.post("/v1/models/lin/keys", content=wire.encode_evaluation_keys(client))
        headers = {"x-key-id": key_id.json()["key_id"]}
        for name, forged in forgeries(blob_of(query), circuit.params).items():
            refused = http.post(
                "/v1/models/lin/infer", content=with_blob(query, 0, forged), headers=headers
            )
            assert refused.status_code == 400, (name, refused.text)
            assert refused.json()["error"] == "MalformedPayloadError"
            assert http.get("/healthz").status_code == 200
        answered = http.post("/v1/models/lin/infer", content=query, headers=headers)
        assert answered.status_code == 200, answered.text
        assert wire.decode_ciphertexts(client, answered.content, 8, model="lin")
    assert "query worker" in log.read_text()


# -- the worker's life, on the plain backend ----------------------------------------------


@pytest.fixture
def plain_query(tmp_path: Path) -> tuple[CkksParameters, bytes]:
    circuit = write_models(tmp_path / "models")[MODEL][0]
    return circuit.params, encrypt(circuit, client_for(circuit, "plain"))


def plain_worker(params: CkksParameters, timeout_s: float = 30.0) -> QueryParseWorker:
    return QueryParseWorker([("plain", params)], worker_memory_bytes(1 << 20, 4.0), timeout_s)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_worker_killed_between_queries_is_restarted_unnoticed(
    plain_query: tuple[CkksParameters, bytes],
) -> None:
    params, body = plain_query
    worker = plain_worker(params)
    try:
        worker.check("plain", params, body, model=MODEL, max_count=1)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: worker.pid is None)
        worker.check("plain", params, body, model=MODEL, max_count=1)
        assert worker.starts == 2 and worker.pid not in (None, pid)
    finally:
        worker.close()
    assert worker.pid is None


def test_a_parse_past_the_time_limit_kills_the_worker_and_is_a_400(
    plain_query: tuple[CkksParameters, bytes],
) -> None:
    params, body = plain_query
    worker = plain_worker(params, timeout_s=0.5)
    try:
        worker.check("plain", params, body, model=MODEL, max_count=1)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a parser that spins forever
        with pytest.raises(MalformedPayloadError, match=r"did not parse within 0\.5 s"):
            worker.check("plain", params, body, model=MODEL, max_count=1)
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
        worker.check("plain", params, body, model=MODEL, max_count=1)
        assert worker.starts == 2
    finally:
        worker.close()


def _zombie(pid: int) -> bool:
    return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


def test_the_worker_refuses_with_the_library_class(
    plain_query: tuple[CkksParameters, bytes],
) -> None:
    params, body = plain_query
    worker = plain_worker(params)
    try:
        with pytest.raises(ParameterMismatchError):
            worker.check("plain", params, body, model=OTHER, max_count=1)
        with pytest.raises(MalformedPayloadError):
            worker.check("plain", params, body[:-9], model=MODEL, max_count=1)
        assert worker.starts == 1
    finally:
        worker.close()


def test_the_app_uses_the_worker_when_asked_and_stops_it_on_shutdown(
    tmp_path: Path, models: dict[str, tuple[Circuit, object]]
) -> None:
    circuit = models[MODEL][0]
    backend = client_keys(circuit)
    body = query(circuit, backend, x_in_range())
    with serve(tmp_path, isolate_query_parsing="always") as http:
        worker = worker_of(http)
        assert isinstance(worker, QueryParseWorker)
        headers = {"x-key-id": upload(http, MODEL, backend)}
        infer = f"/v1/models/{MODEL}/infer"
        assert http.post(infer, content=body, headers=headers).status_code == 200
        refused = http.post(infer, content=body[:-9], headers=headers)
        assert_refused(refused, (400,))
        pid = worker.pid
        assert pid is not None and worker.starts == 1
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid))
    assert worker.pid is None


def test_queries_are_parsed_in_process_where_the_parser_bounds_itself(
    tmp_path: Path, models: object
) -> None:
    with serve(tmp_path) as http:  # plain, "auto": only OpenFHE's parser needs the worker
        assert worker_of(http) is None
    with serve(tmp_path, isolate_query_parsing="never") as http:
        assert worker_of(http) is None
