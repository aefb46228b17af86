"""Bad models are refused with the error class and a message that says what to change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from he_inference.errors import ConfigurationError, InvalidModelError, UnsupportedModelError


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _float(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _relu_model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [_float("x", ["N", 4])],
        [_float("y", ["N", 3])],
        [weight],
    )


def test_bytes_that_are_not_onnx_are_refused() -> None:
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        compile_model(b"this is not a protobuf \xff\xfe", input_range=(-1, 1))


def test_truncated_model_is_refused() -> None:
    data = _relu_model().SerializeToString()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 5):
        with pytest.raises(InvalidModelError):
            compile_model(data[:cut], input_range=(-1, 1))


def test_missing_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidModelError, match="cannot read"):
        compile_model(tmp_path / "absent.onnx")


def test_two_data_inputs_are_refused() -> None:
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [_float("a", [1, 4]), _float("b", [1, 4])],
        [_float("y", [1, 4])],
    )
    with pytest.raises(InvalidModelError, match="2 data inputs"):
        compile_model(model)


def test_integer_input_is_refused() -> None:
    model = _model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])],
        [_float("y", [1, 4])],
    )
    with pytest.raises(InvalidModelError, match="INT64"):
        compile_model(model)


def test_output_not_depending_on_the_input_is_refused() -> None:
    constant = numpy_helper.from_array(np.ones((1, 4), np.float32), "c")
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["c"], ["z"])],
        [_float("x", [1, 4])],
        [_float("y", [1, 4]), _float("z", [1, 4])],
        [constant],
    )
    with pytest.raises(InvalidModelError, match="'z' do not depend on the input"):
        compile_model(model, input_range=(-1, 1))


def test_dynamic_dimension_other_than_batch_is_refused() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [_float("x", [1, "width"])],
        [_float("y", [1, "width"])],
    )
    with pytest.raises(InvalidModelError, match="dimension 1 is dynamic"):
        compile_model(model, input_range=(-1, 1))


def test_all_unsupported_nodes_are_named_in_one_error() -> None:
    model = _model(
        [
            helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], name="pool1"),
            helper.make_node("Relu", ["p"], ["r"]),
            helper.make_node("LRN", ["r"], ["y"], size=3, name="norm1"),
        ],
        [_float("x", [1, 1, 4, 4])],
        [_float("y", [1, 1, 2, 2])],
    )
    with pytest.raises(UnsupportedModelError) as info:
        compile_model(model, input_range=(-1, 1))
    message = str(info.value)
    assert "'pool1' (MaxPool)" in message and "'norm1' (LRN)" in message
    assert "2 node(s)" in message and "supported operators:" in message


def test_softmax_in_the_middle_is_refused() -> None:
    model = _model(
        [
            helper.make_node("Softmax", ["x"], ["s"], name="mid"),
            helper.make_node("Neg", ["s"], ["y"]),
        ],
        [_float("x", [1, 4])],
        [_float("y", [1, 4])],
    )
    with pytest.raises(UnsupportedModelError, match="'mid' \\(Softmax\\)"):
        compile_model(model)


def test_prelu_with_an_encrypted_slope_is_refused() -> None:
    model = _model(
        [
            helper.make_node("Neg", ["x"], ["slope"]),
            helper.make_node("PRelu", ["x", "slope"], ["y"], name="prelu1"),
        ],
        [_float("x", [1, 3, 2, 2])],
        [_float("y", [1, 3, 2, 2])],
    )
    with pytest.raises(UnsupportedModelError, match=r"'prelu1' \(PRelu\).*must be constants"):
        compile_model(model, input_range=(-1, 1))


def test_activations_without_ranges_ask_for_calibration() -> None:
    from he_inference.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="calibration"):
        compile_model(_relu_model())


def test_a_budget_no_degree_meets_warns_with_the_options_to_change(caplog) -> None:  # type: ignore[no-untyped-def]
    compile_model(_relu_model(), input_range=(-1, 1), error_budget=1e-4, max_degree=3)
    (message,) = [r.getMessage() for r in caplog.records if "no degree <=" in r.getMessage()]
    assert "--error-budget" in message and "--degree" in message


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"batch": 0}, "batch 0"),
        ({"error_budget": 1.5}, "error_budget 1.5"),
        ({"degree": 0}, "degree 0"),
    ],
)
def test_an_option_out_of_range_is_named_alone(options, named) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError) as info:
        compile_model(_relu_model(), input_range=(-1, 1), **options)
    message = str(info.value)
    assert message.startswith(named)
    assert sum(word in message for word in ("batch", "error_budget", "degree")) == 1
