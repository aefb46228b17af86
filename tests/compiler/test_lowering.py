"""Segmentation, folding, fusion and end-to-end lowering on small hand-built models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.lower import plan
from compiler.onnx_import import import_model
from compiler.passes.fold_constants import fold_constants
from compiler.passes.fuse_activation_patterns import fuse_activation_patterns
from he_inference.circuit import BinaryNode, LinearNode, PolynomialNode
from he_inference.evaluate import run_plain

RNG = np.random.default_rng(7)


def _const(name: str, shape: tuple[int, ...], scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _model(nodes, shape, initializers, opset=17, out_type=TensorProto.FLOAT):  # type: ignore[no-untyped-def]
    """A one-input model; the output's shape comes from running it."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info(nodes[-1].output[0], out_type, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    out = _reference(model, np.zeros(shape, np.float32))
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info(nodes[-1].output[0], out_type, ["N", *out.shape[1:]])
    )
    return model


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _conv_net() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "mu", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("AveragePool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["p"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1),
    ]
    initializers = [
        _const("w1", (4, 2, 3, 3)),
        _const("b1", (4,)),
        _const("s", (4,)),
        _const("bb", (4,)),
        _const("mu", (4,)),
        numpy_helper.from_array(np.full(4, 0.8, np.float32), "var"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
        _const("w2", (3, 16)),
        _const("b2", (3,)),
    ]
    return _model(nodes, (1, 2, 8, 8), initializers)


def test_shape_chain_feeding_reshape_is_folded() -> None:
    imported = import_model(_conv_net())
    fold_constants(imported)
    ops = [n.op_type for n in imported.graph.node]
    assert "Shape" not in ops and "Concat" not in ops and "Gather" not in ops
    assert ops == ["Conv", "BatchNormalization", "Relu", "AveragePool", "Reshape", "Gemm"]


def test_linear_nodes_between_activations_fuse_into_one_segment() -> None:
    imported = import_model(_conv_net())
    fold_constants(imported)
    the_plan = plan(imported)
    # Conv+BatchNorm before the Relu, and AveragePool+Reshape+Gemm after it.
    assert the_plan.materialised == ["bn", "logits"]
    assert the_plan.roots["logits"] == "r1" and the_plan.roots["bn"] == "x"
    assert the_plan.range_tensors() == ["bn"]


def test_conv_net_matches_onnxruntime_within_the_polynomial_error() -> None:
    model = _conv_net()
    calibration = RNG.uniform(-1, 1, (32, 1, 2, 8, 8)).astype(np.float32)
    circuit = compile_model(model, calibration, error_budget=0.01, max_degree=31)
    kinds = [n.kind for n in circuit.nodes]
    assert kinds == ["linear", "polynomial", "linear"]
    poly = circuit.nodes[1]
    assert isinstance(poly, PolynomialNode) and (poly.lower, poly.upper) == (-1.0, 1.0)
    first, last = circuit.nodes[0], circuit.nodes[2]
    assert isinstance(first, LinearNode) and first.duplicate
    assert isinstance(last, LinearNode) and not last.duplicate
    assert circuit.depth == 1 + poly.level_out - poly.level_in + 1
    x = calibration[0]
    expected = _reference(model, x)
    got = run_plain(circuit, x).reshape(expected.shape)
    # Relu's error passes through the pool and the Gemm: bound it by the weights' norm.
    bound = poly.max_error * np.abs(numpy_helper.to_array(model.graph.initializer[-2])).sum(1)
    assert np.all(np.abs(got - expected) <= bound.max() + 1e-5)
    assert set(circuit.rotation_steps) >= {-circuit.input_layout.period}
    assert circuit.metadata["opset"] == 17 and len(circuit.metadata["source_sha256"]) == 64


def test_pure_linear_model_is_exact_and_costs_one_level() -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Mul", ["a", "half"], ["y"]),
    ]
    model = _model(
        nodes, (1, 5, 3), [_const("w", (5, 4)), _const("b", (4,)), _scalar("half", 0.5)]
    )
    circuit = compile_model(model)
    assert len(circuit.nodes) == 1 and circuit.depth == 1
    x = RNG.standard_normal((1, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(
        run_plain(circuit, x)[0], _reference(model, x), rtol=1e-5, atol=1e-6
    )


def test_flatten_between_activations_is_aliased_not_a_node() -> None:
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Sigmoid", ["f"], ["y"]),
    ]
    circuit = compile_model(_model(nodes, (1, 2, 3), []), input_range=(-2, 2))
    assert [n.kind for n in circuit.nodes] == ["polynomial", "polynomial"]
    assert circuit.nodes[1].inputs == ["t"]


def test_residual_add_and_square_become_binary_nodes() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "h"], ["sq"]),
        helper.make_node("Add", ["sq", "x"], ["y"]),
    ]
    model = _model(nodes, (1, 6), [_const("w", (6, 6))])
    circuit = compile_model(model)
    binaries = [n for n in circuit.nodes if isinstance(n, BinaryNode)]
    assert [(b.op, b.left == b.right) for b in binaries] == [("multiply", True), ("add", False)]
    x = RNG.standard_normal((1, 6)).astype(np.float32)
    np.testing.assert_allclose(
        run_plain(circuit, x)[0], _reference(model, x), rtol=1e-5, atol=1e-5
    )


