"""The ``he-infer`` command line: compile, run, serve, keygen, predict and the demo.

The compiler, the server and the client are imported inside the commands that use them,
so ``he-infer --help`` stays fast and a machine with only the client installed can run the
client commands. Errors of the library print their message and exit with status 1; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from he_inference.errors import ConfigurationError, HEInferenceError, InputError

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
        _print_report(summary)


def _print_report(summary: dict[str, Any]) -> None:
    table = Table(title=f"circuit {summary['name']}")
    numeric = ("rot", "pt mul", "ct mul", "est. ms")
    for column in ("node", "kind", "ONNX sources", "level", *numeric):
        table.add_column(column, justify="right" if column in numeric else "left")
    for node in summary["nodes"]:
        table.add_row(
            node["name"],
            node["kind"],
            ", ".join(node["sources"]),
            f"{node['level_in']}->{node['level_out']}",
            str(node["rotations"]),
            str(node["plain_multiplications"]),
            str(node["multiplications"]),
            f"{node['estimated_s'] * 1e3:.0f}" if "estimated_s" in node else "-",
        )
    console.print(table)
    for node in summary["nodes"]:
        if node["kind"] == "polynomial":
            low, high = node["range"]
            console.print(
                f"{node['name']}: {node['function']} as degree {node['degree']} on "
                f"[{low:.4g}, {high:.4g}], max error {node['max_error']:.3g}"
            )
    totals = summary["totals"]
    sizes = summary["sizes"]
    console.print(
        f"depth {totals['depth']}, N={totals['poly_modulus_degree']}, modulus chain "
        f"{totals['coeff_modulus_bits']} ({sum(totals['coeff_modulus_bits'])} bits, "
        f"{totals['security_level']}-bit security), {totals['rotation_steps']} rotation steps, "
        f"{totals['rotations']} rotations, {totals['plain_multiplications']} plaintext and "
        f"{totals['multiplications']} ciphertext multiplications"
    )
    console.print(
        f"evaluation keys {_mb(sizes['evaluation_key_bytes'])}, query "
        f"{_mb(sizes['query_bytes'])}, result {_mb(sizes['result_bytes'])} "
        f"({sizes['how']})"
    )
    latency = summary["latency"]
    if latency["available"]:
        console.print(
            f"estimated latency {latency['estimated_s']:.2f} s per evaluation on "
            f"{latency['backend']}, one core (from {latency['table']})"
        )
    else:
        console.print(f"no latency estimate: {latency['reason']}")
    console.print(f"wrote {summary['file']}")


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
        f"{_mb(info.evaluation_key_bytes)} of evaluation keys; key id {key_id}"
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
    run_demo(backend=backend, count=count, activation=activation, work_dir=work_dir.expanduser())


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


# -- the compile report ---------------------------------------------------------------------


def circuit_report(circuit: Any, measure_backend: str | None = None) -> dict[str, Any]:
    """Per-node costs, totals, and key and ciphertext sizes of a circuit.

    Sizes are measured on ``measure_backend`` (keys generated and serialised, which takes
    seconds to minutes at large rings) or, when it is ``None``, estimated from N and the
    modulus chain.
    """
    manifest = circuit.manifest()
    nodes = [
        {
            "name": n["name"],
            "kind": n["kind"],
            "sources": n["sources"],
            "level_in": n["level_in"],
            "level_out": n["level_out"],
            **n["cost"],
            **{k: n[k] for k in ("function", "degree", "range", "max_error") if k in n},
        }
        for n in manifest["nodes"]
    ]
    params = circuit.params
    totals = {
        "depth": circuit.depth,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_modulus_bits": list(params.coeff_modulus_bits),
        "scale_bits": params.scale_bits,
        "security_level": params.security_level,
        "rotation_steps": len(circuit.rotation_steps),
        "input_ciphertexts": circuit.input_layout.chunks,
        "output_ciphertexts": circuit.output_layout.chunks,
        **{
            k: sum(n[k] for n in nodes)
            for k in ("rotations", "plain_multiplications", "multiplications", "rescales")
        },
    }
    sizes = (
        _measured_sizes(circuit, measure_backend) if measure_backend else _estimated_sizes(circuit)
    )
    latency = _latency_estimate(circuit, nodes)
    return {
        "name": circuit.name,
        "nodes": nodes,
        "totals": totals,
        "sizes": sizes,
        "latency": latency,
    }


def _latency_estimate(circuit: Any, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-node seconds from the primitive cost table, added to ``nodes`` in place."""
    from he_inference import costmodel

    backend = str(circuit.metadata.get("backend", "seal"))
    if backend == "plain":
        backend = "seal"
    try:
        estimates = costmodel.estimate(circuit, backend)
    except HEInferenceError as exc:
        return {"available": False, "reason": str(exc)}
    for node, estimate in zip(nodes, estimates, strict=True):
        node["estimated_s"] = estimate.seconds
    return {
        "available": True,
        "backend": backend,
        "estimated_s": sum(e.seconds for e in estimates),
        "table": str(costmodel.DEFAULT_TABLE),
    }


