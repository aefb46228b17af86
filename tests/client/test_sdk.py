"""The SDK against the real app in-process, on the plain backend."""

from __future__ import annotations

import socket
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from client import Client, PartialResultError
from client.client import CONNECT_TIMEOUT_S
from client.inputs import check_queries
from client.model import Model
from he_inference.circuit import Circuit, Layout
from he_inference.errors import InputError, ParameterMismatchError, ServiceError
from tests.he_inference.circuits import mlp_circuit, mlp_reference
from tests.server.apps import MODEL, serve

Models = dict[str, tuple[Circuit, dict[str, np.ndarray]]]


@contextmanager
def sdk(tmp_path: Path, **overrides: Any) -> Iterator[tuple[Client, list[httpx.Request]]]:
    """A Client over the in-process app, and the list of requests it sends."""
    sent: list[httpx.Request] = []
    with serve(tmp_path, **overrides) as http:
        http.event_hooks = {"request": [sent.append], "response": []}
        yield Client("http://testserver", key_dir=tmp_path / "client", http=http), sent


def bodies_to(sent: list[httpx.Request], suffix: str) -> list[bytes]:
    return [r.content for r in sent if r.url.path.endswith(suffix)]


def queries(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 1, 12))


def test_predict_one_query_and_batches_in_both_forms(tmp_path: Path, models: Models) -> None:
    weights = models[MODEL][1]
    x = queries(3)
    with sdk(tmp_path) as (server, sent):
        model = server.model(MODEL)
        one = model.predict(x[0])
        stacked = model.predict(x)  # [n, *shape] = (3, 1, 12)
        onnx = model.predict(x[:, 0])  # ONNX's own batched form (3, 12)
    expected = mlp_reference(weights, x)
    assert one.shape == (1, 5)
    np.testing.assert_allclose(one, expected[:1], atol=1e-9)
    assert stacked.shape == (3, 1, 5)
    np.testing.assert_allclose(stacked[:, 0], expected, atol=1e-9)
    np.testing.assert_allclose(onnx, expected, atol=1e-9)
    assert len(bodies_to(sent, "/keys")) == 1  # keys went up once
    assert len(bodies_to(sent, "/infer")) == 7  # one round trip per query at batch 1


def test_outputs_probabilities_and_labels(tmp_path: Path, models: Models) -> None:
    weights = models[MODEL][1]
    x = queries(4, seed=1)[:, 0]
    with sdk(tmp_path) as (server, _):
        model = server.model(MODEL)
        proba = model.predict_proba(x)
        labels = model.predict_label(x)
        single = model.predict(x[:1], output="labels")
        with pytest.raises(InputError, match="choose one of"):
            model.predict(x, output="softmax")
    logits = mlp_reference(weights, x)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, expected, atol=1e-9)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))
    assert single.shape == (1,) and single[0] == logits[0].argmax()


def test_throughput_layout_packs_several_queries_per_round_trip(tmp_path: Path) -> None:
    circuit, weights = mlp_circuit(np.random.default_rng(21), batch=3)
    circuit.name = "batched"
    (tmp_path / "models").mkdir()
    circuit.save(tmp_path / "models" / "batched.hec")
    x = queries(5, seed=2)
    with sdk(tmp_path) as (server, sent):
        got = server.model("batched").predict(x[:, 0])
    np.testing.assert_allclose(got, mlp_reference(weights, x), atol=1e-9)
    assert len(bodies_to(sent, "/infer")) == 2  # ceil(5 / 3)


def test_secret_key_is_saved_owner_only_and_never_sent(tmp_path: Path, models: Models) -> None:
    with sdk(tmp_path) as (server, sent):
        model = server.model(MODEL)
        info = model.generate_keys()
        model.predict(queries(1)[0])
    assert info.generated and info.evaluation_key_bytes > 0
    folder = model.folder.path
    assert folder.parent.parent == tmp_path / "client"
    for path in (folder, folder.parent, folder.parent.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secret = (folder / "secret_key").read_bytes()
    assert secret and all(secret not in r.content for r in sent)


def test_saved_keys_are_reused_and_not_uploaded_again(tmp_path: Path, models: Models) -> None:
    with sdk(tmp_path) as (server, sent):
        first = server.model(MODEL)
        first.predict(queries(1)[0])
        second = server.model(MODEL)
        info = second.generate_keys()
        second.predict(queries(1)[0])
    assert not info.generated and info.key_id == first.key_id
    assert len(bodies_to(sent, "/keys")) == 1


def test_keys_are_uploaded_again_when_the_server_lost_them(tmp_path: Path, models: Models) -> None:
    weights = models[MODEL][1]
    x = queries(1, seed=5)[0]
    with sdk(tmp_path) as (server, sent):
        server.model(MODEL).predict(x)
    # A fresh key store: the server has never seen these keys, the client thinks it has.
    with sdk(tmp_path, key_store_dir=tmp_path / "fresh-keys") as (server, sent):
        got = server.model(MODEL).predict(x)
    np.testing.assert_allclose(got, mlp_reference(weights, x[None]), atol=1e-9)
    assert len(bodies_to(sent, "/keys")) == 1 and len(bodies_to(sent, "/infer")) == 2


def test_deleted_keys_are_uploaded_again_on_the_next_query(tmp_path: Path, models: Models) -> None:
    with sdk(tmp_path) as (server, sent):
        model = server.model(MODEL)
        model.predict(queries(1)[0])
        model.delete_keys()
        model.predict(queries(1)[0])
    assert len(bodies_to(sent, "/keys")) == 2


def test_query_stats_report_sizes_and_per_node_timings(tmp_path: Path, models: Models) -> None:
    circuit = models[MODEL][0]
    with sdk(tmp_path) as (server, sent):
        model = server.model(MODEL)
        model.predict(queries(2))
    assert len(model.last_stats) == 2
    stats = model.last_stats[0]
    assert stats.request_bytes == len(bodies_to(sent, "/infer")[0])
    assert stats.response_bytes > 0 and stats.latency_s >= stats.eval_seconds > 0
    assert [t["name"] for t in stats.timings] == [n.name for n in circuit.nodes]


def test_server_errors_are_raised_as_library_classes(tmp_path: Path, models: Models) -> None:
    with sdk(tmp_path) as (server, _):
        with pytest.raises(ServiceError, match="unknown model") as info:
            server.model("nope")
        assert info.value.status_code == 404
        model = server.model(MODEL)
        model.generate_keys()
        model.manifest["name"] = "other"  # now its ciphertexts name the wrong model
        model.name = "other"
        with pytest.raises(ParameterMismatchError):
            model.upload_keys()


def test_unreachable_server_is_a_service_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="cannot reach"):
        Client("http://127.0.0.1:9", key_dir=tmp_path, timeout=2).models()


