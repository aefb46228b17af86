"""How far a compiled circuit's output may be from the model's, given its polynomials."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import Chebyshev

from he_inference.circuit import Circuit, LinearNode, PolynomialNode


def output_error_bound(circuit: Circuit, x: np.ndarray, expected: np.ndarray) -> float:
    """A bound on the output error: each polynomial's error, carried through later nodes.

    A linear map scales an error by its largest absolute row sum, a polynomial by its
    largest slope on its interval and adds its own fit error; a sum adds its operands'
    errors, and a product scales each factor's error by a bound on the other factor.
    """
    magnitude = max(1.0, float(np.abs(x).max()), float(np.abs(expected).max()))
    error: dict[str, float] = {circuit.input_name: 0.0}
    for node in circuit.nodes:
        if isinstance(node, LinearNode):
            rows = np.zeros((node.out_chunks, circuit.input_layout.period))
            for block in node.blocks:
                rows[block.out_chunk] += np.abs(block.diagonals).sum(axis=0)
            error[node.name] = float(rows.max()) * error[node.input]
        elif isinstance(node, PolynomialNode):
            series = Chebyshev(node.coefficients, domain=[node.lower, node.upper])
            slope = float(np.abs(series.deriv()(np.linspace(node.lower, node.upper, 2001))).max())
            error[node.name] = slope * error[node.input] + node.max_error
        elif node.op == "add":
            error[node.name] = error[node.left] + error[node.right]
        else:
            error[node.name] = 2 * magnitude * (error[node.left] + error[node.right])
    return 1.01 * error[circuit.output_name] + 1e-6 * max(1.0, float(np.abs(expected).max()))
