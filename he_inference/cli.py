"""The ``he-infer`` command line: compile, run, serve, keygen, predict and the demo.

The compiler, the server and the client are imported inside the commands that use them,
so ``he-infer --help`` stays fast and a machine with only the client installed can run the
client commands. Errors of the library print their message and exit with status 1; a
traceback is shown only with ``--debug``. The commands parse options and print; the compile
report is built in :mod:`he_inference.report` and the demo runs in :mod:`he_inference.demo`.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from he_inference.demo import run_demo
from he_inference.errors import ConfigurationError, HEInferenceError, InputError
from he_inference.report import circuit_report, format_mb, print_report

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="he-infer",
    help="Encrypted inference for ONNX models with CKKS homomorphic encryption.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Off a terminal (pipes, CI logs) rich would wrap at 80 columns and cut the tables' cells.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Log at DEBUG and show tracebacks.")
    ] = False,
) -> None:
    """Compile ONNX models to CKKS circuits, serve them, and query them encrypted."""
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _friendly(command: F) -> F:
    """Print library errors as one line and exit 1, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (HEInferenceError, OSError, ValueError) as exc:
            if _state["debug"]:
                raise
            name = type(exc).__name__
            err_console.print(f"[bold red]error[/] ({name}): {exc}", highlight=False)
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug: one line, and how to see the traceback
            if _state["debug"]:
                raise
            err_console.print(
                f"[bold red]internal error[/] ({type(exc).__name__}): {exc} - this is a bug; "
                f"rerun with --debug for the traceback and report it",
                highlight=False,
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# -- compile ------------------------------------------------------------------------------


@app.command("compile")
@_friendly
def compile_command(
    model: Annotated[
        Path, typer.Argument(help="The ONNX model to compile.", exists=True, dir_okay=False)
    ],
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            "-c",
            help="Representative inputs (.npy, or .npz with x_calib or else its first array); "
            "the activation ranges are measured on them.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The circuit file to write (MODEL with .hec by default)."
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="Backend the circuit is for (OpenFHE's key switching needs a longer chain); "
            "with --measure, sizes are measured on it."
        ),
    ] = "seal",
    security: Annotated[int, typer.Option(help="Security level in bits: 128, 192 or 256.")] = 128,
    degree: Annotated[
        int | None,
        typer.Option(
            help="One polynomial degree for every activation (instead of --error-budget)."
        ),
    ] = None,
    error_budget: Annotated[
        float | None,
        typer.Option(help="Largest relative error of each activation polynomial (default 0.01)."),
    ] = None,
    batch: Annotated[
        int, typer.Option(help="Queries packed in one ciphertext (throughput mode).")
    ] = 1,
    name: Annotated[
        str | None,
        typer.Option(
            help="Model name the server serves it under (default: the output file's stem)."
        ),
    ] = None,
    report: Annotated[str, typer.Option(help="Report format: text or json.")] = "text",
    measure: Annotated[
        bool,
        typer.Option(help="Generate keys with --backend and measure sizes instead of estimating."),
    ] = False,
    noise_flooding: Annotated[
        bool,
        typer.Option(
            help="On OpenFHE, decrypt with noise flooding (runs the circuit once to measure "
            "its noise; scale 2^59, about twice the ring degree)."
        ),
    ] = True,
) -> None:
    """Compile an ONNX model into a CKKS circuit file and report its cost per node.

    Example: he-infer compile model.onnx -c calib.npz -o model.hec --report json
    """
    from compiler import compile_model

    if degree is not None and error_budget is not None:
        raise ConfigurationError("pass either --degree or --error-budget, not both")
    if report not in ("text", "json"):
        raise ConfigurationError(f"--report {report!r}: choose text or json")
    data = load_array(calibration, "x_calib") if calibration else None
    circuit = compile_model(
        model,
        data,
        degree=degree,
        error_budget=error_budget or 0.01,
        security_level=security,
        batch=batch,
        name=name or (output.stem if output else model.stem),
        backend=backend,
        noise_flooding=noise_flooding,
    )
    out = output or model.with_suffix(".hec")
    circuit.save(out)
    summary = circuit_report(circuit, backend if measure else None)
    summary["file"] = str(out)
    if report == "json":
        console.print_json(json.dumps(summary))
    else:
        print_report(summary, console)


