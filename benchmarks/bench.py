"""``he-infer bench``: per-layer latency, precision and sizes of one model on each backend.

The benchmark plays both parties in one process: it generates the keys (so it holds the
secret key and can decrypt between layers), encrypts, evaluates and decrypts. For every
circuit node it reports the ONNX nodes the node came from, its levels and operation counts,
the median, min and max seconds over the repeats, the cost model's estimate beside it, and
the precision at that node: the node's output decrypted and compared with onnxruntime's
value of the ONNX tensor of the same name (a circuit value is named after the ONNX tensor
it holds). A linear map whose output was rescaled to [-1, 1] for the polynomial after it
holds no ONNX tensor, so its precision is "n/a"; for a circuit file, which carries no ONNX
graph, every node is compared with the same circuit on the exact plain backend instead.

Precision is measured on a run of its own: the decryption between nodes happens in
:meth:`Evaluator.run`'s ``on_node`` hook, outside the timed span, and the timed runs that
follow decrypt nothing until the end. The first evaluation encodes and caches every
plaintext (diagonals, biases, coefficients), so it is reported apart as ``cold``.

Run it as ``he-infer bench MODEL`` or call :func:`run_bench`; :func:`print_report`,
:func:`write_json` and :func:`write_plot` present what it returns.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from he_inference import wire
from he_inference.backends import make_backend
from he_inference.backends.base import Backend, Ciphertext
from he_inference.circuit import (
    PACKAGE_VERSION,
    Circuit,
    Layout,
    LinearNode,
    Node,
    PolynomialNode,
    node_cost,
)
from he_inference.errors import ConfigurationError, HEInferenceError
from he_inference.evaluate import Evaluator, NodeTiming, decrypt_output, encrypt_input

#: Bumped whenever a field of the JSON report changes meaning or moves.
SCHEMA_VERSION = 1
ENCRYPTING_BACKENDS = ("seal", "openfhe")
_VERSIONED = ("numpy", "onnx", "onnxruntime", "tenseal", "openfhe", "fastapi", "httpx", "rich")


@dataclass
class Workload:
    """What one backend is measured on: its circuit, the ONNX reference and the queries."""

    circuit: Circuit
    queries: np.ndarray  # [n, *input shape]
    onnx_model: Any | None  # compiler.graph.ImportedModel, for the reference values
    batch_circuit: Circuit | None = None


# -- the measurement ---------------------------------------------------------------------------


def run_bench(
    model: Path,
    calibration: Path | None = None,
    backends: Sequence[str] = ("seal",),
    *,
    repeat: int = 5,
    count: int = 1,
    batch: int | None = None,
    server: str | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure a model (ONNX, compiled here per backend, or a circuit file) on each backend.

    Args:
        model: an ``.onnx`` model or a compiled ``.hec`` circuit.
        calibration: ``.npz`` (``x_calib`` compiles, ``x_test`` is queried) or ``.npy``
            (both); without it, queries are drawn uniformly from the input range.
        backends: backend names; ``all`` stands for every encrypting backend installed.
        repeat: timed evaluations per backend (after one cold evaluation).
        count: distinct queries; precision is the worst over them, timings cycle them.
        batch: also compile a circuit with this many queries per ciphertext and report the
            amortised per-query figures (ONNX models only).
        server: a running he-infer server; the same queries also go through it with the
            client SDK, so transport and serialisation show.
        console: where progress goes; a fresh one on stderr by default.
        progress: show a progress bar.

    Raises:
        ConfigurationError: an option is out of range or the model is neither kind.
    """
    if repeat < 1 or count < 1 or (batch is not None and batch < 1):
        raise ConfigurationError(
            f"--repeat {repeat}, --count {count} and --batch {batch} must be at least 1"
        )
    names = _backend_names(backends)
    console = console or Console(stderr=True)
    x_calib, x_test = _load_data(calibration)

    result: dict[str, Any] = {
        "schema": "he-inference-bench",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "settings": {"repeat": repeat, "count": count, "batch": batch, "backends": names},
        "machine": machine(),
        "versions": _versions(),
        "backends": {},
        "server": None,
    }
    steps_per_backend = 2 + count + repeat + (repeat if batch else 0)
    with _progress(console, progress) as bar:
        task = bar.add_task("bench", total=steps_per_backend * len(names) + (server is not None))
        for name in names:
            bar.update(task, description=f"{name}: compiling")
            work = _workload(model, name, x_calib, x_test, count, batch)

            def step(what: str, name: str = name) -> None:
                bar.update(task, advance=1, description=f"{name}: {what}")

            result["backends"][name] = _bench_backend(name, work, repeat, step)
        if server is not None:
            bar.update(task, description="server: querying")
            work = _workload(model, names[0], x_calib, x_test, count, None)
            result["server"] = _bench_server(server, work.circuit.name, work.queries, repeat)
            bar.update(task, advance=1)
    return result


