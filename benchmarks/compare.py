"""he-inference against plaintext onnxruntime, hand-written TenSEAL and Orion, in one run.

    python -m benchmarks.compare [--activation square|relu|silu] [--count 20]
        [--baseline-count 5] [--openfhe-count 3] [--agreement-count 100]
        [--orion-python /tmp/vorion/bin/python] [--no-orion] [--json OUT] [--plot OUT]

Same model, same digits, same machine, same process (Orion aside, which needs its own
interpreter and runs as a subprocess). The machine is shared with other jobs, so the
systems are measured side by side: query ``i`` goes through every system in turn before
query ``i + 1`` starts, and the ratios are taken both as ratios of medians and as medians
of the per-query ratios, which a load spike affects less.

What is timed as "latency" is the server's evaluation of one query: the ciphertexts in
memory, the result ciphertexts out, no encryption, no (de)serialisation, no decryption.
For he-inference that is :meth:`Evaluator.run` after one cold run that encodes and caches
the plaintexts; for TenSEAL it is :func:`benchmarks.tenseal_baseline.evaluate`, which
encodes its plaintexts anew on every call (TenSEAL's high-level API keeps no cache), for
Orion its module's forward pass. Key bytes are what a client uploads: he-inference's
evaluation-key envelope (``wire.encode_evaluation_keys``: relinearisation keys and Galois
keys for the circuit's steps), TenSEAL's serialised public context (public, relinearisation
and Galois keys for every power-of-two step) and Orion's rotation keys as it saves them.

The top-1 agreement check runs he-inference on SEAL over ``--agreement-count`` held-out
digits (the first ``--count`` of them are the timed ones) against onnxruntime's argmax.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import machine

logger = logging.getLogger(__name__)

ZOO = Path(__file__).parent / "zoo"
RESULTS = Path(__file__).parent / "results"
DEFAULT_ORION_PYTHON = Path("/tmp/vorion/bin/python")
ORION_TIMEOUT_S = 900

# The targets the README reports against: (ratio key, comparison, bound).
TARGETS: dict[str, tuple[str, float]] = {
    "tenseal_latency_over_he_seal": (">=", 10.0),
    "orion_latency_over_he_seal": (">", 1.0),
    "he_seal_keys_over_tenseal_context": ("<=", 0.2),
}

SYSTEM_LABELS = {
    "onnxruntime": "onnxruntime (plaintext)",
    "he_seal": "he-inference, SEAL",
    "he_openfhe": "he-inference, OpenFHE",
    "tenseal": "TenSEAL by hand",
    "orion": "Orion (Lattigo)",
}


@dataclass
class Contender:
    """One system under test: its one-off figures and a function that answers one query.

    ``answer`` takes one image and returns the timed seconds, the logits and the query and
    result bytes of that query.
    """

    name: str
    setup: dict[str, Any]
    answer: Callable[[np.ndarray], tuple[float, np.ndarray, int, int]]
    count: int
    seconds: list[float] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    query_bytes: int = 0
    result_bytes: int = 0


# -- the systems ----------------------------------------------------------------------------


def prepare_onnxruntime(model: Path, count: int, inner_repeat: int = 20) -> Contender:
    """Plaintext onnxruntime, one image per run (the exported graph fixes batch 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def answer(image: np.ndarray) -> tuple[float, np.ndarray, int, int]:
        feed = {input_name: image[None].astype(np.float32)}
        logits = session.run(None, feed)[0][0]
        # One run takes tens of microseconds: the mean of a few runs is steadier than one.
        start = time.perf_counter()
        for _ in range(inner_repeat):
            session.run(None, feed)
        return (time.perf_counter() - start) / inner_repeat, logits, 0, 0

    return Contender("onnxruntime", {"inner_repeat": inner_repeat}, answer, count)


def prepare_he(model: Path, x_calib: np.ndarray, backend_name: str, count: int) -> Contender:
    """he-inference: compile, keygen, cold run; ``answer`` encrypts, evaluates, decrypts."""
    from compiler import compile_model
    from he_inference import wire
    from he_inference.backends import make_backend
    from he_inference.errors import InsecureParametersError
    from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input

    start = time.perf_counter()
    flooding: bool | str = backend_name == "openfhe"
    try:
        circuit = compile_model(model, x_calib, backend=backend_name)
    except InsecureParametersError as exc:
        if backend_name != "openfhe":
            raise
        # A flooding chain (scale 2^59) too long for N=32768: measure OpenFHE without it.
        logger.warning("OpenFHE without noise flooding: %s", exc)
        flooding = f"off: {exc}"
        start = time.perf_counter()
        circuit = compile_model(model, x_calib, backend=backend_name, noise_flooding=False)
    compile_s = time.perf_counter() - start

    backend = make_backend(backend_name, circuit.params)
    start = time.perf_counter()
    backend.generate_keys(circuit.rotation_steps)
    keygen_s = time.perf_counter() - start
    keys = backend.serialize_keys()
    evaluator = Evaluator(circuit, backend)

    start = time.perf_counter()
    evaluator.run(encrypt_input(circuit, backend, x_calib[:1]))
    cold_s = time.perf_counter() - start

    def answer(image: np.ndarray) -> tuple[float, np.ndarray, int, int]:
        cts = encrypt_input(circuit, backend, image[None])
        start = time.perf_counter()
        out, _ = evaluator.run(cts)
        seconds = time.perf_counter() - start
        logits = decrypt_output(circuit, backend, out).reshape(-1)
        query = len(wire.encode_ciphertexts(backend, cts, model=circuit.name))
        result = len(wire.encode_ciphertexts(backend, out, model=circuit.name))
        return seconds, logits, query, result

    setup = {
        "library_version": backend.library_version,
        "poly_modulus_degree": circuit.params.poly_modulus_degree,
        "coeff_modulus_bits": list(circuit.params.coeff_modulus_bits),
        "scale_bits": circuit.params.scale_bits,
        "depth": circuit.params.depth,
        "rotation_steps": len(circuit.rotation_steps),
        "noise_flooding": flooding,
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "cold_evaluate_s": cold_s,
        "key_bytes": len(wire.encode_evaluation_keys(backend)),
        "key_bytes_by_kind": {kind: len(blob) for kind, blob in keys.items()},
        "key_bytes_what": "evaluation-key envelope (relin_keys + galois_keys for the steps)",
    }
    return Contender(f"he_{backend_name}", setup, answer, count)


def prepare_tenseal(model: Path, x_calib: np.ndarray, count: int) -> Contender:
    """The hand-written TenSEAL network; the server half holds only the public context."""
    import tenseal as ts

    from benchmarks import tenseal_baseline as tb

    digits = tb.load_model(model, x_calib)
    start = time.perf_counter()
    client_context = tb.build_context(digits)
    keygen_s = time.perf_counter() - start
    public_bytes = client_context.serialize(save_secret_key=False)
    server_context = ts.context_from(public_bytes)

    def answer(image: np.ndarray) -> tuple[float, np.ndarray, int, int]:
        query_wire = tb.encrypt_query(client_context, image).serialize()
        query = ts.ckks_vector_from(server_context, query_wire)
        start = time.perf_counter()
        result = tb.evaluate(server_context, query, digits)
        seconds = time.perf_counter() - start
        result_wire = result.serialize()
        logits = np.array(ts.ckks_vector_from(client_context, result_wire).decrypt())
        return seconds, logits, len(query_wire), len(result_wire)

    poly_modulus_degree, coeff_mod_bit_sizes, scale_bits = tb.choose_parameters(digits.depth)
    setup = {
        "library_version": ts.__version__,
        "poly_modulus_degree": poly_modulus_degree,
        "coeff_modulus_bits": coeff_mod_bit_sizes,
        "scale_bits": scale_bits,
        "depth": digits.depth,
        "keygen_s": keygen_s,
        "key_bytes": len(public_bytes),
        "key_bytes_what": "public context (public, relin and power-of-two Galois keys)",
    }
    return Contender("tenseal", setup, answer, count)


def run_orion(model: Path, python: Path, count: int) -> dict[str, Any]:
    """Orion in its own interpreter (it needs CPython 3.11 and torch); its JSON, read back.

    Never raises: where it cannot run, the dict says ``unavailable`` and why.
    """
    if not python.exists():
        return {
            "unavailable": f"no Orion interpreter at {python} (see orion_baseline's docstring)"
        }
    with tempfile.TemporaryDirectory(prefix="he-compare-orion-") as tmp:
        out = Path(tmp) / "orion.json"
        command = [str(python), "-m", "benchmarks.orion_baseline", "--model", str(model)]
        command += ["--count", str(count), "--json", str(out)]
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        try:
            done = subprocess.run(
                command,
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=ORION_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"unavailable": f"Orion did not finish within {ORION_TIMEOUT_S} s"}
        if not out.exists():
            tail = (done.stdout + done.stderr)[-500:]
            return {"unavailable": f"Orion exited {done.returncode} without a report: {tail}"}
        report: dict[str, Any] = json.loads(out.read_text())
    return report


# -- the measurement ----------------------------------------------------------------------


def measure(contenders: list[Contender], images: np.ndarray) -> None:
    """Query ``i`` through every contender that still wants queries, then query ``i + 1``."""
    total = max(c.count for c in contenders)
    for i in range(total):
        for contender in contenders:
            if i >= contender.count:
                continue
            seconds, logits, query, result = contender.answer(images[i])
            contender.seconds.append(seconds)
            contender.logits.append(np.asarray(logits, dtype=np.float64))
            contender.query_bytes, contender.result_bytes = query, result
        if (i + 1) % 10 == 0 or i + 1 == total:
            print(f"  {i + 1}/{total} queries", file=sys.stderr, flush=True)


def summarise(
    contender: Contender, reference: np.ndarray, labels: np.ndarray, timed: int
) -> dict[str, Any]:
    """Latency over the first ``timed`` queries; agreement over every query it answered."""
    logits = np.stack(contender.logits)
    expected = reference[: len(logits)]
    agree = logits.argmax(1) == expected.argmax(1)
    seconds = contender.seconds[:timed]
    return {
        **contender.setup,
        "latency_s": statistics.median(seconds),
        "latency_samples_s": seconds,
        "timed_queries": len(seconds),
        "agreement_queries": len(logits),
        "top1_agreement": float(agree.mean()),
        "disagreeing_digits": [int(i) for i in np.flatnonzero(~agree)],
        "top1_accuracy": float(np.mean(logits.argmax(1) == labels[: len(logits)])),
        "max_abs_logit_diff": float(np.abs(logits - expected).max()),
        "query_bytes": contender.query_bytes,
        "result_bytes": contender.result_bytes,
    }


def _paired_ratio(slow: dict[str, Any], fast: dict[str, Any]) -> float | None:
    """Median over the queries both answered of slow / fast: steadier under shared load."""
    pairs = list(zip(slow["latency_samples_s"], fast["latency_samples_s"], strict=False))
    return statistics.median(s / f for s, f in pairs) if pairs else None


def compute_ratios(systems: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every ratio the README reports, with its target where it has one."""
    he = systems.get("he_seal")
    ratios: dict[str, dict[str, Any]] = {}

    def add(key: str, value: float | None, paired: float | None = None) -> None:
        entry: dict[str, Any] = {"value": value}
        if paired is not None:
            entry["paired_median"] = paired
        if key in TARGETS and value is not None:
            op, bound = TARGETS[key]
            entry["target"] = f"{op} {bound:g}"
            entry["met"] = {">=": value >= bound, ">": value > bound, "<=": value <= bound}[op]
        ratios[key] = entry

    if he is None:
        return ratios
    tenseal, orion = systems.get("tenseal"), systems.get("orion")
    plain, openfhe = systems.get("onnxruntime"), systems.get("he_openfhe")
    if tenseal is not None:
        add(
            "tenseal_latency_over_he_seal",
            tenseal["latency_s"] / he["latency_s"],
            _paired_ratio(tenseal, he),
        )
        add("he_seal_keys_over_tenseal_context", he["key_bytes"] / tenseal["key_bytes"])
    if orion is not None and "unavailable" not in orion:
        # Against the he-inference queries run just after Orion, where there are some.
        he_latency = he.get("latency_after_orion_s", he["latency_s"])
        add("orion_latency_over_he_seal", orion["latency_s"] / he_latency)
        if orion.get("key_bytes"):
            add("he_seal_keys_over_orion_rotation_keys", he["key_bytes"] / orion["key_bytes"])
    if plain is not None:
        add("he_seal_latency_over_plaintext", he["latency_s"] / plain["latency_s"])
    if openfhe is not None:
        add(
            "he_openfhe_latency_over_he_seal",
            openfhe["latency_s"] / he["latency_s"],
            _paired_ratio(openfhe, he),
        )
    return ratios


def orion_as_system(report: dict[str, Any]) -> dict[str, Any]:
    """Orion's JSON in the fields the table reads."""
    if "unavailable" in report:
        return report
    return {
        **report,
        "library_version": report.get("orion_version"),
        "poly_modulus_degree": 2 ** report["ckks_params"]["LogN"],
        "latency_s": report["latency_median_s"],
        "timed_queries": report["count"],
        "agreement_queries": report["count"],
        "key_bytes": report["rotation_key_bytes"],
        "key_bytes_what": report.get("rotation_key_bytes_note", "rotation keys"),
    }


# -- presentation -------------------------------------------------------------------------


COLUMNS = (
    "system",
    "N",
    "keygen s",
    "keys MB",
    "query KB",
    "result KB",
    "latency ms",
    "n",
    "top-1",
    "max |diff|",
)


def _cell(value: Any, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value if scale == 1.0 else value * scale, fmt)


def build_table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows of the comparison table, header first, one row per system in a fixed order."""
    rows: list[tuple[str, ...]] = [COLUMNS]
    for name, label in SYSTEM_LABELS.items():
        system = report["systems"].get(name)
        if system is None:
            continue
        if "unavailable" in system:
            rows.append((label, f"unavailable: {system['unavailable'][:60]}"))
            continue
        agreement = system.get("top1_agreement")
        n_agree = system.get("agreement_queries")
        rows.append(
            (
                label,
                _cell(system.get("poly_modulus_degree"), "d"),
                _cell(system.get("keygen_s"), ".2f"),
                _cell(system.get("key_bytes"), ".1f", 1e-6),
                _cell(system.get("query_bytes") or None, ".0f", 1e-3),
                _cell(system.get("result_bytes") or None, ".0f", 1e-3),
                _cell(system.get("latency_s"), ".3g", 1e3),
                _cell(system.get("timed_queries"), "d"),
                "-" if agreement is None else f"{agreement:.0%} of {n_agree}",
                _cell(system.get("max_abs_logit_diff"), ".1e"),
            )
        )
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Fixed-width text: the first column left-aligned, the others right-aligned."""
    full = [row for row in rows if len(row) == len(rows[0])]
    widths = [max(len(row[i]) for row in full) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        if len(row) != len(widths):
            lines.append(f"{row[0]:<{widths[0]}}  {' '.join(row[1:])}")
            continue
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def format_ratios(ratios: dict[str, dict[str, Any]]) -> str:
    """One line per ratio: value, per-query median where paired, target and verdict."""
    lines = []
    for key, entry in ratios.items():
        line = f"{key:40} {entry['value']:>10.3g}"
        if "paired_median" in entry:
            line += f"  (per-query median {entry['paired_median']:.3g})"
        if "target" in entry:
            line += f"  target {entry['target']}: {'met' if entry['met'] else 'MISSED'}"
        lines.append(line)
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Two log-scale bar charts: latency per query and key upload per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {
        SYSTEM_LABELS[k]: v
        for k, v in report["systems"].items()
        if k in SYSTEM_LABELS and "unavailable" not in v
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(systems)
    left.barh(names, [systems[n]["latency_s"] for n in names], color="tab:blue")
    left.set_xscale("log")
    left.set_xlim(right=5 * max(systems[n]["latency_s"] for n in names))
    left.set_xlabel("seconds per query (median, evaluation only)")
    keyed = [n for n in names if systems[n].get("key_bytes")]
    mib = [systems[n]["key_bytes"] / 2**20 for n in keyed]
    right.barh(keyed, mib, color="tab:orange")
    right.set_xscale("log")
    right.set_xlim(1, 2 * max(mib, default=10))
    for axis, values in ((left, [systems[n]["latency_s"] for n in names]), (right, mib)):
        for row, value in enumerate(values):
            axis.annotate(
                f"{value:.3g}",
                (value, row),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    right.set_xlabel("key upload, MiB")
    right.set_yticks(range(len(keyed)), keyed)
    for axis in (left, right):
        axis.invert_yaxis()
        axis.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle(
        f"digits CNN ({report['settings']['activation']}), {report['machine']['cpu_count']} "
        f"shared cores"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare every system, query them side by side, then run Orion and summarise."""
    model = args.model or ZOO / f"digits_cnn_{args.activation}.onnx"
    with np.load(args.data) as archive:
        x_calib, x_test, y_test = archive["x_calib"], archive["x_test"], archive["y_test"]
    total = max(args.count, args.agreement_count)
    if total > len(x_test):
        raise SystemExit(f"--agreement-count {total} exceeds the {len(x_test)} test digits")
    images = x_test[:total]
    load_before = os.getloadavg()

    print("preparing: onnxruntime, he-inference (seal), TenSEAL ...", file=sys.stderr)
    contenders = [
        prepare_onnxruntime(model, args.count),
        prepare_he(model, x_calib, "seal", total),
        prepare_tenseal(model, x_calib, args.baseline_count),
    ]
    if args.openfhe_count > 0:
        from he_inference.backends import available_backends

        if "openfhe" in available_backends():
            contenders.append(prepare_he(model, x_calib, "openfhe", args.openfhe_count))
    measure(contenders, images)

    session_reference = prepare_onnxruntime(model, total, inner_repeat=1)
    reference = np.stack([session_reference.answer(image)[1] for image in images])
    systems = {
        c.name: summarise(c, reference, y_test, args.count if c.name == "he_seal" else c.count)
        for c in contenders
    }
    if args.orion:
        print("running Orion in its own interpreter ...", file=sys.stderr)
        systems["orion"] = orion_as_system(run_orion(model, args.orion_python, args.orion_count))
        # Orion runs alone, minutes after the side-by-side loop, and the load from other
        # jobs moves in between: the same number of he-inference queries right after it
        # brackets the comparison in time.
        he = next(c for c in contenders if c.name == "he_seal")
        after = [he.answer(image)[0] for image in images[: args.orion_count]]
        systems["he_seal"]["latency_after_orion_s"] = statistics.median(after)
    else:
        systems["orion"] = {"unavailable": "skipped with --no-orion"}

    return {
        "schema": "he-inference-compare",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "settings": {
            "activation": args.activation,
            "count": args.count,
            "baseline_count": args.baseline_count,
            "openfhe_count": args.openfhe_count,
            "orion_count": args.orion_count,
            "agreement_count": total,
        },
        "machine": machine(load_before),
        "systems": systems,
        "ratios": compute_ratios(systems),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and ratios, write the JSON and the chart."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation", default="square", choices=["square", "relu", "silu"])
    parser.add_argument("--model", type=Path, help="default: zoo/digits_cnn_<activation>.onnx")
    parser.add_argument("--data", type=Path, default=ZOO / "digits.npz")
    parser.add_argument("--count", type=int, default=20, help="timed he-inference queries")
    parser.add_argument("--baseline-count", type=int, default=5, help="TenSEAL queries")
    parser.add_argument("--openfhe-count", type=int, default=3, help="0 skips OpenFHE")
    parser.add_argument("--orion-count", type=int, default=5)
    parser.add_argument("--agreement-count", type=int, default=100)
    parser.add_argument("--orion-python", type=Path, default=DEFAULT_ORION_PYTHON)
    parser.add_argument("--no-orion", dest="orion", action="store_false")
    parser.add_argument("--json", type=Path, help="default: results/compare_digits_<act>.json")
    parser.add_argument("--plot", type=Path, help="default: results/compare_digits_<act>.png")
    args = parser.parse_args(argv)
    if min(args.count, args.baseline_count, args.agreement_count) < 1:
        parser.error("--count, --baseline-count and --agreement-count must be at least 1")

    report = run(args)
    print(format_table(build_table(report)))
    print()
    print(format_ratios(report["ratios"]))
    stem = f"compare_digits_{args.activation}"
    json_path = args.json or RESULTS / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot_path = args.plot or RESULTS / f"{stem}.png"
    write_plot(report, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
