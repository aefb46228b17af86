"""The he-infer command line: help, local runs, compile reports, the demo, error exits."""

from __future__ import annotations

import json
import warnings
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
            "--output",
            "logits",
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
                "--output",
                "logits",
                "--json",
            ],
        )
    assert result.exit_code == 0, result.output
    values = np.array(json.loads(result.output)["values"])
    np.testing.assert_allclose(values, mlp_reference(weights, x), atol=1e-9)


# -- predict: answers kept when a later round trip fails, and a timeout --------------------


def _mlp_files(tmp_path: Path, n: int = 3) -> tuple[dict[str, np.ndarray], np.ndarray]:
    circuit, weights = mlp_circuit(np.random.default_rng(9))
    circuit.save(tmp_path / "mlp.hec")
    x = np.random.default_rng(10).uniform(-1, 1, size=(n, 12))
    np.save(tmp_path / "x.npy", x)
    return weights, x


def test_predict_prints_and_saves_the_answers_before_a_later_failure(tmp_path: Path) -> None:
    from he_inference.demo import _local_server

    weights, x = _mlp_files(tmp_path)
    token = "tok-1234567890abcdef"
    budget = {"api_tokens": {token: "alice"}, "max_queries_per_token": 2}
    common = ["--model", "mlp", "--key-dir", str(tmp_path / "keys"), "--token", token]
    with _local_server(tmp_path / "srv", tmp_path / "mlp.hec", "plain", **budget) as url:
        args = ["predict", str(tmp_path / "x.npy"), "--server", url, *common]
        result = runner.invoke(
            app, [*args, "--output", "labels", "--json", "--save", str(tmp_path / "y.npy")]
        )
    assert result.exit_code == 1
    answer = json.loads(result.stdout.splitlines()[0])
    expected = mlp_reference(weights, x).argmax(axis=1)[:2]
    assert answer["values"] == expected.tolist() and answer["answered"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    assert "budget" in result.output and "first 2 of 3" in result.output


def test_predict_times_out_naming_the_server_and_the_option(tmp_path: Path) -> None:
    import socket
    import time

    np.save(tmp_path / "x.npy", np.zeros((1, 12)))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        result = runner.invoke(
            app,
            [
                "predict",
                str(tmp_path / "x.npy"),
                "--server",
                url,
                "--model",
                "m",
                "--timeout",
                "1",
            ],
        )
    assert result.exit_code == 1 and time.monotonic() - start < 30
    assert url in result.output and "--timeout" in result.output
    assert "--timeout" in runner.invoke(app, ["keygen", "--help"]).output


# -- run: post-processing and the output file ---------------------------------------------


def test_run_applies_the_models_postprocess_unless_asked_for_logits(tmp_path: Path) -> None:
    weights, x = _mlp_files(tmp_path, n=2)  # the mlp circuit ends in a softmax
    logits = mlp_reference(weights, x)
    base = ["run", str(tmp_path / "mlp.hec"), str(tmp_path / "x.npy"), "--backend", "plain"]
    expected = {
        "auto": np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True),
        "logits": logits,
        "labels": logits.argmax(axis=1),
    }
    for output, want in expected.items():
        save = tmp_path / f"{output}.npy"
        options = ["--output", output] if output != "auto" else []
        result = runner.invoke(app, [*base, *options, "--save", str(save)])
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(np.load(save), want, atol=1e-9)
    result = runner.invoke(app, [*base, "-o", "labels"])
    assert result.exit_code == 1 and "--output labels" in result.output
    help_text = runner.invoke(app, ["run", "--help"]).output
    assert "--save" in help_text and "logits" in help_text


