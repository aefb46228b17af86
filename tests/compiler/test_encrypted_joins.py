"""Sub, Concat, Sum, Mean and broadcasting Adds of values from different roots compile to
BinaryNode adds of linear maps, and match onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from compiler import compile_model
from compiler.lower import plan
from compiler.onnx_import import import_model
from compiler.passes.fold_constants import fold_constants
from compiler.passes.rewrite_encrypted_joins import rewrite_encrypted_joins
from he_inference.circuit import BinaryNode, Circuit, PolynomialNode
from he_inference.errors import UnsupportedModelError
from he_inference.evaluate import run_plain
from tests.compiler.bounds import output_error_bound
from tests.compiler.models import make_model, reference, weights

RNG = np.random.default_rng(11)


def _two_activations(join: onnx.NodeProto, shape: tuple[int, ...] = (1, 4)) -> onnx.ModelProto:
    """x -> MatMul -> Tanh (``a``) and Sigmoid (``b``) -> ``join`` -> ``y``."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("Sigmoid", ["h"], ["b"]),
        join,
    ]
    return make_model(nodes, shape, [weights("w", (shape[-1], shape[-1]), seed=1)])


def _branches(axis: int) -> onnx.ModelProto:
    """A Conv whose output feeds Tanh and Sigmoid; both, a constant and the Conv output are
    concatenated along ``axis``."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("Sigmoid", ["h"], ["b"]),
        helper.make_node("Concat", ["a", "k", "b", "h"], ["y"], axis=axis),
    ]
    k_shape = [1, 2, 3, 3]
    k_shape[axis] = 1
    initializers = [weights("w", (2, 2, 3, 3), seed=2), weights("k", tuple(k_shape), seed=3)]
    return make_model(nodes, (1, 2, 3, 3), initializers)


def _check_plain(model: onnx.ModelProto, shape: tuple[int, ...], **options: object) -> Circuit:
    circuit = compile_model(model, input_range=(-1, 1), **options)  # type: ignore[arg-type]
    x = RNG.uniform(-1, 1, shape).astype(np.float32)
    expected = reference(model, x)
    got = run_plain(circuit, x).reshape(expected.shape)
    assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected)
    return circuit


def _refused_without_rewrite(model: onnx.ModelProto) -> None:
    imported = import_model(model)
    fold_constants(imported)
    with pytest.raises(UnsupportedModelError, match="different sources"):
        plan(imported)
    assert rewrite_encrypted_joins(imported) == 1
    plan(imported)


def test_sub_of_two_activations_is_an_add_with_the_negation_folded() -> None:
    model = _two_activations(helper.make_node("Sub", ["a", "b"], ["y"], name="diff"))
    _refused_without_rewrite(model)

    circuit = _check_plain(model, (1, 4))
    # Neg(b) would be a linear node of its own; it folds into Sigmoid's coefficients.
    assert [n.kind for n in circuit.nodes] == ["linear", "polynomial", "polynomial", "binary"]
    negated = [n for n in circuit.nodes if isinstance(n, PolynomialNode)][1]
    assert negated.function == "-1*Sigmoid"
    add = circuit.nodes[-1]
    assert isinstance(add, BinaryNode) and add.op == "add" and add.sources == ["diff"]


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_concat_of_two_activations_is_a_sum_of_pads(axis: int) -> None:
    model = _branches(axis)
    _refused_without_rewrite(model)

    circuit = _check_plain(model, (1, 2, 3, 3))
    # Three roots (x, Tanh, Sigmoid): one linear map from each, joined by two adds.
    kinds = [n.kind for n in circuit.nodes]
    assert kinds.count("binary") == 2 and kinds.count("polynomial") == 2
    assert all(n.op == "add" for n in circuit.nodes if isinstance(n, BinaryNode))


def test_concat_of_one_root_stays_one_linear_map() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["y"], axis=1),
    ]
    model = make_model(nodes, (1, 4), [weights("w1", (4, 3), 4), weights("w2", (4, 2), 5)])
    imported = import_model(model)
    assert rewrite_encrypted_joins(imported) == 0

    circuit = _check_plain(model, (1, 4))
    assert [n.kind for n in circuit.nodes] == ["linear"] and circuit.depth == 1


def test_mean_with_a_broadcast_operand_and_a_constant() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("ReduceMean", ["h"], ["r"], axes=[1], keepdims=1),
        helper.make_node("Sigmoid", ["r"], ["b"]),
        helper.make_node("Mean", ["a", "b", "k"], ["y"]),
    ]
    model = make_model(nodes, (1, 4), [weights("w", (4, 4), 6), weights("k", (4,), 7)])
    _refused_without_rewrite(model)
    circuit = _check_plain(model, (1, 4))
    assert [n.kind for n in circuit.nodes].count("binary") == 1


def test_sum_of_three_and_broadcast_add() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("ReduceSum", ["h"], ["r"], keepdims=1),
        helper.make_node("Sigmoid", ["r"], ["b"]),
        helper.make_node("Add", ["b", "a"], ["ab"]),
        helper.make_node("Sum", ["ab", "a", "h"], ["y"]),
    ]
    model = make_model(nodes, (1, 4), [weights("w", (4, 4), 8)])
    circuit = _check_plain(model, (1, 4))
    # ab joins Tanh and Sigmoid; the Sum adds ab's root to a and h (Tanh's, x's): two more.
    assert [n.kind for n in circuit.nodes].count("binary") == 3


def test_subtracting_the_data_input_from_an_activation() -> None:
    model = _two_activations(helper.make_node("Sub", ["a", "x"], ["y"]))
    circuit = _check_plain(model, (1, 4))
    assert [n.kind for n in circuit.nodes].count("binary") == 1


@pytest.mark.seal
def test_sub_and_concat_of_branches_on_seal() -> None:
    from he_inference.evaluate import run_local
    from tests.conftest import require_backend

    require_backend("seal")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("MatMul", ["x", "w2"], ["h2"]),
        helper.make_node("Tanh", ["h1"], ["a"]),
        helper.make_node("Sigmoid", ["h2"], ["b"]),
        helper.make_node("Sub", ["a", "b"], ["d"]),
        helper.make_node("Concat", ["d", "a"], ["y"], axis=1),
    ]
    model = make_model(nodes, (1, 4), [weights("w1", (4, 4), 9), weights("w2", (4, 4), 10)])
    circuit = compile_model(model, input_range=(-1, 1), degree=7, backend="seal")
    # MatMul, a degree-7 polynomial (its interval folded into the MatMul), the Pads.
    assert circuit.depth == 5
    x = RNG.uniform(-1, 1, (1, 4)).astype(np.float32)
    expected = reference(model, x)
    got = run_local(circuit, x, "seal").reshape(expected.shape)
    # About 2^-(scale_bits - 18) of fresh and rescaling noise per level, as in the node
    # tests, times 16 for the polynomial's products and coefficients (2.4e-6 was seen
    # against 2.4e-7 per level at a 2^40 scale).
    noise = (circuit.depth + 1) * 2.0 ** -(circuit.params.scale_bits - 22)
    assert np.abs(got - run_plain(circuit, x).reshape(expected.shape)).max() <= noise
    assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected) + noise


def _concat_then_gemm() -> onnx.ModelProto:
    """Tanh and Sigmoid branches concatenated, then one Gemm over both."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("Sigmoid", ["h"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Gemm", ["c", "w2", "b2"], ["y"]),
    ]
    initializers = [
        weights("w", (4, 4), seed=4),
        weights("w2", (8, 3), seed=5),
        weights("b2", (3,), seed=6),
    ]
    return make_model(nodes, (1, 4), initializers)


