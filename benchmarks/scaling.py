"""How latency and key bytes grow with input size, width, depth and ring degree.

    python -m benchmarks.scaling [--backend seal] [--repeat 3]
        [--json benchmarks/results/scaling.json] [--plot benchmarks/results/scaling.png]

Every model is a small MLP built with ``onnx.helper`` (Gemm, x*x, Gemm, ...), with seeded
random weights scaled by 1/sqrt(fan-in) so that the squares stay near 1, calibrated on
uniform inputs in [-1, 1]. Four sweeps, one variable each, the others held at the base
point (64 inputs, 64 hidden units, 1 hidden layer, 10 outputs):

- inputs 64, 256, 1024, 4096: the first linear map's diagonals and baby-step rotations;
- hidden width 16, 64, 256, 1024: both linear maps;
- hidden layers 1, 2, 3, 4: two levels each (a linear map and a square), so the chain and
  perhaps the ring grow too;
- ring degree 8192, 16384, 32768 on the 64-16-10 model: the compiler picks the smallest
  ring that fits, so the larger rings are forced by swapping the circuit's parameters
  for the same modulus chain on a larger ring. The slot layout stays valid (the circuit
  uses the first slots and leaves the rest zero) and only N changes, which is the point.

Each point reports compile, keygen, the warm evaluation time (median of ``--repeat``
after one cold run), the evaluation-key envelope bytes, and the largest error of the
decrypted logits against onnxruntime as a check that the point computed the right thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.bench import machine

RESULTS = Path(__file__).parent / "results"
OUTPUTS = 10
BASE = {"inputs": 64, "hidden": 64, "layers": 1}
SWEEPS: dict[str, list[int]] = {
    "inputs": [64, 256, 1024, 4096],
    "hidden": [16, 64, 256, 1024],
    "layers": [1, 2, 3, 4],
    "ring": [8192, 16384, 32768],
}
RING_MODEL = {"inputs": 64, "hidden": 16, "layers": 1}
CALIBRATION = 64


def mlp_model(inputs: int, hidden: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """``layers`` times (Gemm, x*x), then a Gemm to 10 outputs; input ``[1, inputs]``."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    previous, width = "input", inputs
    for index in range(layers + 1):
        out_width = hidden if index < layers else OUTPUTS
        weight = rng.normal(0.0, 1.0 / np.sqrt(width), (out_width, width)).astype(np.float32)
        bias = rng.normal(0.0, 0.1, out_width).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"fc{index}.weight"),
            numpy_helper.from_array(bias, f"fc{index}.bias"),
        ]
        gemm = f"fc{index}_out" if index < layers else "logits"
        nodes.append(
            helper.make_node(
                "Gemm",
                [previous, f"fc{index}.weight", f"fc{index}.bias"],
                [gemm],
                name=f"fc{index}",
                transB=1,
            )
        )
        if index < layers:
            square = f"act{index}_out"
            nodes.append(helper.make_node("Mul", [gemm, gemm], [square], name=f"act{index}"))
            previous = square
        width = out_width
    graph = helper.make_graph(
        nodes,
        f"mlp_{inputs}_{hidden}_{layers}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, OUTPUTS])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _reference(model: onnx.ModelProto, queries: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": q[None]})[0] for q in queries])


def measure_point(
    model: onnx.ModelProto, backend_name: str, repeat: int, ring: int | None = None
) -> dict[str, Any]:
    """Compile (forcing ``ring`` when given), keygen, one cold and ``repeat`` warm runs."""
    from compiler import compile_model
    from he_inference import wire
    from he_inference.backends import make_backend
    from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input
    from he_inference.params import CkksParameters

    inputs = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(1)
    calibration = rng.uniform(-1, 1, (CALIBRATION, inputs)).astype(np.float32)
    queries = rng.uniform(-1, 1, (max(repeat, 1), inputs)).astype(np.float32)

    start = time.perf_counter()
    circuit = compile_model(model, calibration, backend=backend_name, name=model.graph.name)
    compile_s = time.perf_counter() - start
    chosen_ring = circuit.params.poly_modulus_degree
    if ring is not None and ring != chosen_ring:
        if ring < chosen_ring:
            raise SystemExit(f"the model needs N={chosen_ring}; cannot force N={ring}")
        params = circuit.params
        forced = CkksParameters(
            ring, params.coeff_modulus_bits, params.scale_bits, params.security_level
        )
        circuit = dataclasses.replace(circuit, params=forced)

    backend = make_backend(backend_name, circuit.params)
    start = time.perf_counter()
    backend.generate_keys(circuit.rotation_steps)
    keygen_s = time.perf_counter() - start
    key_bytes = len(wire.encode_evaluation_keys(backend))
    evaluator = Evaluator(circuit, backend)

    start = time.perf_counter()
    evaluator.run(encrypt_input(circuit, backend, queries[:1]))
    cold_s = time.perf_counter() - start
    seconds, logits = [], []
    for query in queries[:repeat]:
        cts = encrypt_input(circuit, backend, query[None])
        start = time.perf_counter()
        out, _ = evaluator.run(cts)
        seconds.append(time.perf_counter() - start)
        logits.append(decrypt_output(circuit, backend, out).reshape(-1))
    error = float(np.abs(np.stack(logits) - _reference(model, queries[:repeat])).max())
    return {
        "model": model.graph.name,
        "poly_modulus_degree": circuit.params.poly_modulus_degree,
        "chosen_ring": chosen_ring,
        "coeff_modulus_bits": list(circuit.params.coeff_modulus_bits),
        "depth": circuit.params.depth,
        "rotation_steps": len(circuit.rotation_steps),
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "evaluation_key_bytes": key_bytes,
        "cold_evaluate_s": cold_s,
        "evaluate_s": statistics.median(seconds),
        "evaluate_samples_s": seconds,
        "max_abs_logit_diff": error,
    }


