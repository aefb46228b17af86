"""Small hand-built circuits for tests of the core, independent of the compiler."""

from __future__ import annotations

import numpy as np

from he_inference.approx import activation, chebyshev_depth, fit
from he_inference.circuit import (
    BinaryNode,
    Circuit,
    Layout,
    LinearBlock,
    LinearNode,
    Node,
    PolynomialNode,
    linear_rotation_steps,
)
from he_inference.params import select_parameters


def linear_node(
    name: str,
    source: str,
    A: np.ndarray,
    b: np.ndarray | None,
    period: int,
    baby_steps: int = 4,
    duplicate: bool = True,
) -> LinearNode:
    """A linear node for y = A x + b, with the diagonals taken from the dense matrix."""
    d_out, d_in = A.shape
    co, ci = -(-d_out // period), -(-d_in // period)
    padded = np.zeros((co * period, ci * period))
    padded[:d_out, :d_in] = A
    t = np.arange(period)
    blocks = []
    for i in range(co):
        for j in range(ci):
            block = padded[i * period : (i + 1) * period, j * period : (j + 1) * period]
            diagonals = [(k, block[t, (t + k) % period]) for k in range(period)]
            kept = [(k, d) for k, d in diagonals if np.any(d)]
            if kept:
                blocks.append(
                    LinearBlock(
                        i,
                        j,
                        np.array([k for k, _ in kept], np.int64),
                        np.array([d for _, d in kept]),
                    )
                )
    bias = None
    if b is not None:
        bias = np.zeros(co * period)
        bias[:d_out] = b
        bias = bias.reshape(co, period)
    return LinearNode(name, source, ci, co, blocks, bias, baby_steps, duplicate, [name])


def mlp_circuit(
    rng: np.random.Generator,
    d_in: int = 12,
    hidden: int = 20,
    d_out: int = 5,
    period: int = 32,
    degree: int = 7,
    batch: int = 1,
    lower: float = -4.0,
    upper: float = 4.0,
    min_ring_degree: int | None = None,
) -> tuple[Circuit, dict[str, np.ndarray]]:
    """Linear -> ReLU polynomial -> square -> Linear, with its weights for a reference."""
    A1 = rng.normal(size=(hidden, d_in)) / np.sqrt(d_in)
    b1 = rng.normal(size=hidden) * 0.1
    A2 = rng.normal(size=(d_out, hidden)) / np.sqrt(hidden)
    b2 = rng.normal(size=d_out) * 0.1
    relu = fit(activation("Relu"), lower, upper, degree)
    nodes: list[Node] = [
        linear_node("h", "x", A1, b1, period),
        PolynomialNode(
            "a", "h", relu.coefficients, lower, upper, "Relu", relu.max_error, ["relu"]
        ),
        BinaryNode("s", "a", "a", "multiply", ["square"]),
        BinaryNode("r", "s", "a", "add", ["join"]),
        linear_node("y", "r", A2, b2, period, duplicate=False),
    ]
    depth = 1 + 1 + chebyshev_depth(degree) + 1 + 1
    params = select_parameters(depth, 2 * period * batch, min_ring_degree=min_ring_degree)
    steps: set[int] = set()
    for node in nodes:
        if isinstance(node, LinearNode):
            steps |= linear_rotation_steps(node, period)
    circuit = Circuit(
        "mlp",
        params,
        "x",
        Layout((1, d_in), period, -(-d_in // period), batch),
        "y",
        Layout((1, d_out), period, -(-d_out // period), batch),
        nodes,
        tuple(sorted(steps)),
        postprocess=[{"op": "softmax", "axis": -1}],
        input_range=(-1.0, 1.0),
    )
    weights = {
        "A1": A1,
        "b1": b1,
        "A2": A2,
        "b2": b2,
        "coefficients": relu.coefficients,
        "lower": np.array(lower),
        "upper": np.array(upper),
    }
    return circuit, weights


def mlp_reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The exact output of :func:`mlp_circuit`'s circuit (with the fitted polynomial)."""
    from numpy.polynomial import chebyshev as C

    lower, upper = float(weights["lower"]), float(weights["upper"])
    flat = x.reshape(x.shape[0], -1)
    h = flat @ weights["A1"].T + weights["b1"]
    a = C.chebval((2 * h - (lower + upper)) / (upper - lower), weights["coefficients"])
    r = a * a + a
    return r @ weights["A2"].T + weights["b2"]