def test_two_branches_of_one_source_join_linearly() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),
        helper.make_node("Sub", ["a", "b"], ["y"]),
    ]
    circuit = compile_model(_model(nodes, (1, 4), [_const("w1", (4, 4)), _const("w2", (4, 4))]))
    assert [n.kind for n in circuit.nodes] == ["linear"]


def test_silu_and_gelu_patterns_fuse_into_single_activations() -> None:
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["silu"]),
        helper.make_node("Div", ["silu", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["silu", "e1"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["y"]),
    ]
    model = _model(
        nodes, (1, 8), [_scalar("sqrt2", 2**0.5), _scalar("one", 1.0), _scalar("half", 0.5)]
    )
    imported = import_model(model)
    assert fuse_activation_patterns(imported) == 2
    assert [(n.domain, n.op_type) for n in imported.graph.node] == [
        ("he_inference", "SiLU"),
        ("he_inference", "Gelu"),
    ]
    circuit = compile_model(model, input_range=(-3, 3), error_budget=0.001)
    x = RNG.uniform(-3, 3, (1, 8)).astype(np.float32)
    bound = sum(n.max_error for n in circuit.nodes if isinstance(n, PolynomialNode))
    assert np.abs(run_plain(circuit, x)[0] - _reference(model, x)).max() <= 2 * bound + 1e-5


def test_trailing_softmax_and_argmax_move_to_postprocess() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("ArgMax", ["probs"], ["y"], axis=1, keepdims=0),
    ]
    model = _model(nodes, (1, 4), [_const("w", (4, 3))], out_type=TensorProto.INT64)
    circuit = compile_model(model)
    assert circuit.output_name == "logits"
    assert [s["op"] for s in circuit.postprocess] == ["softmax", "argmax"]


def test_old_ir_initializers_listed_as_inputs_are_weights() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = _model(nodes, (1, 3), [_const("w", (3, 2))], opset=9)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]))
    model.ir_version = 3
    circuit = compile_model(model)
    assert circuit.metadata["opset"] == 17  # upgraded from 9, and verified against the runtime
    x = RNG.standard_normal((1, 3)).astype(np.float32)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(run_plain(circuit, x)[0], x @ w, rtol=1e-5, atol=1e-6)


def test_fixed_degree_and_declared_range_are_used(caplog: pytest.LogCaptureFixture) -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
        (1, 4),
        [_const("w", (4, 4))],
    )
    circuit = compile_model(model, input_range=(-1, 1), degree=5)
    poly = circuit.nodes[-1]
    assert isinstance(poly, PolynomialNode) and poly.degree == 5
    assert circuit.input_range == (-1.0, 1.0)
    assert "no calibration data" in caplog.text


def test_circuit_survives_a_save_and_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from he_inference.circuit import Circuit

    circuit = compile_model(_conv_net(), RNG.uniform(-1, 1, (4, 1, 2, 8, 8)))
    loaded = Circuit.load(circuit.save(tmp_path / "net.circuit"))
    assert loaded.content_hash() == circuit.content_hash()


def test_throughput_batch_packs_queries_side_by_side() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
        (1, 5),
        [_const("w", (5, 3))],
    )
    queries = RNG.uniform(-1, 1, (4, 1, 5)).astype(np.float32)
    circuit = compile_model(model, queries, batch=4, error_budget=0.001)
    assert circuit.input_layout.batch == 4
    assert circuit.params.slots >= 2 * circuit.input_layout.period * 4
    got = run_plain(circuit, queries)
    for q in range(4):
        expected = _reference(model, queries[q])
        assert np.abs(got[q] - expected).max() <= 2 * circuit.nodes[-1].max_error + 1e-6
