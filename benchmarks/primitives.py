"""Cost of each CKKS primitive per backend and ring degree: the table the cost model reads.

    python -m benchmarks.primitives [--backend seal|openfhe|all] [--ring 8192 16384 32768]
        [--repeat 5] [--json benchmarks/results/primitives.json]

For each ring degree the chain is the longest one the 128-bit bound allows at scale 2^40,
so each row is the most expensive context of its size. Times are medians over the repeats,
taken at the top of the chain (level 0), where every primitive is at its dearest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from he_inference.backends import available_backends, make_backend
from he_inference.params import MAX_MODULUS_BITS, CkksParameters, chain_bits

ROTATION_STEPS = (1, 2, 3, 4, 5, 6, 7, 8)
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "primitives.json"


def chain_for(ring_degree: int, scale_bits: int = 40, integer_bits: int = 20) -> CkksParameters:
    """The deepest chain at this ring degree under the 128-bit bound."""
    bound = MAX_MODULUS_BITS[128][ring_degree]
    depth = max(1, (bound - 2 * min(60, scale_bits + integer_bits)) // scale_bits)
    return CkksParameters(ring_degree, chain_bits(depth, scale_bits, integer_bits), scale_bits)


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(backend_name: str, ring_degree: int, repeat: int) -> dict[str, Any]:
    """Key sizes and primitive times for one backend at one ring degree."""
    params = chain_for(ring_degree)
    client = make_backend(backend_name, params)
    start = time.perf_counter()
    client.generate_keys(ROTATION_STEPS)
    keygen_s = time.perf_counter() - start

    kinds = ("public_key", "relin_keys", "galois_keys", "secret_key")
    keys = client.serialize_keys(kinds)
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, params.slots)
    a, b = client.encrypt(values), client.encrypt(values)
    plaintext = client.encode(values, 0)
    product = client.multiply(a, b)

    times = {
        "encrypt": _median_seconds(lambda: client.encrypt(values), repeat),
        "decrypt": _median_seconds(lambda: client.decrypt(a), repeat),
        "encode": _median_seconds(lambda: client.encode(values, 0), repeat),
        "add": _median_seconds(lambda: client.add(a, b), repeat),
        "multiply_plain_rescale": _median_seconds(
            lambda: client.rescale(client.multiply_plain(a, plaintext)), repeat
        ),
        "multiply_relinearize_rescale": _median_seconds(
            lambda: client.rescale(client.multiply(a, b)), repeat
        ),
        "rescale": _median_seconds(lambda: client.rescale(product), repeat),
        "rotate": _median_seconds(lambda: client.rotate(a, 1), repeat),
        "rotate_8_steps": _median_seconds(lambda: client.rotate_many(a, ROTATION_STEPS), repeat),
    }
    return {
        "backend": backend_name,
        "library_version": client.library_version,
        "poly_modulus_degree": ring_degree,
        "coeff_modulus_bits": list(params.coeff_modulus_bits),
        "depth": params.depth,
        "hoisted_rotations": client.supports_hoisting,
        "keygen_s": keygen_s,
        "bytes": {
            "public_key": len(keys["public_key"]),
            "relin_keys": len(keys["relin_keys"]),
            "galois_keys_per_step": len(keys["galois_keys"]) // len(ROTATION_STEPS),
            "secret_key": len(keys["secret_key"]),
            "ciphertext_fresh": len(client.serialize_ciphertext(a)),
            "ciphertext_after_multiply": len(
                client.serialize_ciphertext(client.rescale(client.multiply(a, b)))
            ),
        },
        "seconds": times,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the measurements."""
    header = (
        f"{'backend':8} {'N':>6} {'L':>3} {'keygen s':>9} {'relin KB':>9} "
        f"{'galois KB/step':>14} {'ct KB':>7} {'enc ms':>7} {'dec ms':>7} "
        f"{'add ms':>7} {'ptmul ms':>8} {'mul ms':>7} {'rot ms':>7} {'8rot ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        s, b = r["seconds"], r["bytes"]
        lines.append(
            f"{r['backend']:8} {r['poly_modulus_degree']:>6} {r['depth']:>3} "
            f"{r['keygen_s']:>9.2f} {b['relin_keys'] / 1024:>9.0f} "
            f"{b['galois_keys_per_step'] / 1024:>14.0f} {b['ciphertext_fresh'] / 1024:>7.0f} "
            f"{s['encrypt'] * 1e3:>7.1f} {s['decrypt'] * 1e3:>7.1f} {s['add'] * 1e3:>7.2f} "
            f"{s['multiply_plain_rescale'] * 1e3:>8.1f} "
            f"{s['multiply_relinearize_rescale'] * 1e3:>7.1f} {s['rotate'] * 1e3:>7.1f} "
            f"{s['rotate_8_steps'] * 1e3:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="all", choices=["all", "seal", "openfhe"])
    parser.add_argument("--ring", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    names = [n for n in available_backends() if n != "plain"]
    if args.backend != "all":
        names = [n for n in names if n == args.backend]
    rows = []
    for name in names:
        for ring in args.ring:
            print(f"measuring {name} at N={ring} ...", flush=True)
            rows.append(measure(name, ring, args.repeat))
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "rotation_steps": ROTATION_STEPS}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
