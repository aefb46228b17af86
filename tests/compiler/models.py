"""Small one-input ONNX models built by hand, and onnxruntime's outputs for them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def weights(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.5) -> onnx.TensorProto:
    """A float32 initializer of standard normal values times ``scale``."""
    values = np.random.default_rng(seed).standard_normal(shape) * scale
    return numpy_helper.from_array(values.astype(np.float32), name)


def constant(name: str, value: float | Sequence[float] | np.ndarray) -> onnx.TensorProto:
    """A float32 initializer holding exactly ``value``."""
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def make_model(
    nodes: list[onnx.NodeProto],
    shape: tuple[int, ...],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    """A model reading ``x`` of ``shape`` and returning the last node's first output.

    The output's shape is read from one onnxruntime run, so the model passes the checker.
    """
    out = nodes[-1].output[0]

    def build(output: onnx.ValueInfoProto) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
            [output],
            list(initializers),
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = helper.find_min_ir_version_for(opsets)
        if model.ir_version < 4:  # IR 3 lists every initializer among the inputs
            model.graph.input.extend(
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in initializers
            )
        return model

    probe = build(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    result = reference(probe, np.zeros(shape, np.float32))
    model = build(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(result.shape)))
    onnx.checker.check_model(model)
    return model


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime's first output for one input."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])
