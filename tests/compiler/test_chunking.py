"""Values larger than one ciphertext's slots span several ciphertexts (block matrices)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from he_inference.backends import make_backend
from he_inference.circuit import LinearNode
from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input


def _conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    """3x28x28 -> Conv(8, 3x3) -> square -> AveragePool -> Gemm(10): 6272 values at most."""
    kernel = (rng.normal(size=(8, 3, 3, 3)) / 5).astype(np.float32)
    dense = (rng.normal(size=(8 * 14 * 14, 10)) / 40).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "K"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "c"], ["a"]),
        helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "chunked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(kernel, "K"), numpy_helper.from_array(dense, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_multichannel_conv_spans_several_ciphertexts_at_a_small_ring() -> None:
    rng = np.random.default_rng(0)
    model = _conv_model(rng)
    x = rng.uniform(0, 1, size=(8, 1, 3, 28, 28)).astype(np.float32)
    circuit = compile_model(model, x)

    # The depth fits N=8192, so the 2352 inputs and 6272 conv outputs are split into
    # chunks of its period rather than forcing N=32768 and its far larger keys.
    assert circuit.params.poly_modulus_degree == 8192
    conv = circuit.nodes[0]
    assert isinstance(conv, LinearNode)
    assert (conv.in_chunks, conv.out_chunks) == (2, 4)

    backend = make_backend("plain", circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    outputs, _ = Evaluator(circuit, backend).run(encrypt_input(circuit, backend, x[0]))
    got = decrypt_output(circuit, backend, outputs).ravel()
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x[0]})[0].ravel()
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())

    # Only the ten outputs' slots are non-zero: nothing else of the weights reaches the client.
    slots = np.concatenate([backend.decrypt(ct) for ct in outputs])
    mask = np.ones(slots.size, bool)
    mask[circuit.output_layout.slot_indices(circuit.params.slots).ravel()] = False
    assert np.all(slots[mask] == 0.0)