# -- run ------------------------------------------------------------------------------------


@app.command("run")
@_friendly
def run_command(
    circuit_file: Annotated[Path, typer.Argument(help="A compiled circuit (.hec).", exists=True)],
    inputs: Annotated[
        Path,
        typer.Argument(
            help="Inputs (.npy, or .npz with x_test or its first array): one query or a batch.",
            exists=True,
        ),
    ],
    backend: Annotated[str, typer.Option(help="seal, openfhe or plain (no encryption).")] = "seal",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write outputs (.npy).")
    ] = None,
    allow_out_of_range: Annotated[
        bool,
        typer.Option(
            "--allow-out-of-range",
            help="Warn instead of refusing inputs outside the calibrated input range.",
        ),
    ] = False,
) -> None:
    """Keygen, encrypt, evaluate and decrypt locally, printing outputs and node timings.

    Example: he-infer run model.hec query.npy --backend seal
    """
    import time

    from client.inputs import check_queries
    from he_inference.backends import make_backend
    from he_inference.circuit import Circuit
    from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input

    circuit = Circuit.load(circuit_file)
    circuit.check_backend(backend)
    queries, _ = check_queries(
        load_array(inputs, "x_test"),
        circuit.input_layout,
        circuit.input_range,
        allow_out_of_range=allow_out_of_range,
    )
    context = make_backend(backend, circuit.params)
    start = time.perf_counter()
    context.generate_keys(circuit.rotation_steps)
    console.print(
        f"keys for {len(circuit.rotation_steps)} rotation steps in "
        f"{time.perf_counter() - start:.2f} s ({backend}, "
        f"N={circuit.params.poly_modulus_degree})"
    )
    evaluator = Evaluator(circuit, context)
    per_set = circuit.input_layout.batch
    results, timings = [], None
    for first in range(0, len(queries), per_set):
        group = queries[first : first + per_set]
        outputs, timings = evaluator.run(encrypt_input(circuit, context, group))
        results.append(decrypt_output(circuit, context, outputs)[: len(group)])
    values = np.concatenate(results)
    np.set_printoptions(precision=4, suppress=True)
    console.print(values.reshape(len(values), -1))
    if timings:
        table = Table(title="last query, per node")
        for column in ("node", "kind", "levels", "seconds"):
            table.add_column(column)
        for t in timings:
            table.add_row(t.name, t.kind, f"{t.level_in}->{t.level_out}", f"{t.seconds:.4f}")
        console.print(table)
    if output:
        np.save(output, values)
        console.print(f"wrote {output}")


# -- serve ----------------------------------------------------------------------------------


