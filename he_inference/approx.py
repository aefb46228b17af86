"""Polynomial approximation of activations, and the depth-optimal Chebyshev schedule.

CKKS evaluates only additions and multiplications, so each activation becomes a polynomial
on the interval its inputs were calibrated to. :func:`fit` runs Remez's exchange for the
best uniform (minimax) polynomial of a degree and keeps Chebyshev interpolation where that
is better (it rarely is); :func:`fit_within` takes the lowest degree whose measured error
meets a budget. For kinks the minimax fit matters: a ReLU on [-4, 4] within 1% of its peak
needs degree 14 minimax against 30 by interpolation, which is two levels of depth.

:func:`chebyshev_series` evaluates a fit at depth ``ceil(log2(d + 1))``, the least possible,
by splitting on powers of two; the same function counts the operations
(:func:`chebyshev_cost`) and runs in numpy (:func:`evaluate_schedule`), so the cost report,
the reference and every backend follow one schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from numpy.polynomial import chebyshev as C

from he_inference.errors import ConfigurationError

Activation = Callable[[np.ndarray], np.ndarray]
V = TypeVar("V")
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
        # alpha: x * sigmoid(alpha x); 1.702 is the sigmoid form of GELU ("QuickGELU").
        a = 1.0 if alpha is None else alpha
        return lambda x: x * _sigmoid(a * x)
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
    method: str = "minimax"

    @property
    def degree(self) -> int:
        """Degree of the polynomial."""
        return len(self.coefficients) - 1


#: Where fits are measured, on [-1, 1]: Chebyshev-spaced points (dense near the ends, where
#: polynomials move fastest) merged with evenly spaced ones (dense near interior kinks).
_GRID = np.union1d(np.cos(np.linspace(np.pi, 0.0, 8193)), np.linspace(-1.0, 1.0, 8193))


class _Target:
    """An activation sampled once on the measuring grid of [lower, upper]."""

    def __init__(self, fn: Activation, lower: float, upper: float) -> None:
        if not upper > lower:
            raise ConfigurationError(f"empty approximation interval [{lower}, {upper}]")
        self.fn = fn
        self.lower, self.upper = float(lower), float(upper)
        self.values = self.on_unit(_GRID)

    def on_unit(self, t: np.ndarray) -> np.ndarray:
        """The activation at the points of [lower, upper] that ``t`` in [-1, 1] maps to."""
        return self.fn(self.lower + (t + 1.0) * (self.upper - self.lower) / 2.0)

    def error(self, coefficients: np.ndarray) -> float:
        return float(np.max(np.abs(C.chebval(_GRID, coefficients) - self.values)))

    def fit(self, degree: int) -> Fit:
        if degree < 1:
            raise ConfigurationError(f"polynomial degree {degree} must be at least 1")
        interpolant = np.zeros(degree + 1)
        coef = C.Chebyshev.interpolate(self.on_unit, degree).coef
        interpolant[: coef.size] = coef
        best = Fit(interpolant, self.lower, self.upper, self.error(interpolant), "chebyshev")
        minimax = _remez(self, degree)
        if minimax is not None and minimax.max_error < best.max_error:
            best = minimax
        return best


def _remez(target: _Target, degree: int) -> Fit | None:
    """The best uniform polynomial of ``degree`` on the grid, by Remez's exchange.

    The exchange starts from the Chebyshev extrema. For an even function on a symmetric
    interval and an even degree that start is degenerate (the levelled error is zero by
    symmetry and the error alternates too few times), so a second, lopsided start (the
    first ``degree + 2`` extrema of one degree higher) is tried when the first does not
    converge. Returns the better result, or None when both break down.
    """
    n = degree
    starts = [
        np.cos(np.pi * np.arange(n + 1, -1, -1) / (n + 1)),
        np.cos(np.pi * np.arange(n + 2, 0, -1) / (n + 2)),
    ]
    best: Fit | None = None
    for reference in starts:
        result, converged = _exchange(target, n, reference)
        if result is not None and (best is None or result.max_error < best.max_error):
            best = result
        if converged:
            break
    return best


def _exchange(
    target: _Target, n: int, reference: np.ndarray, iterations: int = 30
) -> tuple[Fit | None, bool]:
    """Remez rounds from ``reference``: (the best polynomial seen, whether it converged).

    Each round solves for the polynomial whose error takes equal size and alternating sign
    at the ``n + 2`` reference points, then moves the reference to the extrema of that
    error, until the largest error on the grid is within 1% of the levelled one.
    """
    signs = (-1.0) ** np.arange(n + 2)
    exact = 1e-12 * (1.0 + float(np.max(np.abs(target.values))))  # a polynomial fits exactly
    best: Fit | None = None
    for _ in range(iterations):
        system = np.hstack([C.chebvander(reference, n), signs[:, None]])
        try:
            solution = np.linalg.solve(system, target.on_unit(reference))
        except np.linalg.LinAlgError:
            break
        coefficients, levelled = solution[:-1], abs(float(solution[-1]))
        error = C.chebval(_GRID, coefficients) - target.values
        largest = float(np.max(np.abs(error)))
        if best is None or largest < best.max_error:
            best = Fit(coefficients, target.lower, target.upper, largest, "minimax")
        if largest <= max(levelled * 1.01, exact):
            return best, True
        moved = _alternating_extrema(error, n + 2)
        if moved is None:
            break
        reference = _GRID[moved]
    return best, False


def _alternating_extrema(error: np.ndarray, count: int) -> np.ndarray | None:
    """Grid indices of ``count`` extrema of alternating sign, the largest one kept."""
    positive = error >= 0
    starts = np.flatnonzero(np.concatenate([[True], positive[1:] != positive[:-1]]))
    ends = np.concatenate([starts[1:], [error.size]])
    points = [s + int(np.argmax(np.abs(error[s:e]))) for s, e in zip(starts, ends, strict=True)]
    if len(points) < count:
        return None
    size = [abs(float(error[p])) for p in points]
    while len(points) > count:
        if len(points) - count == 1:
            drop = [0] if size[0] < size[-1] else [len(points) - 1]
        else:
            k = int(np.argmin(size))
            if k in (0, len(points) - 1):
                drop = [k]
            else:
                drop = [k, k - 1 if size[k - 1] < size[k + 1] else k + 1]
        for i in sorted(drop, reverse=True):
            del points[i], size[i]
    return np.asarray(points)


def fit(fn: Activation, lower: float, upper: float, degree: int) -> Fit:
    """The better of the minimax (Remez) and Chebyshev-interpolation fits of ``degree``.

    The error is measured on about 16,000 points of [lower, upper], dense at the ends and
    evenly spread inside.

    Raises:
        ConfigurationError: the interval is empty or the degree is below 1.
    """
    return _Target(fn, lower, upper).fit(degree)


def fit_within(
    fn: Activation, lower: float, upper: float, max_error: float, max_degree: int = 63
) -> Fit:
    """The lowest-degree fit whose maximum error on [lower, upper] is within ``max_error``.

    The lowest degree is also the cheapest: depth grows with it, and so do multiplications.

    Raises:
        ConfigurationError: no degree up to ``max_degree`` meets the budget.
    """
    target = _Target(fn, lower, upper)
    best: Fit | None = None
    for degree in range(1, max_degree + 1):
        candidate = target.fit(degree)
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


class SeriesArithmetic(Protocol[V]):
    """The four operations the series schedule needs, on whatever holds a value.

    Each implementation aligns levels itself where an operation needs it: the evaluator on
    a backend, :class:`_Counter` to count operations and levels, numpy for a reference.
    """

    def multiply(self, a: V, b: V) -> V:
        """``a * b``, relinearised and rescaled: one level above the higher operand."""
        ...

    def scale(self, a: V, c: float) -> V:
        """``c * a`` for a non-zero scalar, rescaled: one level above ``a``."""
        ...

    def add(self, a: V, b: V) -> V:
        """``a + b`` at the higher of the two levels."""
        ...

    def add_constant(self, a: V, c: float) -> V:
        """``a + c``, no level."""
        ...


def chebyshev_series(
    coefficients: np.ndarray, x: V, ops: SeriesArithmetic[V], scale_bits: int = 40
) -> V | float:
    """``sum_i c_i T_i(x)`` at depth ``ceil(log2(d + 1))``: the schedule every backend runs.

    With ``m`` the largest power of two up to the degree ``d``, the identity
    ``T_(m+j) = 2 T_m T_j - T_(m-j)`` splits ``p = q T_m + r`` with ``deg q = d - m`` and
    ``deg r < m``, and each part is split again down to degree one (``c_0 + c_1 x``, one
    scalar product). ``T_m`` comes from ``log2 m`` squarings (``T_2k = 2 T_k^2 - 1``). By
    induction ``q`` sits at most at depth ``log2 m`` (its degree is below ``m``), as does
    ``T_m``, so their product and the sum with ``r`` sit at depth ``log2 m + 1 =
    ceil(log2(d + 1))``, the least any schedule reaches. This is one level below computing
    every ``T_i`` and then multiplying by the coefficients, and it needs fewer ciphertext
    products: about ``d / 2`` plus the squarings, fewer still for sparse series.

    Coefficients (of degree one and up) too small to survive encoding at ``2^scale_bits``
    are dropped (see :func:`significant_terms`), which removes whole branches for the even
    part of ReLU-like fits. Returns a float when what is left is a constant.
    """
    threshold = 2.0 ** -(scale_bits - 1)
    powers: dict[int, V] = {1: x}

    def power(m: int) -> V:
        if m not in powers:
            half = power(m // 2)
            square = ops.multiply(half, half)
            powers[m] = ops.add_constant(ops.add(square, square), -1.0)
        return powers[m]

    def series(c: np.ndarray) -> V | float:
        c = c.copy()
        c[1:][np.abs(c[1:]) < threshold] = 0.0
        nonzero = np.flatnonzero(c[1:])
        if nonzero.size == 0:
            return float(c[0])
        d = int(nonzero[-1]) + 1
        if d == 1:
            linear = ops.scale(x, float(c[1]))
            return ops.add_constant(linear, float(c[0])) if c[0] else linear
        m = 1 << (d.bit_length() - 1)
        q = np.concatenate([[c[m]], 2.0 * c[m + 1 : d + 1]])
        r = c[:m].copy()
        r[m - np.arange(1, d - m + 1)] -= c[m + 1 : d + 1]
        high, low = series(q), series(r)
        giant = power(m)
        product = ops.scale(giant, high) if isinstance(high, float) else ops.multiply(high, giant)
        if isinstance(low, float):
            return ops.add_constant(product, low) if low else product
        return ops.add(product, low)

    return series(np.asarray(coefficients, dtype=np.float64))


@dataclass
class _Level:
    level: int


class _Counter:
    """Counts the schedule's operations and tracks levels, without any data."""

    def __init__(self) -> None:
        self.multiplications = 0
        self.scalar_multiplications = 0
        self.additions = 0

    def multiply(self, a: _Level, b: _Level) -> _Level:
        self.multiplications += 1
        return _Level(max(a.level, b.level) + 1)

    def scale(self, a: _Level, c: float) -> _Level:
        self.scalar_multiplications += 1
        return _Level(a.level + 1)

    def add(self, a: _Level, b: _Level) -> _Level:
        self.additions += 1
        return _Level(max(a.level, b.level))

    def add_constant(self, a: _Level, c: float) -> _Level:
        self.additions += 1
        return a