def _bench_backend(
    name: str, work: Workload, repeat: int, step: Callable[[str], None]
) -> dict[str, Any]:
    circuit = work.circuit
    backend = make_backend(name, circuit.params)
    start = time.perf_counter()
    backend.generate_keys(circuit.rotation_steps)
    keygen_s = time.perf_counter() - start
    keys = backend.serialize_keys()
    key_envelope = wire.encode_evaluation_keys(backend)
    evaluator = Evaluator(circuit, backend)
    groups = _query_groups(work.queries, circuit.input_layout.batch)
    step("keys")

    # The first evaluation encodes every plaintext; later ones find them cached.
    start = time.perf_counter()
    evaluator.run(encrypt_input(circuit, backend, groups[0]))
    cold_s = time.perf_counter() - start
    step("cold evaluation")

    precision = _Precision(circuit, backend, work.onnx_model)
    for group in groups:
        cts = encrypt_input(circuit, backend, group)
        precision.start(group)
        out, _ = evaluator.run(cts, on_node=precision.record)
        precision.output(decrypt_output(circuit, backend, out))
        step("precision")

    encrypt_s, evaluate_s, decrypt_s, per_node = [], [], [], []
    query_bytes = result_bytes = 0
    for i in range(repeat):
        group = groups[i % len(groups)]
        start = time.perf_counter()
        cts = encrypt_input(circuit, backend, group)
        encrypt_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        out, timings = evaluator.run(cts)
        evaluate_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decrypt_output(circuit, backend, out)
        decrypt_s.append(time.perf_counter() - start)
        per_node.append(timings)
        query_bytes = len(wire.encode_ciphertexts(backend, cts, model=circuit.name))
        result_bytes = len(wire.encode_ciphertexts(backend, out, model=circuit.name))
        step("timing")

    end_to_end = [e + v + d for e, v, d in zip(encrypt_s, evaluate_s, decrypt_s, strict=True)]
    per_query = circuit.input_layout.batch
    report: dict[str, Any] = {
        "backend": name,
        "library_version": backend.library_version,
        "circuit": _circuit_facts(circuit),
        "keygen_s": keygen_s,
        "evaluation_keys": {
            **{f"{kind}_bytes": len(blob) for kind, blob in keys.items()},
            "galois_key_count": len({backend.normalise_step(s) for s in circuit.rotation_steps}),
            "envelope_bytes": len(key_envelope),
        },
        "query_bytes": query_bytes,
        "result_bytes": result_bytes,
        "cold_evaluate_s": cold_s,
        "encrypt_s": _stats(encrypt_s),
        "evaluate_s": _stats(evaluate_s),
        "decrypt_s": _stats(decrypt_s),
        "end_to_end_s": _stats(end_to_end),
        "queries_per_ciphertext": per_query,
        "end_to_end_per_query_s": statistics.median(end_to_end) / per_query,
        "output": precision.output_summary(),
        "nodes": _node_rows(circuit, name, per_node, precision),
        "batch": None,
    }
    if work.batch_circuit is not None:
        report["batch"] = _bench_batch(name, work.batch_circuit, work.queries, repeat, step)
    return report


