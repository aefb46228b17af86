"""The compile report: a circuit's cost per node, its key and ciphertext sizes, its latency.

``he-infer compile`` prints it as a table or JSON, and the tests read it as a dict. It is
kept apart from the command line so that building the figures (estimated from N and the
modulus chain, or measured by generating keys on a backend) does not depend on typer, and
printing takes the console it is given. The backends and the cost table are imported inside
the functions that need them, so the command line's start stays fast.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from he_inference.errors import HEInferenceError


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


def print_report(summary: dict[str, Any], console: Console) -> None:
    """Print a :func:`circuit_report` summary on ``console``: the node table, then totals."""
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
        f"evaluation keys {format_mb(sizes['evaluation_key_bytes'])}, query "
        f"{format_mb(sizes['query_bytes'])}, result {format_mb(sizes['result_bytes'])} "
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


#: Fewer calibration samples than this rarely reach the ranges real inputs take.
MIN_CALIBRATION_SAMPLES = 16


def compile_warnings(
    circuit: Any,
    calibration: np.ndarray | None,
    sizes: dict[str, Any],
    key_limit: int | None,
) -> list[str]:
    """What a compiled circuit may get wrong in use, for the compile command to warn about.

    Args:
        circuit: the compiled circuit.
        calibration: the calibration data it was compiled with, if any.
        sizes: the ``sizes`` of its :func:`circuit_report`.
        key_limit: the server's default evaluation-key upload limit in bytes, if known.
    """
    warnings = []
    if calibration is not None:
        per_sample = math.prod(circuit.input_layout.shape) or 1
        samples = calibration.size // per_sample
        if samples < MIN_CALIBRATION_SAMPLES:
            warnings.append(
                f"the calibration data holds {samples} sample{'s' if samples != 1 else ''}: "
                f"the activation ranges measured on so few may be too narrow for real "
                f"inputs, which are then refused as out of range; give at least "
                f"{MIN_CALIBRATION_SAMPLES} (a few hundred is better)"
            )
    # Estimates run up to about a fifth below SEAL's measured sizes: warn with that margin.
    key_bytes = int(sizes["evaluation_key_bytes"] * (1.0 if "measured" in sizes["how"] else 1.25))
    if key_limit is not None and key_bytes > key_limit:
        warnings.append(
            f"the evaluation keys take {key_bytes / (1 << 20):.0f} MiB ({sizes['how']}), more "
            f"than the {key_limit / (1 << 20):.0f} MiB a server accepts by default: serve "
            f"this model with "
            f"'he-infer serve --max-key-mb {math.ceil(key_bytes * 1.1 / (1 << 20))}' "
            f"(Settings.max_key_bytes)"
        )
    return warnings


def format_mb(size: int | float) -> str:
    """A byte count in megabytes (10^6 bytes), two decimals."""
    return f"{size / 1e6:.2f} MB"
