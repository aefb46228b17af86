"""Polynomial approximation of activations, and the Chebyshev evaluation schedule.

CKKS evaluates only additions and multiplications, so each activation becomes a polynomial
on the interval its inputs were calibrated to. The fit is Chebyshev interpolation at the
Chebyshev points of the first kind (numpy's ``Chebyshev.interpolate``), whose error is within
a small factor of the best uniform (minimax) polynomial of the same degree (Trefethen,
"Approximation Theory and Approximation Practice", ch. 16). A Remez fit would gain a little
accuracy at equal degree; it is not implemented yet.

The schedule computes ``T_1 .. T_d`` with ``T_2i = 2 T_i^2 - 1`` and
``T_(a+b) = 2 T_a T_b - T_(a-b)`` (``a`` the largest power of two below ``i``), so ``T_i`` sits
at depth ``ceil(log2 i)``, then one plaintext multiplication per coefficient adds one level:
depth ``ceil(log2 d) + 1`` with ``d - 1`` ciphertext multiplications. OpenFHE's own
Paterson-Stockmeyer series evaluation uses fewer multiplications where that backend runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev as C

from he_inference.errors import ConfigurationError

Activation = Callable[[np.ndarray], np.ndarray]
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def activation(op_type: str, **attrs: float) -> Activation:
    """The numpy function of an ONNX activation with its attributes.

    Raises:
        ConfigurationError: the activation is not one this module can fit.
    """
    alpha = attrs.get("alpha")
    if op_type == "Relu":
        return lambda x: np.maximum(x, 0.0)
    if op_type == "LeakyRelu":
        a = 0.01 if alpha is None else alpha
        return lambda x: np.where(x >= 0, x, a * x)
    if op_type == "PRelu":
        s = attrs["slope"]
        return lambda x: np.where(x >= 0, x, s * x)
    if op_type == "Elu":
        a = 1.0 if alpha is None else alpha
        return lambda x: np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0)))
    if op_type == "Selu":
        a = 1.67326319217681884765625 if alpha is None else alpha
        g = attrs.get("gamma", 1.05070102214813232421875)
        return lambda x: g * np.where(x > 0, x, a * np.expm1(np.minimum(x, 0)))
    if op_type == "Sigmoid":
        return _sigmoid
    if op_type == "HardSigmoid":
        a = 0.2 if alpha is None else alpha
        b = attrs.get("beta", 0.5)
        return lambda x: np.clip(a * x + b, 0.0, 1.0)
    if op_type == "Tanh":
        return np.tanh
    if op_type == "Softplus":
        return lambda x: np.logaddexp(0.0, x)
    if op_type == "Gelu":
        if attrs.get("approximate_tanh"):
            return lambda x: 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
        return lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if op_type == "Erf":
        return _erf
    if op_type in ("SiLU", "Swish"):
        return lambda x: x * _sigmoid(x)
    if op_type == "HardSwish":
        return lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if op_type == "Clip":
        lo, hi = attrs.get("min", -np.inf), attrs.get("max", np.inf)
        return lambda x: np.clip(x, lo, hi)
    if op_type == "Square":
        return lambda x: x * x
    raise ConfigurationError(f"no polynomial fit is defined for activation {op_type!r}")


@dataclass(frozen=True)
class Fit:
    """A fitted polynomial and what it costs and loses."""

    coefficients: np.ndarray  # Chebyshev basis on [lower, upper]
    lower: float
    upper: float
    max_error: float

    @property
    def degree(self) -> int:
        """Degree of the polynomial."""
        return len(self.coefficients) - 1


def fit(fn: Activation, lower: float, upper: float, degree: int) -> Fit:
    """Chebyshev interpolant of ``fn`` of the given degree on [lower, upper].

    Raises:
        ConfigurationError: the interval is empty or the degree is below 1.
    """
    if not upper > lower:
        raise ConfigurationError(f"empty approximation interval [{lower}, {upper}]")
    if degree < 1:
        raise ConfigurationError(f"polynomial degree {degree} must be at least 1")
    series = C.Chebyshev.interpolate(fn, degree, domain=[lower, upper])
    coefficients = np.asarray(series.coef, dtype=np.float64)
    if coefficients.size < degree + 1:
        coefficients = np.pad(coefficients, (0, degree + 1 - coefficients.size))
    grid = np.linspace(lower, upper, 4097)
    error = float(np.max(np.abs(series(grid) - fn(grid))))
    return Fit(coefficients, float(lower), float(upper), error)


def fit_within(
    fn: Activation, lower: float, upper: float, max_error: float, max_degree: int = 63
) -> Fit:
    """The lowest-degree fit whose maximum error on [lower, upper] is within ``max_error``.

    Among degrees of equal depth the lowest is taken: it needs the fewest multiplications.

    Raises:
        ConfigurationError: no degree up to ``max_degree`` meets the budget.
    """
    best: Fit | None = None
    for degree in range(1, max_degree + 1):
        candidate = fit(fn, lower, upper, degree)
        if best is None or candidate.max_error < best.max_error:
            best = candidate
        if candidate.max_error <= max_error:
            return candidate
    assert best is not None
    raise ConfigurationError(
        f"no polynomial of degree <= {max_degree} approximates the activation on "
        f"[{lower:.4g}, {upper:.4g}] within {max_error:.3g} (best {best.max_error:.3g} at "
        f"degree {best.degree}): raise the error budget, raise --max-degree, or calibrate a "
        f"narrower range"
    )


def chebyshev_terms(degree: int) -> list[tuple[int, int, int]]:
    """For i = 2..degree, ``(i, a, b)`` with ``T_i = 2 T_a T_b - T_(a-b)`` (a >= b)."""
    terms = []
    for i in range(2, degree + 1):
        a = 1 << (i.bit_length() - 1)
        if a == i:
            a = i // 2
        terms.append((i, a, i - a))
    return terms


def chebyshev_depth(degree: int) -> int:
    """Levels the schedule consumes for a polynomial of this degree on [-1, 1]."""
    if degree <= 1:
        return 1
    return math.ceil(math.log2(degree)) + 1


def significant_terms(coefficients: np.ndarray, scale_bits: int = 40) -> list[int]:
    """Indices i >= 1 whose coefficient survives encoding at scale 2^scale_bits.

    A coefficient below half a unit at the scale encodes to zero, and a product with a
    zero plaintext is transparent (SEAL refuses it), so such terms are skipped. ReLU and
    other even-plus-linear functions lose all odd terms above 1 this way, which halves
    their multiplications.
    """
    threshold = 2.0 ** -(scale_bits - 1)
    return [i for i, c in enumerate(coefficients) if i >= 1 and abs(c) >= threshold]


def chebyshev_basis_needed(terms: list[int]) -> list[int]:
    """Every ``T_i`` (i >= 2) the schedule computes to reach ``terms``, in order."""
    recipe = {i: (a, b) for i, a, b in chebyshev_terms(max(terms, default=1))}
    needed: set[int] = set()

    def visit(i: int) -> None:
        if i < 2 or i in needed:
            return
        a, b = recipe[i]
        visit(a)
        visit(b)
        visit(a - b)
        needed.add(i)

    for i in terms:
        visit(i)
    return sorted(needed)


def chebyshev_cost(coefficients: np.ndarray, scale_bits: int = 40) -> tuple[int, int]:
    """(ciphertext multiplications, plaintext multiplications) of the schedule."""
    terms = significant_terms(coefficients, scale_bits)
    return len(chebyshev_basis_needed(terms)), len(terms)


def evaluate_schedule(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The schedule run in numpy on values already mapped to [-1, 1] (a reference)."""
    T: dict[int, np.ndarray] = {0: np.ones_like(x), 1: x}
    for i, a, b in chebyshev_terms(len(coefficients) - 1):
        T[i] = 2 * T[a] * T[b] - T[a - b]
    total = np.zeros_like(x)
    for i, c in enumerate(coefficients):
        total = total + c * T[i]
    return total