def _bench_batch(
    name: str, circuit: Circuit, queries: np.ndarray, repeat: int, step: Callable[[str], None]
) -> dict[str, Any]:
    """End-to-end figures of a throughput circuit holding ``batch`` queries per ciphertext."""
    backend = make_backend(name, circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    evaluator = Evaluator(circuit, backend)
    k = circuit.input_layout.batch
    group = queries[np.arange(k) % len(queries)]
    evaluator.run(encrypt_input(circuit, backend, group))  # cold: fills the plaintext cache
    totals, evaluate_s = [], []
    cts: list[Ciphertext] = []
    out: list[Ciphertext] = []
    for _ in range(repeat):
        start = time.perf_counter()
        cts = encrypt_input(circuit, backend, group)
        mid = time.perf_counter()
        out, _ = evaluator.run(cts)
        evaluate_s.append(time.perf_counter() - mid)
        decrypt_output(circuit, backend, out)
        totals.append(time.perf_counter() - start)
        step("batch timing")
    median = statistics.median(totals)
    return {
        "queries_per_ciphertext": k,
        "circuit": _circuit_facts(circuit),
        "evaluation_key_bytes": len(wire.encode_evaluation_keys(backend)),
        "query_bytes": len(wire.encode_ciphertexts(backend, cts, model=circuit.name)),
        "result_bytes": len(wire.encode_ciphertexts(backend, out, model=circuit.name)),
        "evaluate_s": _stats(evaluate_s),
        "end_to_end_s": _stats(totals),
        "end_to_end_per_query_s": median / k,
    }


def _bench_server(url: str, model_name: str, queries: np.ndarray, repeat: int) -> dict[str, Any]:
    """The same queries through a running server with the client SDK, one at a time."""
    from client import Client

    with (
        tempfile.TemporaryDirectory(prefix="he-bench-keys-") as key_dir,
        Client(url, key_dir=Path(key_dir)) as connection,
    ):
        model = connection.model(model_name)
        info = model.generate_keys()
        start = time.perf_counter()
        model.upload_keys()
        upload_s = time.perf_counter() - start
        # The server encodes its plaintexts on the first query of a model; timed apart.
        start = time.perf_counter()
        model.predict(queries[0][None], allow_out_of_range=True)
        cold_s = time.perf_counter() - start
        rows = []
        for i in range(repeat):
            start = time.perf_counter()
            model.predict(queries[i % len(queries)][None], allow_out_of_range=True)
            rows.append((time.perf_counter() - start, model.last_stats[0]))
    latency = [s.latency_s for _, s in rows]
    evaluate = [s.eval_seconds for _, s in rows]
    return {
        "url": url,
        "model": model.name,
        "backend": model.backend_name,
        "keygen_s": info.seconds,
        "evaluation_key_bytes": info.evaluation_key_bytes,
        "upload_s": upload_s,
        "cold_end_to_end_s": cold_s,
        "query_bytes": rows[-1][1].request_bytes,
        "result_bytes": rows[-1][1].response_bytes,
        "round_trip_s": _stats(latency),
        "server_evaluate_s": _stats(evaluate),
        "transport_s": _stats([a - b for a, b in zip(latency, evaluate, strict=True)]),
        "end_to_end_s": _stats([t for t, _ in rows]),
        "server_nodes": rows[-1][1].timings,
    }


# -- precision between layers ------------------------------------------------------------------


class _Precision:
    """Worst error of each node's decrypted output against its reference, over the queries."""

    def __init__(self, circuit: Circuit, backend: Backend, onnx_model: Any | None) -> None:
        self.circuit = circuit
        self.backend = backend
        self.slots = circuit.params.slots
        self.max_error: dict[str, float] = {}
        self.max_reference: dict[str, float] = {}
        self.reference_kind = "onnxruntime" if onnx_model is not None else "plain circuit"
        self.skipped = _normalised_values(circuit) if onnx_model is not None else {}
        self._onnx = _OnnxReference(onnx_model, circuit) if onnx_model is not None else None
        self._plain: dict[str, np.ndarray] = {}
        self._reference: dict[str, np.ndarray] = {}
        self._outputs: list[tuple[np.ndarray, np.ndarray]] = []

    def start(self, group: np.ndarray) -> None:
        """Compute the references of one query group before it is evaluated."""
        if self._onnx is not None:
            self._reference = self._onnx.values(group)
        else:
            self._reference = _plain_values(self.circuit, group)

    def record(self, node: Node, cts: list[Ciphertext], _: NodeTiming) -> None:
        """``Evaluator.run``'s hook: decrypt this node's output and compare it."""
        reference = self._reference.get(node.name)
        if reference is None or node.name in self.skipped:
            return
        vectors = np.stack([self.backend.decrypt(ct) for ct in cts])
        if self._onnx is not None:
            layout = Layout(
                reference.shape[1:],
                self.circuit.input_layout.period,
                len(cts),
                self.circuit.input_layout.batch,
            )
            if math.ceil(layout.size / layout.period) != layout.chunks:
                return
            value = layout.unpack(vectors, self.slots)
        else:
            value = vectors
        error = float(np.max(np.abs(value - reference)))
        self.max_error[node.name] = max(self.max_error.get(node.name, 0.0), error)
        peak = float(np.max(np.abs(reference)))
        self.max_reference[node.name] = max(self.max_reference.get(node.name, 0.0), peak)

    def output(self, decrypted: np.ndarray) -> None:
        """Keep the decrypted output of the group beside its reference."""
        reference = self._reference.get(self.circuit.output_name)
        if reference is not None and self._onnx is not None:
            self._outputs.append((decrypted, reference))

    def node(self, name: str) -> dict[str, Any]:
        """The JSON entry of one node."""
        if name not in self.max_error:
            reason = self.skipped.get(name, "no reference tensor of this name")
            return {
                "reference": None,
                "reason": reason,
                "max_abs_error": None,
                "max_abs_reference": None,
                "bits": None,
            }
        error, peak = self.max_error[name], self.max_reference[name]
        return {
            "reference": self.reference_kind,
            "max_abs_error": error,
            "max_abs_reference": peak,
            "bits": _bits(error, peak),
        }

    def output_summary(self) -> dict[str, Any] | None:
        """Largest output error and argmax agreement with onnxruntime, over the queries."""
        if not self._outputs:
            return None
        got = np.concatenate([g.reshape(len(g), -1) for g, _ in self._outputs])
        want = np.concatenate([w.reshape(len(w), -1) for _, w in self._outputs])
        return {
            "queries": len(got),
            "max_abs_error": float(np.max(np.abs(got - want))),
            "argmax_agreement": float(np.mean(got.argmax(1) == want.argmax(1))),
        }


class _OnnxReference:
    """onnxruntime's value of every ONNX tensor that a circuit value is named after."""

    def __init__(self, imported: Any, circuit: Circuit) -> None:
        from compiler.graph import session, with_outputs

        produced = {out for node in imported.original.graph.node for out in node.output}
        self.names = [n.name for n in circuit.nodes if n.name in produced]
        self.input_name = imported.input_name
        self.dtype = imported.input_dtype
        self.session = session(with_outputs(imported.original, self.names))

    def values(self, group: np.ndarray) -> dict[str, np.ndarray]:
        """``name -> [queries, *shape]`` for a group of queries, one run per query."""
        runs = [
            self.session.run(self.names, {self.input_name: q.astype(self.dtype)}) for q in group
        ]
        return {
            name: np.stack([np.asarray(r[i], dtype=np.float64) for r in runs])
            for i, name in enumerate(self.names)
        }


def _plain_values(circuit: Circuit, group: np.ndarray) -> dict[str, np.ndarray]:
    """Every node's slot vectors on the exact plain backend, as the reference for a .hec."""
    backend = make_backend("plain", circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    out: dict[str, np.ndarray] = {}

    def keep(node: Node, cts: list[Ciphertext], _: NodeTiming) -> None:
        out[node.name] = np.stack([backend.decrypt(ct) for ct in cts])

    Evaluator(circuit, backend).run(encrypt_input(circuit, backend, group), on_node=keep)
    return out


def _normalised_values(circuit: Circuit) -> dict[str, str]:
    """Linear outputs that the compiler rescaled to [-1, 1] for the polynomial reading them.

    Those values are named after their ONNX tensor but hold it mapped affinely, so a
    comparison with onnxruntime would measure the map, not the encryption.
    """
    readers: dict[str, list[Node]] = {}
    for node in circuit.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    skipped = {}
    for node in circuit.nodes:
        users = readers.get(node.name, [])
        if (
            isinstance(node, LinearNode)
            and len(users) == 1
            and isinstance(users[0], PolynomialNode)
            and (users[0].lower, users[0].upper) == (-1.0, 1.0)
            and node.name != circuit.output_name
        ):
            skipped[node.name] = f"normalised to [-1, 1] for {users[0].name}"
    return skipped


def _bits(error: float, peak: float) -> float | None:
    """Bits of precision, ``-log2(error / peak)``; ``None`` when exact or the value is zero."""
    if error == 0.0 or peak == 0.0:
        return None
    return -math.log2(error / peak)


# -- setup -----------------------------------------------------------------------------------


def _backend_names(backends: Sequence[str]) -> list[str]:
    from he_inference.backends import BACKENDS, available_backends

    names: list[str] = []
    for name in backends:
        if name == "all":
            names += [b for b in available_backends() if b in ENCRYPTING_BACKENDS]
        elif name not in BACKENDS:
            raise ConfigurationError(
                f"unknown backend {name!r}: choose seal, openfhe, plain or all"
            )
        else:
            names.append(name)
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigurationError("no encrypting backend is installed: pip install tenseal")
    return names


def _load_data(path: Path | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Calibration inputs and query inputs from a ``.npz`` or ``.npy`` file."""
    if path is None:
        return None, None
    if path.suffix == ".npy":
        data = np.asarray(np.load(path, allow_pickle=False))
        return data, data
    if path.suffix != ".npz":
        raise ConfigurationError(f"{path}: give calibration data as .npz or .npy")
    with np.load(path, allow_pickle=False) as npz:
        if not npz.files:
            raise ConfigurationError(f"{path} holds no arrays")
        first = npz[npz.files[0]]
        calib = npz["x_calib"] if "x_calib" in npz.files else first
        test = npz["x_test"] if "x_test" in npz.files else calib
        return np.asarray(calib), np.asarray(test)


def _workload(
    model: Path,
    backend: str,
    x_calib: np.ndarray | None,
    x_test: np.ndarray | None,
    count: int,
    batch: int | None,
) -> Workload:
    from client.inputs import check_queries

    imported = None
    batch_circuit = None
    if model.suffix == ".onnx":
        from compiler import compile_model
        from compiler.onnx_import import import_model

        target = backend if backend in ENCRYPTING_BACKENDS else "seal"
        circuit = compile_model(model, x_calib, name=model.stem, backend=target)
        imported = import_model(model)
        if batch is not None and batch > 1:
            batch_circuit = compile_model(
                model, x_calib, name=f"{model.stem}-batch{batch}", backend=target, batch=batch
            )
    elif model.suffix == ".hec":
        circuit = Circuit.load(model)
    else:
        raise ConfigurationError(f"{model}: give an ONNX model (.onnx) or a circuit (.hec)")

    layout = circuit.input_layout
    if x_test is None:
        low, high = circuit.input_range or (0.0, 1.0)
        rng = np.random.default_rng(0)
        queries = rng.uniform(low, high, (count, *layout.shape))
    else:
        queries, _ = check_queries(x_test, layout, circuit.input_range, allow_out_of_range=True)
    if len(queries) < count:
        raise ConfigurationError(f"--count {count} and the data holds {len(queries)} queries")
    return Workload(circuit, queries[:count], imported, batch_circuit)


def _query_groups(queries: np.ndarray, per_set: int) -> list[np.ndarray]:
    return [queries[i : i + per_set] for i in range(0, len(queries), per_set)]


def _node_rows(
    circuit: Circuit, backend: str, runs: list[list[NodeTiming]], precision: _Precision
) -> list[dict[str, Any]]:
    estimates, note = _estimates(circuit, backend)
    medians = [statistics.median(run[i].seconds for run in runs) for i in range(len(runs[0]))]
    total = sum(medians) or 1.0
    rows = []
    for i, node in enumerate(circuit.nodes):
        seconds = [run[i].seconds for run in runs]
        rows.append(
            {
                "name": node.name,
                "kind": node.kind,
                "sources": list(node.sources),
                "level_in": node.level_in,
                "level_out": node.level_out,
                "cost": node_cost(node).to_dict(),
                "seconds": _stats(seconds),
                "share": medians[i] / total,
                "estimate_s": estimates[i] if estimates else None,
                "estimate_note": note,
                "precision": precision.node(node.name),
            }
        )
    return rows


def _estimates(circuit: Circuit, backend: str) -> tuple[list[float] | None, str | None]:
    from he_inference import costmodel

    try:
        return [e.seconds for e in costmodel.estimate(circuit, backend)], None
    except (HEInferenceError, KeyError) as exc:
        return None, str(exc)


# -- facts about the run -----------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _circuit_facts(circuit: Circuit) -> dict[str, Any]:
    return {
        "name": circuit.name,
        "content_hash": circuit.content_hash(),
        "params": circuit.params.to_dict(),
        "depth": circuit.depth,
        "rotation_steps": list(circuit.rotation_steps),
        "input_layout": circuit.input_layout.to_dict(),
        "output_layout": circuit.output_layout.to_dict(),
    }


def machine(load_before: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """The machine a benchmark ran on, with the load averages around it when given."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if load_before is not None:
        info["load_average_before"] = load_before
        info["load_average_after"] = os.getloadavg()
    return info


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"he-inference": PACKAGE_VERSION}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@contextlib.contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Progress]:
    bar = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )
    with bar:
        yield bar