def _estimated_sizes(circuit: Any) -> dict[str, Any]:
    params = circuit.params
    n, bits = params.poly_modulus_degree, params.coeff_modulus_bits
    keys = len({s % params.slots for s in circuit.rotation_steps} - {0}) + 1  # + relin_keys
    if circuit.metadata.get("backend") == "openfhe":
        return _estimated_openfhe_sizes(circuit, keys)
    # SEAL: a key-switching key holds one seeded ciphertext-sized pair per data prime: L
    # digits of N coefficients over the L data primes and the special prime. Seeding halves
    # each pair; serialisation stores each residue in about its prime's bits.
    data_primes = len(bits) - 1
    key_bytes = data_primes * n * sum(bits) / 8
    query = circuit.input_layout.chunks * n * sum(bits[:-1]) / 8  # seeded: one polynomial
    last = bits[: max(1, data_primes - circuit.depth)]
    result = circuit.output_layout.chunks * 2 * n * sum(last) / 8
    return {
        "how": "estimated from N and the modulus chain",
        "evaluation_key_bytes": int(keys * key_bytes),
        "query_bytes": int(query),
        "result_bytes": int(result),
    }


def _estimated_openfhe_sizes(circuit: Any, keys: int) -> dict[str, Any]:
    # OpenFHE stores every residue as a 64-bit word and seeds nothing. HYBRID key switching
    # takes the fewest digits whose 60-bit P primes (covering the largest digit plus a few
    # bits) keep Q*P within the security bound; a key is then one pair over Q and P per digit.
    from he_inference.params import max_modulus_bits

    params = circuit.params
    n, q_bits = params.poly_modulus_degree, list(params.coeff_modulus_bits[:-1])
    bound = max_modulus_bits(n, params.security_level)
    digits, p_primes = len(q_bits), 1
    for dnum in range(1, len(q_bits) + 1):
        size = math.ceil(len(q_bits) / dnum)
        largest = max(sum(q_bits[i : i + size]) for i in range(0, len(q_bits), size))
        p_primes = math.ceil((largest + 4) / 60)
        if sum(q_bits) + 60 * p_primes <= bound:
            digits = dnum
            break
    word = 8
    key_bytes = digits * 2 * n * (len(q_bits) + p_primes) * word
    query = circuit.input_layout.chunks * 2 * n * len(q_bits) * word
    result = circuit.output_layout.chunks * 2 * n * max(1, len(q_bits) - circuit.depth) * word
    return {
        "how": f"estimated from N and the modulus chain (OpenFHE, HYBRID with {digits} digits)",
        "evaluation_key_bytes": int(keys * key_bytes),
        "query_bytes": int(query),
        "result_bytes": int(result),
    }


