"""Models of every default-domain opset from 7 to the newest onnxruntime runs compile.

Older opsets are upgraded by the importer with onnx's version converter and the upgrade is
checked against onnxruntime; newer ones are used as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, version_converter

from compiler import compile_model
from compiler.graph import runtime_max_opset
from compiler.onnx_import import TARGET_OPSET
from he_inference.evaluate import run_plain
from tests.compiler.bounds import output_error_bound
from tests.compiler.models import constant, make_model, reference, weights

DATA = Path(__file__).parent / "data"
OPSETS = list(range(7, runtime_max_opset() + 1))


def _net(opset: int) -> onnx.ModelProto:
    """Pad, Conv, BatchNorm, per-channel PRelu and Sigmoid, their Sub and Concat, pool,
    Dropout, Flatten, Gemm: operators whose signatures hold across opsets, and Pad, which
    changes (attributes up to opset 10, inputs from 11)."""
    initializers = [
        weights("w", (3, 2, 3, 3), 1),
        weights("b", (3,), 2),
        weights("s", (3,), 3),
        weights("bb", (3,), 4),
        weights("mu", (3,), 5),
        constant("var", [0.7, 0.8, 0.9]),
        constant("slope", np.array([0.1, -0.2, 0.3]).reshape(3, 1, 1)),
        weights("w2", (4, 24), 6),
        weights("b2", (4,), 7),
    ]
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], pads=pads, mode="constant", value=0.0)
    else:
        pad = helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant")
        initializers.append(onnx.numpy_helper.from_array(np.array(pads, np.int64), "pads"))
    nodes = [
        pad,
        helper.make_node("Conv", ["p", "w", "b"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"]),
        helper.make_node("PRelu", ["bn", "slope"], ["r"]),
        helper.make_node("Sigmoid", ["bn"], ["g"]),
        helper.make_node("Sub", ["r", "g"], ["d"]),
        helper.make_node("Concat", ["d", "g"], ["cat"], axis=1),
        helper.make_node("AveragePool", ["cat"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Dropout", ["ap"], ["dr"]),
        helper.make_node("Flatten", ["dr"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    return make_model(nodes, (1, 2, 4, 4), initializers, opset=opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_model_of_each_opset_compiles_and_matches_onnxruntime(
    opset: int, caplog: pytest.LogCaptureFixture
) -> None:
    model = _net(opset)
    calibration = np.random.default_rng(opset).uniform(-1, 1, (8, 1, 2, 4, 4)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="compiler.onnx_import"):
        circuit = compile_model(model, calibration, degree=15)
    assert circuit.metadata["opset"] == max(opset, TARGET_OPSET)
    if opset < TARGET_OPSET:
        assert "verified it against onnxruntime" in caplog.text
    for x in calibration[:2]:
        expected = reference(model, x)
        got = run_plain(circuit, x).reshape(expected.shape)
        assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected)


def test_committed_export_converted_down_to_opset_7_compiles() -> None:
    # The converter has no down-adapters for opset 14-15 ops (Relu, BatchNormalization),
    # so the oldest export, at opset 9, is the one taken down.
    model = onnx.load(str(DATA / "cnn_legacy_view_dynamic_bnkept_opset9.onnx"))
    old = version_converter.convert_version(model, 7)
    assert old.opset_import[0].version == 7
    io = np.load(DATA / "variants_io.npz")
    circuit = compile_model(old, io["cnn_batch_x"][:, None], degree=15)
    assert circuit.metadata["opset"] == TARGET_OPSET
    for x, torch_y in zip(io["cnn_x"], io["cnn_y"], strict=True):
        expected = reference(old, x)
        np.testing.assert_allclose(expected, torch_y, atol=1e-5)
        got = run_plain(circuit, x).reshape(expected.shape)
        assert np.abs(got - expected).max() <= output_error_bound(circuit, x, expected)