# -- presentation ------------------------------------------------------------------------------


def print_report(result: dict[str, Any], console: Console) -> None:
    """The per-layer table and the summary lines of every backend, then the server's."""
    for name, report in result["backends"].items():
        console.print(_node_table(name, report))
        for line in _summary_lines(report):
            console.print(line, highlight=False)
        console.print()
    if result["server"]:
        for line in _server_lines(result["server"]):
            console.print(line, highlight=False)


def _node_table(name: str, report: dict[str, Any]) -> Table:
    params = report["circuit"]["params"]
    nodes = report["nodes"]
    with_estimate = nodes[0]["estimate_s"] is not None
    table = Table(
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        title=f"{report['circuit']['name']} on {name} ({report['library_version']}), "
        f"N={params['poly_modulus_degree']}, median of {nodes[0]['seconds']['n']}",
        caption=None if with_estimate else f"no cost estimate: {nodes[0]['estimate_note']}",
    )
    # The circuit value's own name is the ONNX tensor it holds; it stays in the JSON, and
    # the ONNX nodes it came from are what a reader looks for.
    columns = ["ONNX nodes", "kind", "level", "rot", "pt mul", "ct mul", "median s", "min-max"]
    columns += ["share", *(["estimate"] if with_estimate else []), "max err", "bits"]
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for node in nodes:
        cost, seconds, precision = node["cost"], node["seconds"], node["precision"]
        row = [
            "\n".join(node["sources"]) or node["name"],
            node["kind"],
            f"{node['level_in']}->{node['level_out']}",
            str(cost["rotations"]),
            str(cost["plain_multiplications"]),
            str(cost["multiplications"]),
            f"{seconds['median']:.4f}",
            f"{seconds['min']:.3f}-{seconds['max']:.3f}",
            f"{node['share']:.0%}",
        ]
        if with_estimate:
            row.append(f"{node['estimate_s']:.4f}")
        if precision["max_abs_error"] is None:
            row += ["n/a", "n/a"]
        else:
            bits = precision["bits"]
            shown = "exact" if bits is None else f"{bits:.1f}"
            row += [f"{precision['max_abs_error']:.2e}", shown]
        table.add_row(*row)
    return table