@app.command("serve")
@_friendly
def serve_command(
    models: Annotated[Path, typer.Option("--models", help="Folder of *.hec circuit files.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    key_store: Annotated[
        Path, typer.Option("--key-store", help="Folder of the evaluation-key store.")
    ] = Path("~/.he-inference/server-keys"),
    backend: Annotated[
        str, typer.Option(help="seal or openfhe (plain is for tests only).")
    ] = "seal",
    max_concurrency: Annotated[int | None, typer.Option(help="Evaluations at once.")] = None,
    max_queue: Annotated[int, typer.Option(help="Evaluations waiting before 503.")] = 4,
    max_body_mb: Annotated[float, typer.Option(help="Largest query body in MiB.")] = 64.0,
    key_ttl_hours: Annotated[
        float, typer.Option(help="Keys expire this long after last use.")
    ] = 168.0,
    key_store_gb: Annotated[float, typer.Option(help="Key store size cap in GiB.")] = 4.0,
    tokens: Annotated[
        Path | None,
        typer.Option(help="JSON file of API token -> client name; tokens are then required."),
    ] = None,
    token_queries: Annotated[
        int | None, typer.Option(help="Answered queries each token may have.")
    ] = None,
    token_rate: Annotated[
        float | None, typer.Option(help="Queries per second each token may send.")
    ] = None,
) -> None:
    """Serve the circuits of a folder over HTTP (see the API in server/app.py)."""
    import uvicorn

    from server import create_app

    settings = _server_settings(
        models,
        key_store,
        backend,
        max_concurrency,
        max_queue,
        max_body_mb,
        key_ttl_hours,
        key_store_gb,
        tokens=tokens,
        token_queries=token_queries,
        token_rate=token_rate,
    )
    logging.getLogger("server").setLevel(logging.INFO)  # the per-request line
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING)
    application = create_app(settings)
    err_console.print(
        f"serving {len(application.state.service.registry.models)} models from "
        f"{models} on http://{host}:{port} ({backend})"
    )
    uvicorn.run(application, host=host, port=port, access_log=False, log_level="warning")


def _server_settings(
    models: Path,
    key_store: Path,
    backend: str,
    max_concurrency: int | None,
    max_queue: int,
    max_body_mb: float,
    key_ttl_hours: float,
    key_store_gb: float,
    *,
    tokens: Path | None = None,
    token_queries: int | None = None,
    token_rate: float | None = None,
) -> Any:
    from pydantic import ValidationError

    from server import Settings

    values: dict[str, Any] = {
        "models_dir": models,
        "key_store_dir": key_store,
        "backend": backend,
        "max_queue": max_queue,
        "max_body_bytes": int(max_body_mb * (1 << 20)),
        "key_ttl_s": key_ttl_hours * 3600,
        "key_store_cap_bytes": int(key_store_gb * (1 << 30)),
    }
    if max_concurrency is not None:
        values["max_concurrency"] = max_concurrency
    if tokens is not None:
        values["api_tokens_file"] = tokens.expanduser()
    if token_queries is not None:
        values["max_queries_per_token"] = token_queries
    if token_rate is not None:
        values["token_rate_per_s"] = token_rate
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid server settings: {problems}") from None


# -- keygen and predict ------------------------------------------------------------------


@app.command("keygen")
@_friendly
def keygen_command(
    server: Annotated[str, typer.Option("--server", help="The server's URL.")],
    model: Annotated[str, typer.Option("--model", help="The model's name on the server.")],
    key_dir: Annotated[
        Path | None, typer.Option(help="Key folder (~/.he-inference/keys).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Make new keys even if saved ones fit.")] = False,
    token: Annotated[
        str | None,
        typer.Option(envvar="HE_INFERENCE_TOKEN", help="API token, where the server needs one."),
    ] = None,
) -> None:
    """Generate keys for a served model and upload the evaluation keys (never the secret)."""
    from client import Client

    with Client(server, key_dir=key_dir, token=token) as connection:
        handle = connection.model(model)
        info = handle.generate_keys(force=force)
        key_id = handle.upload_keys(force=force)
    how = "generated" if info.generated else "loaded"
    console.print(
        f"{how} keys in {info.seconds:.2f} s; uploaded "
        f"{format_mb(info.evaluation_key_bytes)} of evaluation keys; key id {key_id}"
    )
    console.print(f"secret key kept in {handle.folder.path}")