class _Numpy:
    """Plain float arithmetic, for a reference run of the schedule."""

    def multiply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(a * b)

    def scale(self, a: np.ndarray, c: float) -> np.ndarray:
        return np.asarray(a * c)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(a + b)

    def add_constant(self, a: np.ndarray, c: float) -> np.ndarray:
        return np.asarray(a + c)


def chebyshev_depth(degree: int) -> int:
    """Levels the schedule consumes at most for a series of this degree on [-1, 1]."""
    return max(1, math.ceil(math.log2(degree + 1)))


def significant_terms(coefficients: np.ndarray, scale_bits: int = 40) -> list[int]:
    """Indices i >= 1 whose coefficient survives encoding at scale 2^scale_bits.

    A coefficient below half a unit at the scale encodes to zero, and a product with a
    zero plaintext is transparent (SEAL refuses it), so such terms are skipped. ReLU and
    other even-plus-linear functions lose all odd terms above 1 this way.
    """
    threshold = 2.0 ** -(scale_bits - 1)
    return [i for i, c in enumerate(coefficients) if i >= 1 and abs(c) >= threshold]


def chebyshev_cost(coefficients: np.ndarray, scale_bits: int = 40) -> tuple[int, int, int, int]:
    """(ciphertext products, scalar products, additions, depth) of the schedule."""
    counter = _Counter()
    result = chebyshev_series(coefficients, _Level(0), counter, scale_bits)
    depth = 0 if isinstance(result, float) else result.level
    return (
        counter.multiplications,
        counter.scalar_multiplications,
        counter.additions,
        depth,
    )


def evaluate_schedule(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The schedule run in numpy on values already mapped to [-1, 1] (a reference)."""
    result = chebyshev_series(coefficients, x, _Numpy())
    return np.full_like(x, result) if isinstance(result, float) else result