def _summary_lines(report: dict[str, Any]) -> list[str]:
    keys = report["evaluation_keys"]
    e2e = report["end_to_end_s"]
    lines = [
        f"key generation {report['keygen_s']:.2f} s; evaluation keys {_mb(keys['envelope_bytes'])}"
        f" (relin_keys {_mb(keys.get('relin_keys_bytes', 0))}, galois_keys "
        f"{_mb(keys.get('galois_keys_bytes', 0))} for {keys['galois_key_count']} steps)",
        f"query {_mb(report['query_bytes'])}, result {_mb(report['result_bytes'])}; encrypt "
        f"{report['encrypt_s']['median'] * 1e3:.1f} ms, decrypt "
        f"{report['decrypt_s']['median'] * 1e3:.1f} ms",
        f"evaluate {report['evaluate_s']['median']:.3f} s (cold, encoding plaintexts: "
        f"{report['cold_evaluate_s']:.3f} s); end to end {e2e['median']:.3f} s "
        f"[{e2e['min']:.3f}, {e2e['max']:.3f}], "
        f"{report['end_to_end_per_query_s']:.3f} s per query",
    ]
    output = report["output"]
    if output:
        lines.append(
            f"output vs onnxruntime over {_queries(output['queries'])}: max abs error "
            f"{output['max_abs_error']:.2e}, argmax agreement {output['argmax_agreement']:.0%}"
        )
    batch = report["batch"]
    if batch:
        lines.append(
            f"batch of {batch['queries_per_ciphertext']}: end to end "
            f"{batch['end_to_end_s']['median']:.3f} s, {batch['end_to_end_per_query_s']:.3f} s "
            f"per query (N={batch['circuit']['params']['poly_modulus_degree']}, query "
            f"{_mb(batch['query_bytes'])}, keys {_mb(batch['evaluation_key_bytes'])})"
        )
    return lines


