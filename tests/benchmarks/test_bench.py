"""``he-infer bench`` measures every layer's time and precision and writes stable JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench
from he_inference.circuit import Circuit
from tests.conftest import require_backend

ZOO = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo"
SQUARE_MODEL = ZOO / "digits_cnn_square.onnx"
RELU_MODEL = ZOO / "digits_cnn_relu.onnx"
DIGITS = ZOO / "digits.npz"

pytestmark = pytest.mark.skipif(
    not (SQUARE_MODEL.exists() and DIGITS.exists()),
    reason=f"model zoo files missing under {ZOO}",
)

TOP_FIELDS = {
    "schema",
    "schema_version",
    "created",
    "model",
    "settings",
    "machine",
    "versions",
    "backends",
    "server",
}
BACKEND_FIELDS = {
    "backend",
    "library_version",
    "circuit",
    "keygen_s",
    "evaluation_keys",
    "query_bytes",
    "result_bytes",
    "cold_evaluate_s",
    "encrypt_s",
    "evaluate_s",
    "decrypt_s",
    "end_to_end_s",
    "queries_per_ciphertext",
    "end_to_end_per_query_s",
    "output",
    "nodes",
    "batch",
}


def _check_report(result: dict, backend: str, repeat: int) -> dict:
    assert set(result) >= TOP_FIELDS
    assert result["schema_version"] == bench.SCHEMA_VERSION
    assert result["machine"]["cpu_count"] >= 1
    assert result["versions"]["numpy"] == np.__version__
    report = result["backends"][backend]
    assert set(report) >= BACKEND_FIELDS
    assert report["circuit"]["params"]["poly_modulus_degree"] >= 1024
    for node in report["nodes"]:
        assert node["sources"], node["name"]
        assert node["seconds"]["n"] == repeat
        assert node["seconds"]["min"] <= node["seconds"]["median"] <= node["seconds"]["max"]
    assert sum(n["share"] for n in report["nodes"]) == pytest.approx(1.0)
    # The round trip survives JSON, which is what later runs are compared through.
    assert json.loads(json.dumps(result)) == result
    return report


def test_bench_on_plain_measures_every_layer_against_onnxruntime(tmp_path: Path) -> None:
    result = bench.run_bench(SQUARE_MODEL, DIGITS, ["plain"], repeat=2, count=2, progress=False)
    report = _check_report(result, "plain", repeat=2)

    # Every value of the square model is an ONNX tensor, so each has a precision; the plain
    # backend only differs from onnxruntime's float32 by rounding.
    for node in report["nodes"]:
        precision = node["precision"]
        assert precision["reference"] == "onnxruntime", node["name"]
        assert precision["max_abs_error"] < 1e-3 * precision["max_abs_reference"]
        assert precision["bits"] > 15
    assert report["output"]["queries"] == 2
    assert report["output"]["argmax_agreement"] == 1.0
    # The primitives table has no plain rows: the estimate column is left out with a note.
    assert report["nodes"][0]["estimate_s"] is None
    assert report["nodes"][0]["estimate_note"]

    bench.write_json(result, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["schema"] == "he-inference-bench"


def test_bench_reports_normalised_linear_outputs_as_not_comparable() -> None:
    result = bench.run_bench(RELU_MODEL, DIGITS, ["plain"], repeat=1, count=1, progress=False)
    nodes = {n["name"]: n["precision"] for n in result["backends"]["plain"]["nodes"]}

    # The convolution's output was rescaled to [-1, 1] for the ReLU polynomial after it.
    assert nodes["/conv/Conv_output_0"]["max_abs_error"] is None
    assert "normalised" in nodes["/conv/Conv_output_0"]["reason"]
    assert nodes["/act1/Relu_output_0"]["bits"] > 3
    assert nodes["logits"]["reference"] == "onnxruntime"


def test_bench_on_a_circuit_file_compares_with_the_plain_circuit(tmp_path: Path) -> None:
    from compiler import compile_model

    data = np.load(DIGITS)
    path = tmp_path / "square.hec"
    compile_model(SQUARE_MODEL, data["x_calib"], name="square").save(path)
    result = bench.run_bench(path, DIGITS, ["plain"], repeat=1, progress=False)

    report = result["backends"]["plain"]
    assert report["circuit"]["content_hash"] == Circuit.load(path).content_hash()
    for node in report["nodes"]:
        assert node["precision"]["reference"] == "plain circuit"
        assert node["precision"]["max_abs_error"] == 0.0
        assert node["precision"]["bits"] is None  # exact


@pytest.mark.seal
def test_bench_on_seal_reports_keys_sizes_and_per_layer_precision(tmp_path: Path) -> None:
    require_backend("seal")
    result = bench.run_bench(
        SQUARE_MODEL, DIGITS, ["seal"], repeat=1, count=1, batch=2, progress=False
    )
    report = _check_report(result, "seal", repeat=1)

    keys = report["evaluation_keys"]
    assert keys["galois_key_count"] == len(report["circuit"]["rotation_steps"])
    assert keys["relin_keys_bytes"] > 0 and keys["galois_keys_bytes"] > keys["relin_keys_bytes"]
    assert keys["envelope_bytes"] > keys["relin_keys_bytes"] + keys["galois_keys_bytes"]
    assert report["query_bytes"] > 0 and report["result_bytes"] > 0
    # At scale 2^28 over five levels the digits CNN keeps about 10 to 14 bits at each layer.
    for node in report["nodes"]:
        assert node["estimate_s"] is not None and node["estimate_s"] > 0
        assert 6 < node["precision"]["bits"] < 30, node["name"]
    assert report["output"]["argmax_agreement"] == 1.0
    batch = report["batch"]
    assert batch["queries_per_ciphertext"] == 2
    assert batch["end_to_end_per_query_s"] == pytest.approx(batch["end_to_end_s"]["median"] / 2)

    bench.write_plot(result, tmp_path / "layers.png")
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.seal
@pytest.mark.slow
def test_bench_through_the_server_shows_transport(tmp_path: Path) -> None:
    require_backend("seal")
    from he_inference.demo import _compiled_circuit, _local_server

    data = np.load(DIGITS)
    path = _compiled_circuit(SQUARE_MODEL, data["x_calib"], tmp_path, "seal")
    with _local_server(tmp_path / "server", path, "seal") as url:
        result = bench.run_bench(path, DIGITS, ["seal"], repeat=1, server=url, progress=False)

    server = result["server"]
    assert server["model"] == "digits_cnn_square"
    # Serialised SEAL ciphertexts are compressed, so two queries differ by a few bytes.
    assert server["query_bytes"] == pytest.approx(
        result["backends"]["seal"]["query_bytes"], rel=0.01
    )
    assert server["round_trip_s"]["median"] >= server["server_evaluate_s"]["median"] > 0
    assert server["server_nodes"]