def test_run_writes_exactly_the_file_named_and_makes_its_folder(tmp_path: Path) -> None:
    _mlp_files(tmp_path, n=2)
    out = tmp_path / "nodir" / "out.txt"
    base = ["run", str(tmp_path / "mlp.hec"), str(tmp_path / "x.npy"), "--backend", "plain"]
    result = runner.invoke(app, [*base, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not out.with_name("out.txt.npy").exists()
    assert np.load(out).shape == (2, 5) and f"wrote {out}" in result.output.replace("\n", "")
    result = runner.invoke(app, [*base, "-o", str(tmp_path)])
    assert result.exit_code == 1 and "is a folder" in result.output
    assert "per node" not in result.output  # refused before the evaluation


# -- serve refuses to serve nothing, or on a port in use ----------------------------------


@pytest.fixture
def never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make serving itself fail fast, so a check that lets the server start fails the test."""
    import uvicorn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)


@pytest.mark.usefixtures("never_serve")
def test_serve_refuses_a_missing_empty_or_wrong_backend_models_folder(tmp_path: Path) -> None:
    keys = ["--key-store", str(tmp_path / "keys")]
    result = runner.invoke(app, ["serve", "--models", str(tmp_path / "nope"), *keys])
    assert result.exit_code == 1 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["serve", "--models", str(tmp_path / "empty"), *keys])
    assert result.exit_code == 1 and "no .hec circuit files" in result.output
    circuit, _ = mlp_circuit(np.random.default_rng(7))
    circuit.metadata["backend"] = "openfhe"
    circuit.save(tmp_path / "models" / "mlp.hec")
    result = runner.invoke(app, ["serve", "--models", str(tmp_path / "models"), *keys])
    assert result.exit_code == 1 and "serve --backend openfhe" in result.output
    assert "serving" not in result.output


@pytest.mark.usefixtures("never_serve")
def test_serve_says_the_port_is_in_use_before_announcing_anything(tmp_path: Path) -> None:
    import socket

    _mlp_files(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "mlp.hec").rename(tmp_path / "models" / "mlp.hec")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = runner.invoke(
            app,
            [
                "serve",
                "--models",
                str(tmp_path / "models"),
                "--key-store",
                str(tmp_path / "keys"),
                "--backend",
                "plain",
                "--port",
                port,
            ],
        )
    assert result.exit_code == 1 and "already in use" in result.output
    assert "--port" in result.output and "serving" not in result.output


def test_serve_help_lists_the_endpoints_and_sets_the_key_limit(tmp_path: Path) -> None:
    from he_inference.cli import _server_settings

    help_text = runner.invoke(app, ["serve", "--help"]).output
    assert "/v1/models" in help_text and "server/app.py" not in help_text
    settings = _server_settings(
        tmp_path, tmp_path, "plain", None, 4, 64.0, 1.0, 1.0, max_key_mb=2048.0
    )
    assert settings.max_key_bytes == 2048 << 20


# -- messages ----------------------------------------------------------------------------


def test_an_unknown_backend_is_named_as_unknown(tmp_path: Path) -> None:
    _mlp_files(tmp_path)
    circuit = Circuit.load(tmp_path / "mlp.hec")
    circuit.metadata["backend"] = "seal"  # a backend check would advise recompiling for foo
    circuit.save(tmp_path / "mlp.hec")
    result = runner.invoke(
        app, ["run", str(tmp_path / "mlp.hec"), str(tmp_path / "x.npy"), "--backend", "foo"]
    )
    assert result.exit_code == 1 and "unknown backend" in result.output
    assert "plain, seal" in result.output and "recompile" not in result.output


def _bad_input_files(tmp_path: Path) -> dict[str, str]:
    """File name -> what its error must say."""
    (tmp_path / "text.npy").write_text("1 2 3\n4 5 6\n")
    np.save(tmp_path / "whole.npy", np.zeros((3, 12)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:150])
    np.save(tmp_path / "words.npy", np.array([["a"] * 12]))
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "none.npy", np.zeros((0, 12)))
    return {
        "text.npy": "is not a numpy .npy file",
        "cut.npy": "truncated",
        "words.npy": "dtype <U1",
        "text.npz": "is not a numpy .npz file",
        "none.npy": "holds no queries",
    }


def test_bad_input_files_are_one_line_input_errors_naming_the_file(tmp_path: Path) -> None:
    _mlp_files(tmp_path)
    for name, message in _bad_input_files(tmp_path).items():
        path = str(tmp_path / name)
        result = runner.invoke(app, ["run", str(tmp_path / "mlp.hec"), path, "--backend", "plain"])
        assert result.exit_code == 1, (name, result.output)
        line = result.output.replace("\n", "")
        assert "InputError" in line and name in line and message in line, (name, line)
        assert line.count(name) == 1, (name, line)  # named once, not "f: f is ..."
        assert "allow_pickle" not in line and "concatenate" not in line, (name, line)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    result = runner.invoke(app, ["compile", str(model), "-c", str(tmp_path / "missing.npy")])
    assert result.exit_code == 1 and "missing.npy does not exist" in result.output


def test_values_outside_the_range_are_located_and_allowed_through_logging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _mlp_files(tmp_path)
    x = np.zeros((3, 12))
    x[1, 7] = 3.5
    np.save(tmp_path / "far.npy", x)
    base = ["run", str(tmp_path / "mlp.hec"), str(tmp_path / "far.npy"), "--backend", "plain"]
    result = runner.invoke(app, base)
    assert result.exit_code == 1
    assert "query 1 (of 3) holds 3.5 at element (0, 7)" in result.output.replace("\n", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = runner.invoke(app, [*base, "--allow-out-of-range"])
    assert result.exit_code == 0, result.output
    (line,) = [r.getMessage() for r in caplog.records if "input range" in r.getMessage()]
    assert "allowed" in line and "allow it explicitly" not in line


def test_demo_without_digits_and_compile_options_name_the_wrong_value(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--count", "0", "--work-dir", str(tmp_path)])
    assert result.exit_code == 1 and "--count 0" in result.output
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    for option, value in (("--batch", "0"), ("--error-budget", "2"), ("--degree", "0")):
        result = runner.invoke(app, ["compile", str(model), option, value])
        line = result.output.replace("\n", "")
        assert result.exit_code == 1 and f"({option})" in line, line
        others = {"--batch", "--error-budget", "--degree"} - {option}
        assert not any(f"({other})" in line for other in others), line


# -- compile warnings ----------------------------------------------------------------------


def test_compile_warns_about_few_calibration_samples_and_large_keys() -> None:
    from he_inference.report import compile_warnings

    circuit, _ = mlp_circuit(np.random.default_rng(7))
    sizes = circuit_report(circuit)["sizes"]
    quiet = compile_warnings(circuit, np.zeros((200, 1, 12)), sizes, 1 << 40)
    assert quiet == []
    few, keys = compile_warnings(circuit, np.zeros((4, 12)), sizes, 1000)
    assert "holds 4 samples" in few and "at least 16" in few
    assert "serve --max-key-mb" in keys


@needs_compiler
def test_compile_with_a_tiny_calibration_set_warns(tmp_path: Path) -> None:
    np.save(tmp_path / "few.npy", np.load(ZOO / "digits.npz")["x_calib"][:4])
    result = runner.invoke(
        app,
        [
            "compile",
            str(ZOO / "digits_cnn_square.onnx"),
            "-c",
            str(tmp_path / "few.npy"),
            "-o",
            str(tmp_path / "d.hec"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "holds 4 samples" in result.output