def _server_lines(server: dict[str, Any]) -> list[str]:
    return [
        f"server {server['url']} ({server['backend']}, model {server['model']}): keys "
        f"{server['keygen_s']:.2f} s, upload {_mb(server['evaluation_key_bytes'])} in "
        f"{server['upload_s']:.2f} s",
        f"query {_mb(server['query_bytes'])}, result {_mb(server['result_bytes'])}; round trip "
        f"{server['round_trip_s']['median']:.3f} s = server evaluation "
        f"{server['server_evaluate_s']['median']:.3f} s + transport and serialisation "
        f"{server['transport_s']['median']:.3f} s; end to end "
        f"{server['end_to_end_s']['median']:.3f} s (first query "
        f"{server['cold_end_to_end_s']:.3f} s)",
    ]


def write_json(result: dict[str, Any], path: Path) -> None:
    """The report as indented JSON with sorted keys, so two runs diff line by line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def write_plot(result: dict[str, Any], path: Path) -> None:
    """A bar chart of the median seconds of each layer, one bar per backend (PNG).

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigurationError(
            f"--plot needs matplotlib ({exc}): pip install 'he-inference[bench]'"
        ) from exc

    reports = result["backends"]
    labels = [" + ".join(n["sources"]) or n["name"] for n in next(iter(reports.values()))["nodes"]]
    width = 0.8 / len(reports)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(labels)), 4.5))
    for i, (name, report) in enumerate(reports.items()):
        medians = [n["seconds"]["median"] for n in report["nodes"]]
        spread = [
            [m - n["seconds"]["min"] for m, n in zip(medians, report["nodes"], strict=True)],
            [n["seconds"]["max"] - m for m, n in zip(medians, report["nodes"], strict=True)],
        ]
        positions = np.arange(len(medians)) + (i - (len(reports) - 1) / 2) * width
        axes.bar(positions, medians, width, yerr=spread, capsize=3, label=name)
    axes.set_xticks(np.arange(len(labels)))
    axes.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("seconds (median, min-max bars)")
    axes.set_title(f"{Path(result['model']).name}: time per layer")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _queries(n: int) -> str:
    return f"{n} query" if n == 1 else f"{n} queries"


def _mb(size: float) -> str:
    return f"{size / 1e6:.2f} MB"
