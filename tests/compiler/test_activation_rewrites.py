"""Per-channel PRelu and GELU's tanh form written as arithmetic compile to one polynomial
each, and match onnxruntime (and torch, for the committed exports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from compiler import compile_model
from compiler.onnx_import import import_model
from compiler.passes.collect_unsupported import collect_unsupported
from compiler.passes.expand_prelu import expand_prelu
from compiler.passes.fold_constants import fold_constants
from compiler.passes.fuse_activation_patterns import fuse_activation_patterns
from he_inference.circuit import BinaryNode, Circuit, PolynomialNode
from he_inference.errors import UnsupportedModelError
from he_inference.evaluate import run_plain
from tests.compiler.bounds import output_error_bound
from tests.compiler.models import constant, make_model, reference, weights

DATA = Path(__file__).parent / "data"
RNG = np.random.default_rng(13)
SQRT_2_OVER_PI = 0.7978845608028654


def _check_plain(
    model: onnx.ModelProto, shape: tuple[int, ...], lower: float = -1.0, upper: float = 1.0
) -> Circuit:
    calibration = RNG.uniform(lower, upper, (16, *shape)).astype(np.float32)
    circuit = compile_model(model, calibration, error_budget=0.01)
    for x in calibration[:3]:
        expected = reference(model, x)
        got = run_plain(circuit, x).reshape(expected.shape)
        assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected)
    return circuit


def _prelu(slope: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["h", "slope"], ["y"], name="prelu"),
    ]
    return make_model(
        nodes, (1, 2, 3, 3), [weights("w", (3, 2, 3, 3), 1), constant("slope", slope)]
    )


def test_per_channel_prelu_is_a_relu_between_linear_maps() -> None:
    model = _prelu(np.array([0.1, -0.3, 0.5]).reshape(3, 1, 1))
    imported = import_model(model)
    fold_constants(imported)
    with pytest.raises(UnsupportedModelError, match="per-channel slope"):
        collect_unsupported(imported)
    assert expand_prelu(imported) == 1
    collect_unsupported(imported)

    circuit = _check_plain(model, (1, 2, 3, 3))
    # Both products by the slopes land in the Conv's segment: the depth is a scalar PRelu's.
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial", "linear", "binary"]
    relu = circuit.nodes[1]
    assert isinstance(relu, PolynomialNode) and relu.function == "Relu"
    assert (relu.lower, relu.upper) == (-1.0, 1.0)  # the interval map folded into the Conv
    add = circuit.nodes[-1]
    assert isinstance(add, BinaryNode) and add.sources == ["prelu"]
    scalar = _check_plain(_prelu(np.array([0.2])), (1, 2, 3, 3))
    assert circuit.depth == scalar.depth


def test_prelu_slope_above_one_costs_a_level_for_the_signs() -> None:
    circuit = _check_plain(_prelu(np.array([0.1, 1.5, -0.2]).reshape(3, 1, 1)), (1, 2, 3, 3))
    assert [n.kind for n in circuit.nodes] == [
        "linear",
        "polynomial",
        "linear",
        "linear",
        "binary",
    ]


def test_prelu_slope_broadcasts_from_the_last_axis() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("PRelu", ["h", "slope"], ["y"]),
    ]
    slope = constant("slope", np.linspace(-0.5, 0.5, 5))
    _check_plain(make_model(nodes, (1, 3, 4), [weights("w", (4, 5), 2), slope]), (1, 3, 4))


def test_scalar_prelu_keeps_its_direct_fit() -> None:
    circuit = _check_plain(_prelu(np.array([0.2])), (1, 2, 3, 3))
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial"]
    poly = circuit.nodes[1]
    assert isinstance(poly, PolynomialNode) and poly.function.startswith("PRelu(slope=0.2")


def _gelu_tanh(cube: str, half_first: bool, swap: bool) -> list[onnx.NodeProto]:
    """``y = 0.5 * h * (1 + tanh(c * (h + 0.044715 * h^3)))`` as an exporter writes it."""

    def mul(a: str, b: str, out: str) -> onnx.NodeProto:
        return helper.make_node("Mul", [b, a] if swap else [a, b], [out])

    if cube == "pow":
        powers = [helper.make_node("Pow", ["h", "three"], ["h3"])]
    else:
        powers = [mul("h", "h", "h2"), mul("h", "h2", "h3")]
    tail = (
        [mul("h", "half", "hh"), mul("hh", "t1", "y")]
        if half_first
        else [mul("h", "t1", "ht"), mul("ht", "half", "y")]
    )
    return [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        *powers,
        mul("h3", "k", "kh3"),
        helper.make_node("Add", ["h", "kh3"], ["inner"]),
        mul("inner", "c", "arg"),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        *tail,
    ]


GELU_CONSTANTS = [
    constant("three", 3.0),
    constant("k", 0.044715),
    constant("c", SQRT_2_OVER_PI),
    constant("one", 1.0),
    constant("half", 0.5),
]


@pytest.mark.parametrize(
    ("cube", "half_first", "swap"),
    [("mul", False, False), ("pow", False, True), ("pow", True, False), ("mul", True, True)],
)
def test_gelu_tanh_form_fuses_into_one_polynomial(cube: str, half_first: bool, swap: bool) -> None:
    nodes = _gelu_tanh(cube, half_first, swap)
    model = make_model(nodes, (1, 6), [weights("w", (6, 6), 3, scale=0.8), *GELU_CONSTANTS])
    imported = import_model(model)
    assert fuse_activation_patterns(imported) == 1
    fused = imported.graph.node[-1]
    assert (fused.domain, fused.op_type) == ("he_inference", "Gelu")

    circuit = _check_plain(model, (1, 6), -2.0, 2.0)
    # Unfused, the square, the cube and the products would be BinaryNode multiplies.
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial"]
    poly = circuit.nodes[1]
    assert isinstance(poly, PolynomialNode) and poly.function == "Gelu(approximate_tanh=1)"


def test_a_different_constant_is_not_taken_for_gelu() -> None:
    initializers = [c if c.name != "k" else constant("k", 0.05) for c in GELU_CONSTANTS]
    model = make_model(
        _gelu_tanh("pow", False, False), (1, 6), [weights("w", (6, 6), 3), *initializers]
    )
    imported = import_model(model)
    assert fuse_activation_patterns(imported) == 0


def test_an_intermediate_read_elsewhere_blocks_the_fusion() -> None:
    nodes = _gelu_tanh("pow", False, False)
    nodes.append(helper.make_node("Add", ["y", "t"], ["out"]))
    model = make_model(nodes, (1, 6), [weights("w", (6, 6), 3), *GELU_CONSTANTS])
    imported = import_model(model)
    assert fuse_activation_patterns(imported) == 0


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_gelu_tanh_exports_fuse_and_match_torch(exporter: str) -> None:
    io = np.load(DATA / "patterns_io.npz")
    path = DATA / f"gelu_tanh_{exporter}.onnx"
    calibration = np.random.default_rng(1).standard_normal((32, 1, 8)).astype(np.float32)
    circuit = compile_model(path, np.concatenate([calibration, io["gelu_x"][None]]))
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial", "linear"]
    assert circuit.nodes[1].function == "Gelu(approximate_tanh=1)"  # type: ignore[union-attr]
    expected = io[f"gelu_tanh_{exporter}_y"]
    got = run_plain(circuit, io["gelu_x"]).reshape(expected.shape)
    assert np.abs(got - expected).max() <= output_error_bound(circuit, io["gelu_x"], expected)


def test_torch_branches_export_matches_torch() -> None:
    io = np.load(DATA / "patterns_io.npz")
    x = io["branches_x"]
    calibration = np.random.default_rng(2).uniform(-1, 1, (32, *x.shape)).astype(np.float32)
    circuit = compile_model(DATA / "branches_legacy.onnx", np.concatenate([calibration, x[None]]))
    # The PRelu's, the inner Concat's and Sub's and the outer Concat's Adds.
    assert [n.kind for n in circuit.nodes].count("binary") == 4
    expected = io["branches_legacy_y"]
    got = run_plain(circuit, x).reshape(expected.shape)
    assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected)


def test_torch_silu_and_exact_gelu_exports_fuse_and_match_torch() -> None:
    io = np.load(DATA / "variants_io.npz")
    x = io["residual_x"]
    calibration = np.random.default_rng(3).standard_normal((32, *x.shape)).astype(np.float32)
    circuit = compile_model(DATA / "mlp_residual.onnx", np.concatenate([calibration, x[None]]))
    functions = [n.function for n in circuit.nodes if isinstance(n, PolynomialNode)]
    assert functions == ["SiLU", "Gelu"]
    assert not any(isinstance(n, BinaryNode) and n.op == "multiply" for n in circuit.nodes)
    expected = io["residual_y"]
    got = run_plain(circuit, x).reshape(expected.shape)
    assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected)


def test_mish_as_softplus_tanh_and_mul_fuses() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Softplus", ["h"], ["sp"]),
        helper.make_node("Tanh", ["sp"], ["t"]),
        helper.make_node("Mul", ["h", "t"], ["y"]),
    ]
    model = make_model(nodes, (1, 5), [weights("w", (5, 5), 4)])
    circuit = _check_plain(model, (1, 5), -2.0, 2.0)
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial"]
    assert circuit.nodes[1].function == "Mish"  # type: ignore[union-attr]


def test_sigmoid_form_of_gelu_fuses_into_a_scaled_silu() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "a"], ["ah"]),
        helper.make_node("Sigmoid", ["ah"], ["s"]),
        helper.make_node("Mul", ["h", "s"], ["y"]),
    ]
    model = make_model(nodes, (1, 5), [weights("w", (5, 5), 5), constant("a", np.array(1.702))])
    circuit = _check_plain(model, (1, 5), -2.0, 2.0)
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial"]
    assert circuit.nodes[1].function.startswith("SiLU")  # type: ignore[union-attr]