def test_a_linear_map_after_a_join_moves_into_its_branches() -> None:
    circuit = _check_plain(_concat_then_gemm(), (1, 4), degree=7)
    kinds = [n.kind for n in circuit.nodes]
    # MatMul, two polynomials, the Gemm composed with each branch's zero padding, one add.
    assert kinds.count("linear") == 3 and kinds.count("binary") == 1
    polynomial_out = max(n.level_out for n in circuit.nodes if isinstance(n, PolynomialNode))
    assert circuit.depth == polynomial_out + 1  # the padding and the Gemm cost one level
    assert isinstance(circuit.nodes[-1], BinaryNode)
    assert circuit.output_name == circuit.nodes[-1].name


def test_a_residual_branch_map_composes_with_the_map_after_the_sum() -> None:
    # y = Gemm(Tanh(h) + MatMul(Sigmoid(h))): the branch's MatMul and the Gemm become one map.
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("MatMul", ["s", "w3"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"]),
    ]
    initializers = [weights(n, (4, 4), seed=i) for i, n in enumerate(("w", "w3", "w2"), 7)]
    model = make_model(nodes, (1, 4), initializers)
    circuit = _check_plain(model, (1, 4), degree=7)
    polynomial_out = max(n.level_out for n in circuit.nodes if isinstance(n, PolynomialNode))
    assert circuit.depth == polynomial_out + 1
    assert [n.kind for n in circuit.nodes].count("linear") == 3