def run_sweeps(
    backend_name: str, repeat: int, sweeps: dict[str, list[int]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every sweep's points; the base point is measured once and shared between sweeps."""
    sweeps = sweeps or SWEEPS
    done: dict[tuple[int, int, int, int | None], dict[str, Any]] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    for variable, values in sweeps.items():
        results[variable] = []
        for value in values:
            shape = dict(RING_MODEL) if variable == "ring" else {**BASE, variable: value}
            ring = value if variable == "ring" else None
            key = (shape["inputs"], shape["hidden"], shape["layers"], ring)
            if key not in done:
                print(f"  {variable}={value} {shape} ...", file=sys.stderr, flush=True)
                model = mlp_model(shape["inputs"], shape["hidden"], shape["layers"])
                done[key] = measure_point(model, backend_name, repeat, ring)
            results[variable].append({variable: value, **shape, **done[key]})
    return results


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One block per sweep: the variable, N, depth, steps, timings, keys and the error."""
    header = (
        f"{'sweep':7} {'value':>6} {'N':>6} {'L':>3} {'steps':>5} {'keygen s':>8} "
        f"{'keys MB':>8} {'eval ms':>8} {'cold ms':>8} {'max err':>8}"
    )
    lines = [header, "-" * len(header)]
    for variable, points in results.items():
        for p in points:
            lines.append(
                f"{variable:7} {p[variable]:>6} {p['poly_modulus_degree']:>6} {p['depth']:>3} "
                f"{p['rotation_steps']:>5} {p['keygen_s']:>8.2f} "
                f"{p['evaluation_key_bytes'] / 1e6:>8.1f} {p['evaluate_s'] * 1e3:>8.1f} "
                f"{p['cold_evaluate_s'] * 1e3:>8.1f} {p['max_abs_logit_diff']:>8.1e}"
            )
    return "\n".join(lines)


def _span(values: list[float]) -> tuple[float, float]:
    """Log-axis limits a factor 1.5 beyond the smallest and largest value."""
    return min(values) / 1.5, max(values) * 1.5


def write_plot(results: dict[str, list[dict[str, Any]]], path: Path, backend: str) -> None:
    """One panel per sweep: evaluation time (left, log) and key bytes (right, log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "inputs": "input size (hidden 64, 1 layer)",
        "hidden": "hidden width (64 inputs, 1 layer)",
        "layers": "hidden layers (64 inputs, width 64)",
        "ring": "ring degree N (64-16-10, same chain)",
    }
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8))
    for axis, (variable, points) in zip(np.atleast_1d(axes), results.items(), strict=True):
        xs = [p[variable] for p in points]
        axis.plot(xs, [p["evaluate_s"] * 1e3 for p in points], "o-", color="tab:blue")
        axis.set_yscale("log")
        axis.set_ylabel("evaluation ms", color="tab:blue")
        if variable != "layers":
            axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_title(titles.get(variable, variable), fontsize=9)
        twin = axis.twinx()
        keys = [p["evaluation_key_bytes"] / 2**20 for p in points]
        twin.plot(xs, keys, "s--", color="tab:orange")
        twin.set_yscale("log")
        # One scale for every panel, so a step from 4 to 6 MiB looks like what it is.
        axis.set_ylim(*_span([p["evaluate_s"] * 1e3 for q in results.values() for p in q]))
        twin.set_ylim(
            *_span([p["evaluation_key_bytes"] / 2**20 for q in results.values() for p in q])
        )
        twin.set_ylabel("evaluation keys MiB", color="tab:orange")
        axis.grid(alpha=0.3, which="both")
    fig.suptitle(f"he-inference on {backend}: scaling of a square-activation MLP", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every sweep, print the table, write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="seal")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "scaling.png")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be between 1 and 10")

    start = time.perf_counter()
    load_before = os.getloadavg()
    results = run_sweeps(args.backend, args.repeat)
    print(format_table(results))
    report = {
        "schema": "he-inference-scaling",
        "backend": args.backend,
        "repeat": args.repeat,
        "base": BASE,
        "ring_model": RING_MODEL,
        "machine": machine(load_before),
        "wall_s": time.perf_counter() - start,
        "sweeps": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    write_plot(results, args.plot, args.backend)
    print(f"wrote {args.json} and {args.plot} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
