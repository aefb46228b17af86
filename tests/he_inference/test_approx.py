"""Polynomial fits and the Chebyshev schedule."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import chebyshev as C

from he_inference.approx import (
    activation,
    chebyshev_cost,
    chebyshev_depth,
    evaluate_schedule,
    fit,
    fit_within,
    significant_terms,
)
from he_inference.errors import ConfigurationError

ACTIVATIONS = [
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Sigmoid",
    "HardSigmoid",
    "Tanh",
    "Softplus",
    "Gelu",
    "SiLU",
    "HardSwish",
    "Square",
]


@pytest.mark.parametrize("op_type", ACTIVATIONS)
def test_fit_error_is_measured_on_the_interval(op_type: str) -> None:
    fn = activation(op_type)
    result = fit(fn, -3.0, 5.0, 15)
    grid = np.linspace(-3, 5, 1001)
    actual = np.max(np.abs(C.chebval((2 * grid - 2) / 8, result.coefficients) - fn(grid)))
    assert actual <= result.max_error * 1.01 + 1e-12


def test_smooth_activations_need_lower_degree_than_relu() -> None:
    relu = fit_within(activation("Relu"), -4, 4, 0.05)
    silu = fit_within(activation("SiLU"), -4, 4, 0.05)
    assert silu.degree < relu.degree
    assert relu.max_error <= 0.05


def test_unreachable_budget_names_the_best_fit() -> None:
    with pytest.raises(ConfigurationError, match="best"):
        fit_within(activation("Relu"), -10, 10, 1e-6, max_degree=9)


@pytest.mark.parametrize("degree", [1, 2, 3, 7, 8, 15, 16, 31])
def test_schedule_matches_chebval(degree: int) -> None:
    coefficients = np.random.default_rng(degree).normal(size=degree + 1)
    x = np.linspace(-1, 1, 33)
    np.testing.assert_allclose(
        evaluate_schedule(coefficients, x), C.chebval(x, coefficients), atol=1e-10
    )


def test_depth_is_the_least_possible() -> None:
    assert [chebyshev_depth(d) for d in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5, 7, 8, 12, 15, 16, 23, 31, 32])
def test_schedule_reaches_the_depth_bound_and_no_lower(degree: int) -> None:
    coefficients = np.random.default_rng(degree).normal(size=degree + 1)
    mults, scalars, _, depth = chebyshev_cost(coefficients)
    assert depth == chebyshev_depth(degree)
    # Fewer ciphertext products than computing every T_i (d - 1 of them).
    assert mults <= max(1, degree - 1)
    assert scalars <= degree


def test_relu_skips_odd_terms_and_their_products() -> None:
    result = fit(activation("Relu"), -1, 1, 16)
    terms = significant_terms(result.coefficients)
    assert all(i == 1 or i % 2 == 0 for i in terms)
    dense_mults, _, _, _ = chebyshev_cost(np.random.default_rng(0).normal(size=17))
    multiplications, _, _, depth = chebyshev_cost(result.coefficients)
    assert multiplications < dense_mults
    assert depth == 5


def test_minimax_beats_interpolation_on_a_kink() -> None:
    fn = activation("Relu")
    for degree in (6, 14, 20):
        minimax = fit(fn, -4, 4, degree)
        series = C.Chebyshev.interpolate(fn, degree, domain=[-4, 4])
        grid = np.linspace(-4, 4, 20001)
        interpolation_error = np.max(np.abs(series(grid) - fn(grid)))
        assert minimax.method == "minimax"
        assert minimax.max_error < 0.8 * interpolation_error


def test_minimax_error_levels_out() -> None:
    # The best uniform fit's error equioscillates: its largest is reached near both ends.
    fn = activation("Tanh")
    result = fit(fn, -4, 4, 9)
    grid = np.linspace(-4, 4, 20001)
    error = C.chebval(grid / 4, result.coefficients) - fn(grid)
    assert abs(error[0]) > 0.9 * result.max_error
    assert abs(error[-1]) > 0.9 * result.max_error


def test_budgeted_relu_fits_four_levels() -> None:
    fn = activation("Relu")
    result = fit_within(fn, -4, 4, 0.01 * 4)
    assert result.max_error <= 0.04
    assert chebyshev_depth(result.degree) <= 4
