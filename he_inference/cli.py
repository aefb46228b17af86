"""The ``he-infer`` command line: compile, run, serve, keygen, predict and the demo.

The compiler, the server and the client are imported inside the commands that use them,
so ``he-infer --help`` stays fast and a machine with only the client installed can run the
client commands. Errors of the library print their message and exit with status 1; a
traceback is shown only with ``--debug``. The commands parse options and print; the compile
report is built in :mod:`he_inference.report`, the demo runs in :mod:`he_inference.demo`,
array files are read and written by :mod:`he_inference.arrays`, and the checks ``serve``
makes before it starts are in :mod:`he_inference.serving`.
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

from he_inference.arrays import load_array, prepare_output_file, save_array
from he_inference.demo import run_demo
from he_inference.errors import ConfigurationError, HEInferenceError, InputError
from he_inference.report import circuit_report, compile_warnings, format_mb, print_report

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
# The SDK's default (client.client.DEFAULT_TIMEOUT_S), here so that --help imports no httpx.
DEFAULT_TIMEOUT_S = 300.0


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


#: ``run`` and ``predict`` print the same kinds of result and save them the same way.
OutputKind = Annotated[
    str,
    typer.Option(
        "--output",
        help="What to print and save: auto (what the ONNX model ended in: labels after "
        "ArgMax, probabilities after Softmax, else logits), logits (the raw decrypted "
        "outputs), probabilities or labels. The file is --save.",
    ),
]
SaveFile = Annotated[
    Path | None,
    typer.Option(
        "--save",
        "-o",
        help="Also write the printed results to this .npy file (exactly this name; "
        "its folder is created).",
    ),
]


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
    _check_backend_name(backend)
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
    for warning in compile_warnings(circuit, data, summary["sizes"], _server_key_limit()):
        _warn(warning)


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
    output: OutputKind = "auto",
    save: SaveFile = None,
    allow_out_of_range: Annotated[
        bool,
        typer.Option(
            "--allow-out-of-range",
            help="Warn instead of refusing inputs outside the calibrated input range.",
        ),
    ] = False,
) -> None:
    """Keygen, encrypt, evaluate and decrypt locally, printing results and node timings.

    Example: he-infer run model.hec query.npy --backend seal --output labels --save y.npy
    """
    import time

    from client.inputs import check_queries, postprocess
    from he_inference.backends import make_backend
    from he_inference.circuit import Circuit
    from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input

    _check_output(output)
    _check_backend_name(backend)
    if save is not None:
        _check_save(save)
    circuit = Circuit.load(circuit_file)
    circuit.check_backend(backend)
    array = load_array(inputs, "x_test")  # its errors name the file
    try:
        queries, form = check_queries(
            array, circuit.input_layout, circuit.input_range, allow_out_of_range=allow_out_of_range
        )
    except InputError as exc:
        raise InputError(f"{inputs}: {exc}") from None
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
    values = postprocess(
        np.concatenate(results), circuit.output_layout.shape, form, circuit.postprocess, output
    )
    np.set_printoptions(precision=4, suppress=True)
    console.print(values)
    if timings:
        table = Table(title="last query, per node")
        for column in ("node", "kind", "levels", "seconds"):
            table.add_column(column)
        for t in timings:
            table.add_row(t.name, t.kind, f"{t.level_in}->{t.level_out}", f"{t.seconds:.4f}")
        console.print(table)
    if save is not None:
        save_array(save, values)
        console.print(f"wrote {save}")


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
    max_key_mb: Annotated[
        float | None,
        typer.Option(
            help="Largest evaluation-key upload in MiB (1024 by default; compile reports "
            "a model's key size and warns above it)."
        ),
    ] = None,
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
    """Serve the circuits of a folder over HTTP until interrupted.

    Endpoints (keys and ciphertexts are binary envelopes, the rest JSON):
      GET    /v1/models                     the served models
      GET    /v1/models/NAME                the public manifest
      POST   /v1/models/NAME/keys           evaluation keys -> key id
      DELETE /v1/models/NAME/keys/KEY_ID    forget uploaded keys
      POST   /v1/models/NAME/infer          X-Key-Id + ciphertexts -> ciphertexts
      GET    /healthz, /readyz, /metrics    probes and Prometheus metrics

    Clients use 'he-infer keygen' and 'he-infer predict', or client.Client in Python.

    Example: he-infer serve --models models --key-store keys --port 8000
    """
    import uvicorn

    from he_inference.serving import circuit_files, listen, no_models_message
    from server import create_app

    _check_backend_name(backend)
    settings = _server_settings(
        models,
        key_store,
        backend,
        max_concurrency,
        max_queue,
        max_body_mb,
        key_ttl_hours,
        key_store_gb,
        max_key_mb=max_key_mb,
        tokens=tokens,
        token_queries=token_queries,
        token_rate=token_rate,
    )
    files = circuit_files(models)
    logging.getLogger("server").setLevel(logging.INFO)  # the per-request line
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING)
    application = create_app(settings)
    served = len(application.state.service.registry.models)
    if not served:
        raise ConfigurationError(no_models_message(models, files, backend))
    # Bound here, before the announcement, so a port in use is said instead of "serving".
    listener = listen(host, port)
    err_console.print(
        f"serving {served} model{'s' if served != 1 else ''} from {models} on "
        f"http://{host}:{port} ({backend})"
    )
    config = uvicorn.Config(application, access_log=False, log_level="warning")
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()


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
    max_key_mb: float | None = None,
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
    if max_key_mb is not None:
        values["max_key_bytes"] = int(max_key_mb * (1 << 20))
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


TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="How long to wait for each answer of the server (an evaluation at a large ring "
        "can take minutes); connecting waits at most 10 s.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(envvar="HE_INFERENCE_TOKEN", help="API token, where the server needs one."),
]


@app.command("keygen")
@_friendly
def keygen_command(
    server: Annotated[str, typer.Option("--server", help="The server's URL.")],
    model: Annotated[str, typer.Option("--model", help="The model's name on the server.")],
    key_dir: Annotated[
        Path | None, typer.Option(help="Key folder (~/.he-inference/keys).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Make new keys even if saved ones fit.")] = False,
    token: TokenOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Generate keys for a served model and upload the evaluation keys (never the secret).

    Example: he-infer keygen --server http://127.0.0.1:8000 --model digits
    """
    from client import Client

    _check_timeout(timeout)
    with Client(server, key_dir=key_dir, token=token, timeout=timeout) as connection:
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
    output: OutputKind = "auto",
    save: SaveFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    allow_out_of_range: Annotated[
        bool, typer.Option(help="Warn instead of refusing inputs outside the calibrated range.")
    ] = False,
    token: TokenOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Encrypt queries, have the server evaluate them, and print the decrypted results.

    When a later round trip fails (say a token's budget runs out), the results already
    answered are printed and saved first, then the error; the exit status is then 1.

    Example: he-infer predict queries.npy --server http://127.0.0.1:8000 --model digits
    """
    from client import Client, PartialResultError
    from client.inputs import default_output

    _check_output(output)
    _check_timeout(timeout)
    if save is not None:
        _check_save(save)
    x = load_array(inputs, "x_test")
    failure: PartialResultError | None = None
    with Client(server, key_dir=key_dir, token=token, timeout=timeout) as connection:
        handle = connection.model(model)
        try:
            result = handle.predict(x, output=output, allow_out_of_range=allow_out_of_range)
        except PartialResultError as exc:
            failure, result = exc, exc.completed
    kind = default_output(handle.postprocess) if output == "auto" else output
    if as_json:
        answer: dict[str, Any] = {
            "model": model,
            "output": kind,
            "values": result.tolist(),
            "eval_seconds": [s.eval_seconds for s in handle.last_stats],
        }
        if failure is not None:
            answer.update(answered=failure.answered, queries=failure.total, error=str(failure))
        typer.echo(json.dumps(answer))
    else:
        np.set_printoptions(precision=4, suppress=True)
        if failure is not None:
            console.print(f"{kind} of the first {failure.answered} of {failure.total} queries:")
        console.print(result)
        total = sum(s.eval_seconds for s in handle.last_stats)
        console.print(f"{len(handle.last_stats)} encrypted round trips, {total:.2f} s evaluation")
    if save is not None:
        save_array(save, result)
        (err_console if as_json else console).print(f"wrote {save}")
    if failure is not None:
        raise failure


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


def _check_backend_name(backend: str) -> None:
    """Refuse an unknown backend name before any file is read.

    Raises:
        ConfigurationError: no backend has that name.
    """
    from he_inference.backends import BACKENDS

    if backend not in BACKENDS:
        raise ConfigurationError(
            f"--backend {backend}: unknown backend; choose one of {', '.join(sorted(BACKENDS))}"
        )


def _check_output(output: str) -> None:
    from client.inputs import AUTO, OUTPUTS

    if output not in (AUTO, *OUTPUTS):
        raise ConfigurationError(f"--output {output}: choose one of {', '.join((AUTO, *OUTPUTS))}")


def _check_save(save: Path) -> None:
    """Refuse a format name given as the file, and make the file's folder before any work.

    Raises:
        ConfigurationError: ``save`` is a result kind or a folder.
    """
    from client.inputs import AUTO, OUTPUTS

    if save.name in (AUTO, *OUTPUTS):
        raise ConfigurationError(
            f"-o/--save {save} names the file to write: for the kind of result, pass "
            f"--output {save.name}"
        )
    prepare_output_file(save)


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ConfigurationError(f"--timeout {timeout:g}: give a positive number of seconds")


def _warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning[/]: {message}", highlight=False)


def _server_key_limit() -> int | None:
    """The default evaluation-key upload limit of ``he-infer serve``, where it is installed."""
    try:
        from server.settings import Settings
    except ImportError:
        return None
    limit = Settings.model_fields["max_key_bytes"].default
    return int(limit) if isinstance(limit, int) else None


if __name__ == "__main__":
    app()
    sys.exit(0)