@app.command("predict")
@_friendly
def predict_command(
    inputs: Annotated[
        Path, typer.Argument(help="Queries (.npy, or .npz with x_test).", exists=True)
    ],
    server: Annotated[str, typer.Option("--server", help="The server's URL.")],
    model: Annotated[str, typer.Option("--model", help="The model's name on the server.")],
    key_dir: Annotated[
        Path | None, typer.Option(help="Key folder (~/.he-inference/keys).")
    ] = None,
    output: Annotated[str, typer.Option(help="logits, probabilities or labels.")] = "logits",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    allow_out_of_range: Annotated[
        bool, typer.Option(help="Warn instead of refusing inputs outside the calibrated range.")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(envvar="HE_INFERENCE_TOKEN", help="API token, where the server needs one."),
    ] = None,
) -> None:
    """Encrypt queries, have the server evaluate them, and print the decrypted results."""
    from client import Client

    x = load_array(inputs, "x_test")
    with Client(server, key_dir=key_dir, token=token) as connection:
        handle = connection.model(model)
        result = handle.predict(x, output=output, allow_out_of_range=allow_out_of_range)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": model,
                    "output": output,
                    "values": result.tolist(),
                    "eval_seconds": [s.eval_seconds for s in handle.last_stats],
                }
            )
        )
        return
    np.set_printoptions(precision=4, suppress=True)
    console.print(result)
    total = sum(s.eval_seconds for s in handle.last_stats)
    console.print(f"{len(handle.last_stats)} encrypted round trips, {total:.2f} s evaluation")


# -- demo -----------------------------------------------------------------------------------


@app.command("demo")
@_friendly
def demo_command(
    backend: Annotated[
        str, typer.Option(help="seal or openfhe (plain: a quick dry run).")
    ] = "seal",
    count: Annotated[int, typer.Option(help="Held-out digits to send.")] = 20,
    activation: Annotated[
        str, typer.Option(help="square, silu or relu (deeper, slower).")
    ] = "square",
    work_dir: Annotated[Path, typer.Option(help="Where the compiled circuit is cached.")] = Path(
        "~/.cache/he-inference/demo"
    ),
) -> None:
    """Compile the digits CNN, serve it locally, and classify digits encrypted over HTTP."""
    run_demo(backend, count, activation, work_dir.expanduser(), console)


# -- bench ----------------------------------------------------------------------------------


@app.command("bench")
@_friendly
def bench_command(
    model: Annotated[
        Path, typer.Argument(help="An ONNX model or a compiled circuit (.hec).", exists=True)
    ],
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration", "-c", help=".npz (x_calib compiles, x_test is queried) or .npy."
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="seal, openfhe, plain or all.")] = "seal",
    repeat: Annotated[int, typer.Option(help="Timed evaluations per backend.")] = 5,
    count: Annotated[int, typer.Option(help="Distinct queries (precision is the worst).")] = 1,
    server: Annotated[
        str | None, typer.Option(help="Also query this running server through the SDK.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a per-layer bar chart (PNG).")] = None,
    batch: Annotated[
        int | None, typer.Option(help="Also time a circuit of this many queries per ciphertext.")
    ] = None,
) -> None:
    """Time every layer, measure its precision, key and query sizes, on each backend.

    Example: he-infer bench model.onnx -c digits.npz --backend all --json out.json
    """
    from benchmarks import bench

    result = bench.run_bench(
        model,
        calibration,
        [backend],
        repeat=repeat,
        count=count,
        batch=batch,
        server=server,
        console=err_console,
    )
    bench.print_report(result, console)
    if json_out:
        bench.write_json(result, json_out)
        console.print(f"wrote {json_out}")
    if plot:
        bench.write_plot(result, plot)
        console.print(f"wrote {plot}")


# -- helpers ------------------------------------------------------------------------------


def load_array(path: Path, key: str) -> np.ndarray:
    """An array from a .npy file, or from a .npz by key (else its first array).

    Raises:
        InputError: the file holds no arrays or is not a numpy file.
    """
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if not data.files:
                raise InputError(f"{path} holds no arrays")
            return np.asarray(data[key] if key in data.files else data[data.files[0]])
    if path.suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    raise InputError(f"{path}: give inputs as .npy or .npz")


if __name__ == "__main__":
    app()
    sys.exit(0)