def _measured_sizes(circuit: Any, backend_name: str) -> dict[str, Any]:
    from he_inference import wire
    from he_inference.backends import make_backend
    from he_inference.evaluate import encrypt_input

    backend = make_backend(backend_name, circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    keys = wire.encode_evaluation_keys(backend)
    zeros = np.zeros((circuit.input_layout.batch, *circuit.input_layout.shape))
    cts = encrypt_input(circuit, backend, zeros)
    query = wire.encode_ciphertexts(backend, cts)
    # A result is a full (unseeded) ciphertext at the circuit's last level.
    last = backend.rescale(backend.multiply_plain(cts[0], backend.encode(1.0)))
    if circuit.depth > backend.level(last):
        last = backend.drop_to_level(last, circuit.depth)
    result = wire.encode_ciphertexts(backend, [last] * circuit.output_layout.chunks)
    return {
        "how": f"measured on {backend_name}",
        "evaluation_key_bytes": len(keys),
        "query_bytes": len(query),
        "result_bytes": len(result),
    }


# -- the demo -------------------------------------------------------------------------------


def run_demo(backend: str, count: int, activation: str, work_dir: Path) -> None:
    """Compile, serve on a free local port, query ``count`` digits encrypted, print a table.

    Raises:
        ConfigurationError: the activation has no model in the zoo.
    """
    import tempfile
    import time

    import benchmarks

    zoo = Path(benchmarks.__file__).parent / "zoo"
    onnx_path = zoo / f"digits_cnn_{activation}.onnx"
    if not onnx_path.is_file():
        choices = sorted(p.stem.removeprefix("digits_cnn_") for p in zoo.glob("digits_cnn_*.onnx"))
        raise ConfigurationError(
            f"no demo model for activation {activation!r}: choose one of {', '.join(choices)}"
        )
    data = np.load(zoo / "digits.npz", allow_pickle=False)
    x_test, y_test = data["x_test"][:count], data["y_test"][:count]

    with console.status("compiling the model"):
        circuit_path = _compiled_circuit(onnx_path, data["x_calib"], work_dir, backend)
    plain = _onnx_logits(onnx_path, x_test)

    with (
        tempfile.TemporaryDirectory(prefix="he-demo-") as tmp,
        _local_server(Path(tmp), circuit_path, backend) as url,
    ):
        from client import Client

        with Client(url, key_dir=Path(tmp) / "client-keys") as connection:
            model = connection.model(circuit_path.stem)
            info = model.generate_keys()
            start = time.perf_counter()
            model.upload_keys()
            upload_s = time.perf_counter() - start
            rows = []
            for i in range(len(x_test)):
                logits = model.predict(x_test[i : i + 1])
                rows.append((logits[0], model.last_stats[0]))
    _print_demo(backend, activation, info, upload_s, rows, plain, y_test)


def _compiled_circuit(
    onnx_path: Path, calibration: np.ndarray, work_dir: Path, backend: str
) -> Path:
    """Compile the demo model for the backend; it takes a fraction of a second, so the
    circuit is always rebuilt and never goes stale against the compiler."""
    from compiler import compile_model

    folder = work_dir / backend
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{onnx_path.stem}.hec"
    compile_model(onnx_path, calibration, name=onnx_path.stem, backend=backend).save(path)
    return path


def _onnx_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [session.run(None, {name: x[i : i + 1].astype(np.float32)})[0] for i in range(len(x))]
    logits: np.ndarray = np.concatenate(rows).reshape(len(x), -1).astype(np.float64)
    return logits


class _local_server:  # noqa: N801 - used as a context manager, named like one
    """uvicorn on a free 127.0.0.1 port in a daemon thread, over one circuit file."""

    def __init__(self, root: Path, circuit_path: Path, backend: str) -> None:
        self.root, self.circuit_path, self.backend = root, circuit_path, backend

    def __enter__(self) -> str:
        import shutil
        import socket
        import threading
        import time

        import uvicorn

        from server import Settings, create_app

        models = self.root / "models"
        models.mkdir(parents=True)
        shutil.copy(self.circuit_path, models / self.circuit_path.name)
        settings = Settings.model_validate(
            {
                "models_dir": models,
                "key_store_dir": self.root / "server-keys",
                "backend": self.backend,
            }
        )
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))  # bound here, so no other process takes the port
        port = self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError("the demo server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def _print_demo(
    backend: str,
    activation: str,
    info: Any,
    upload_s: float,
    rows: list[tuple[np.ndarray, Any]],
    plain: np.ndarray,
    labels: np.ndarray,
) -> None:
    table = Table(
        title=f"encrypted digits CNN ({activation}) on {backend}",
        caption=(
            "encrypted: the class decrypted from the server's answer; plaintext: onnxruntime on "
            "the same digit; true: the dataset's label; latency: encrypt + HTTP + evaluate + "
            "decrypt; eval: the server's evaluation alone (the first query also encodes the "
            "weights); max |dlogit|: largest difference between encrypted and plaintext logits"
        ),
    )
    for column in ("#", "encrypted", "plaintext", "true", "latency s", "eval s", "max |dlogit|"):
        table.add_column(column, justify="right")
    encrypted = np.array([logits for logits, _ in rows])
    diffs = np.abs(encrypted - plain).max(axis=1)
    for i, (logits, stats) in enumerate(rows):
        ok = "green" if logits.argmax() == plain[i].argmax() else "red"
        table.add_row(
            str(i),
            f"[{ok}]{logits.argmax()}[/]",
            str(plain[i].argmax()),
            str(labels[i]),
            f"{stats.latency_s:.2f}",
            f"{stats.eval_seconds:.2f}",
            f"{diffs[i]:.2e}",
        )
    console.print(table)
    stats = [s for _, s in rows]
    agree = float(np.mean(encrypted.argmax(1) == plain.argmax(1)))
    console.print(
        f"key generation {info.seconds:.1f} s; evaluation keys {_mb(info.evaluation_key_bytes)} "
        f"(upload and server load {upload_s:.1f} s)\n"
        f"query {_mb(stats[0].request_bytes)}, result {_mb(stats[0].response_bytes)}; "
        f"mean latency {np.mean([s.latency_s for s in stats]):.2f} s\n"
        f"agreement encrypted vs plaintext {agree:.0%}, max |logit difference| "
        f"{diffs.max():.2e}\n"
        f"accuracy encrypted {np.mean(encrypted.argmax(1) == labels):.0%}, plaintext "
        f"{np.mean(plain.argmax(1) == labels):.0%}"
    )


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


def _mb(size: int | float) -> str:
    return f"{size / 1e6:.2f} MB"


if __name__ == "__main__":
    app()
    sys.exit(0)
