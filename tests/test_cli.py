"""The he-infer command line: help, local runs, compile reports, the demo, error exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from he_inference.circuit import Circuit, PolynomialNode
from he_inference.cli import app
from he_inference.report import circuit_report
from tests.he_inference.circuits import mlp_circuit, mlp_reference

runner = CliRunner()
ZOO = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo"
COMMANDS = ("compile", "run", "serve", "keygen", "predict", "demo")


def _compiler_ready() -> bool:
    try:
        from compiler import compile_model  # noqa: F401
    except ImportError:
        return False
    return (ZOO / "digits_cnn_square.onnx").is_file() and (ZOO / "digits.npz").is_file()


needs_compiler = pytest.mark.skipif(
    not _compiler_ready(), reason="the compiler or the digits model zoo is not there yet"
)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 300


def test_run_prints_outputs_and_writes_them(tmp_path: Path) -> None:
    circuit, weights = mlp_circuit(np.random.default_rng(7))
    circuit.save(tmp_path / "mlp.hec")
    x = np.random.default_rng(8).uniform(-1, 1, size=(2, 1, 12))
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(
        app,
        [
            "run",
            str(tmp_path / "mlp.hec"),
            str(tmp_path / "x.npy"),
            "--backend",
            "plain",
            "-o",
            str(tmp_path / "y.npy"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "per node" in result.output
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got.reshape(2, -1), mlp_reference(weights, x), atol=1e-9)


def test_errors_print_a_message_and_exit_nonzero(tmp_path: Path) -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(7))
    circuit.save(tmp_path / "mlp.hec")
    np.save(tmp_path / "bad.npy", np.full((1, 12), np.nan))
    result = runner.invoke(
        app, ["run", str(tmp_path / "mlp.hec"), str(tmp_path / "bad.npy"), "--backend", "plain"]
    )
    assert result.exit_code == 1
    assert "InputError" in result.output and "finite" in result.output
    assert "Traceback" not in result.output

    (tmp_path / "broken.hec").write_bytes(b"not a circuit")
    result = runner.invoke(app, ["run", str(tmp_path / "broken.hec"), str(tmp_path / "bad.npy")])
    assert result.exit_code == 1 and "CircuitError" in result.output

    result = runner.invoke(
        app,
        ["predict", str(tmp_path / "bad.npy"), "--server", "http://127.0.0.1:9", "--model", "m"],
    )
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_report_estimates_sizes_and_sums_node_costs() -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(7))
    report = circuit_report(circuit)
    assert [n["name"] for n in report["nodes"]] == [n.name for n in circuit.nodes]
    assert report["totals"]["rotation_steps"] == len(circuit.rotation_steps)
    assert report["totals"]["rotations"] == sum(n["rotations"] for n in report["nodes"])
    sizes = report["sizes"]
    assert sizes["evaluation_key_bytes"] > sizes["query_bytes"] > 0


@needs_compiler
def test_estimated_sizes_are_close_to_measured_ones(real_backend_name: str) -> None:
    from compiler import compile_model

    backend = real_backend_name

    calibration = np.load(ZOO / "digits.npz")["x_calib"][:64]
    options = {"noise_flooding": False} if backend == "openfhe" else {}
    circuit = compile_model(
        ZOO / "digits_cnn_square.onnx", calibration, backend=backend, **options
    )
    estimated = circuit_report(circuit)["sizes"]
    measured = circuit_report(circuit, backend)["sizes"]
    for kind in ("evaluation_key_bytes", "query_bytes", "result_bytes"):
        ratio = estimated[kind] / measured[kind]
        assert 0.7 < ratio < 1.3, (kind, estimated[kind], measured[kind])


@needs_compiler
def test_compile_writes_a_loadable_circuit_and_a_json_report(tmp_path: Path) -> None:
    out = tmp_path / "digits.hec"
    result = runner.invoke(
        app,
        [
            "compile",
            str(ZOO / "digits_cnn_square.onnx"),
            "-c",
            str(ZOO / "digits.npz"),
            "-o",
            str(out),
            "--report",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    circuit = Circuit.load(out)
    assert report["totals"]["depth"] == circuit.depth
    assert report["totals"]["poly_modulus_degree"] == circuit.params.poly_modulus_degree
    assert all(node["sources"] for node in report["nodes"])


@needs_compiler
def test_text_report_lists_each_fit_with_its_calibrated_range(tmp_path: Path) -> None:
    out = tmp_path / "silu.hec"
    model, data = ZOO / "digits_cnn_silu.onnx", ZOO / "digits.npz"
    result = runner.invoke(app, ["compile", str(model), "-c", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    fits = [line for line in result.output.splitlines() if " as degree " in line]
    polynomials = [n for n in Circuit.load(out).nodes if isinstance(n, PolynomialNode)]
    assert len(fits) == len(polynomials) == 2
    for line, node in zip(fits, polynomials, strict=True):
        # The interval is folded to [-1, 1]; the report shows the range the fit covers.
        assert (node.lower, node.upper) == (-1.0, 1.0)
        assert node.fitted_range is not None and node.fitted_range[0] < -1.0
        assert f"SiLU as degree {node.degree} on [{node.fitted_range[0]:.4g}, " in line


def test_compile_refuses_degree_with_error_budget(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    result = runner.invoke(app, ["compile", str(model), "--degree", "3", "--error-budget", "0.1"])
    assert result.exit_code == 1 and "not both" in result.output


@needs_compiler
def test_demo_runs_end_to_end_on_plain(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["demo", "--backend", "plain", "--count", "3", "--work-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "agreement encrypted vs plaintext 100%" in result.output
    assert (tmp_path / "plain" / "digits_cnn_square.hec").is_file()


def test_keygen_then_predict_json_against_a_local_server(tmp_path: Path) -> None:
    from he_inference.demo import _local_server

    circuit, weights = mlp_circuit(np.random.default_rng(9))
    circuit.save(tmp_path / "mlp.hec")
    x = np.random.default_rng(10).uniform(-1, 1, size=(2, 12))
    np.save(tmp_path / "x.npy", x)
    keys = str(tmp_path / "client-keys")
    with _local_server(tmp_path / "srv", tmp_path / "mlp.hec", "plain") as url:
        result = runner.invoke(
            app, ["keygen", "--server", url, "--model", "mlp", "--key-dir", keys]
        )
        assert result.exit_code == 0, result.output
        assert "key id" in result.output and "secret key kept in" in result.output
        result = runner.invoke(
            app,
            [
                "predict",
                str(tmp_path / "x.npy"),
                "--server",
                url,
                "--model",
                "mlp",
                "--key-dir",
                keys,
                "--json",
            ],
        )
    assert result.exit_code == 0, result.output
    values = np.array(json.loads(result.output)["values"])
    np.testing.assert_allclose(values, mlp_reference(weights, x), atol=1e-9)