# -- input checks, before anything is encrypted -------------------------------------------


LAYOUT = Layout((1, 12), 32, 1)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((1, 11)), "shape"),
        (np.zeros((2, 3, 12)), "shape"),
        (np.array([["a"] * 12]), "dtype"),
        (np.zeros((1, 12), complex), "dtype"),
        (np.array([[None] * 12]), "dtype"),
        (np.full((1, 12), np.nan), "finite"),
        (np.full((1, 12), np.inf), "finite"),
    ],
)
def test_malformed_inputs_are_refused(x: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        check_queries(x, LAYOUT, (-1.0, 1.0))


def test_out_of_range_values_are_named_or_logged(caplog: pytest.LogCaptureFixture) -> None:
    x = np.zeros((1, 12))
    x[0, 7] = 3.5
    with pytest.raises(InputError, match=r"3\.5 at element \(0, 7\).*\[-1, 1\]"):
        check_queries(x, LAYOUT, (-1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log line, not a UserWarning with a source line
        batch, form = check_queries(x, LAYOUT, (-1.0, 1.0), allow_out_of_range=True)
    assert batch.shape == (1, 1, 12) and form == "single"
    (record,) = [r for r in caplog.records if "calibrated input range" in r.getMessage()]
    assert record.levelname == "WARNING" and "allowed" in record.getMessage()
    assert "allow it explicitly" not in record.getMessage()


def test_bad_values_are_located_by_query_and_element() -> None:
    x = np.zeros((3, 12))
    x[2, 7] = np.nan
    with pytest.raises(InputError, match=r"query 2 \(of 3\) holds nan at element \(0, 7\)"):
        check_queries(x, LAYOUT, (-1.0, 1.0))
    x[2, 7], x[1, 4] = 0.0, -9.0
    with pytest.raises(InputError, match=r"query 1 \(of 3\) holds -9 at element \(0, 4\).*flat"):
        check_queries(x, LAYOUT, (-1.0, 1.0))


@pytest.mark.parametrize("shape", [(0, 12), (0, 1, 12)])
def test_an_input_without_queries_says_so(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match="holds no queries"):
        check_queries(np.zeros(shape), LAYOUT, (-1.0, 1.0))


def test_predict_checks_before_encrypting(tmp_path: Path, models: Models) -> None:
    with sdk(tmp_path) as (server, sent):
        model: Model = server.model(MODEL)
        with pytest.raises(InputError, match="outside"):
            model.predict(np.full((1, 12), 2.0))
        assert not bodies_to(sent, "/infer") and not bodies_to(sent, "/keys")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert model.predict(np.full((1, 12), 2.0), allow_out_of_range=True).shape == (1, 5)


# -- failures part-way and servers that never answer --------------------------------------


def test_a_later_failure_keeps_the_answered_results(tmp_path: Path, models: Models) -> None:
    weights = models[MODEL][1]
    x = queries(3, seed=6)[:, 0]
    budget = {"api_tokens": {"tok-1234567890abcdef": "alice"}, "max_queries_per_token": 2}
    with serve(tmp_path, **budget) as http:
        client = Client(
            "http://testserver", key_dir=tmp_path / "c", http=http, token="tok-1234567890abcdef"
        )
        with pytest.raises(PartialResultError, match="first 2 of 3") as info:
            client.model(MODEL).predict(x, output="logits")
    assert (info.value.answered, info.value.total, info.value.status_code) == (2, 3, 429)
    assert isinstance(info.value.cause, ServiceError) and "budget" in str(info.value.cause)
    np.testing.assert_allclose(info.value.completed, mlp_reference(weights, x)[:2], atol=1e-9)


def test_a_server_that_never_answers_times_out_with_advice(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts connections; nothing ever reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with Client(url, key_dir=tmp_path, timeout=0.5) as client:
            assert client.http.timeout.connect == 0.5
            with pytest.raises(ServiceError, match=r"did not answer .* within 0\.5 s.*--timeout"):
                client.models()
    with Client(url, key_dir=tmp_path) as client:
        assert client.http.timeout.connect == CONNECT_TIMEOUT_S
