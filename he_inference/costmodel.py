"""Latency estimates for a circuit from the measured primitive costs.

``benchmarks/primitives.py`` times each primitive at the top of the deepest 128-bit chain
of each ring degree. A circuit's node runs at its own level of its own (usually shorter)
chain, and every primitive here costs about linearly in the number of RNS limbs it touches
(key switching a little more), so each measured time is scaled by
``limbs at the node's level / limbs measured``. The estimate is for one core and a quiet
machine; the benchmark prints it beside the measurement so the gap stays visible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_inference.circuit import Circuit, node_cost
from he_inference.errors import ConfigurationError

DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "primitives.json"


@dataclass(frozen=True)
class NodeEstimate:
    """The estimated seconds of one circuit node."""

    name: str
    kind: str
    seconds: float


def load_table(path: Path | None = None) -> list[dict[str, Any]]:
    """The rows written by ``benchmarks/primitives.py``.

    Raises:
        ConfigurationError: the file is missing or malformed.
    """
    path = path or DEFAULT_TABLE
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigurationError(
            f"no primitive cost table at {path} ({exc}): run 'python -m benchmarks.primitives'"
        ) from exc
    return list(rows)


def _row_for(rows: list[dict[str, Any]], backend: str, ring_degree: int) -> dict[str, Any]:
    candidates = [r for r in rows if r["backend"] == backend]
    if not candidates:
        raise ConfigurationError(f"the cost table has no rows for backend {backend!r}")
    return min(
        candidates,
        key=lambda r: (
            abs(r["poly_modulus_degree"] - ring_degree)
            + (0 if r["poly_modulus_degree"] == ring_degree else 1)
        ),
    )


def estimate(
    circuit: Circuit, backend: str = "seal", rows: list[dict[str, Any]] | None = None
) -> list[NodeEstimate]:
    """Estimated seconds per node of ``circuit`` on ``backend``."""
    rows = rows if rows is not None else load_table()
    row = _row_for(rows, backend, circuit.params.poly_modulus_degree)
    seconds = row["seconds"]
    ring_ratio = circuit.params.poly_modulus_degree / row["poly_modulus_degree"]
    measured_limbs = len(row["coeff_modulus_bits"]) - 1
    circuit_limbs = len(circuit.params.coeff_modulus_bits) - 1
    out = []
    for node in circuit.nodes:
        cost = node_cost(node)
        limbs = max(1, circuit_limbs - node.level_in)
        factor = ring_ratio * limbs / measured_limbs
        rotate = seconds["rotate"]
        if row.get("hoisted_rotations"):
            rotate = seconds["rotate_8_steps"] / 8
        total = (
            cost.rotations * rotate
            + cost.plain_multiplications * (seconds["multiply_plain_rescale"] - seconds["rescale"])
            + cost.multiplications * (seconds["multiply_relinearize_rescale"] - seconds["rescale"])
            + cost.rescales * seconds["rescale"]
            + cost.additions * seconds["add"]
        )
        out.append(NodeEstimate(node.name, node.kind, total * factor))
    return out
