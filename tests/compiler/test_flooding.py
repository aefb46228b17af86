"""The compile step that measures an OpenFHE circuit's noise for flooding decryption."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.flooding import add_noise_flooding
from he_inference.errors import ConfigurationError
from he_inference.evaluate import run_plain
from tests.conftest import require_backend

pytestmark = pytest.mark.openfhe

RNG = np.random.default_rng(3)


def _mlp() -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm on 8 inputs."""
    weights = [
        numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32) * 0.5, name)
        for name, shape in (("w1", (8, 6)), ("b1", (6,)), ("w2", (6, 3)), ("b2", (3,)))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(autouse=True)
def _openfhe() -> None:
    require_backend("openfhe")


def test_openfhe_circuits_carry_their_measured_noise_by_default() -> None:
    model, calibration = _mlp(), RNG.uniform(-1, 1, size=(16, 1, 8))
    flooded = compile_model(model, calibration, degree=3, backend="openfhe")
    plain = compile_model(model, calibration, degree=3, backend="openfhe", noise_flooding=False)

    flooding = flooded.params.noise_flooding
    assert flooding is not None
    assert flooded.manifest()["params"]["noise_flooding"] == flooding.to_dict()
    # The output map is scaled below 1/8 instead of keeping a spare 59-bit level for it.
    assert (flooded.params.scale_bits, flooded.params.depth) == (59, plain.depth)
    shift = flooded.metadata["noise_flooding"]["output_shift_bits"]
    assert flooded.output_layout.scale == 2.0**shift
    outputs = np.stack([run_plain(plain, x[None]) for x in calibration])
    assert np.abs(outputs).max() / flooded.output_layout.scale < 1 / 8
    assert flooded.metadata["noise_flooding"]["estimated_on_queries"] == 1
    assert plain.params.noise_flooding is None
    assert plain.metadata["noise_flooding"] == "off"
    # Same nodes and weights on the new chain.
    x = calibration[:1]
    assert np.allclose(run_plain(flooded, x), run_plain(plain, x), atol=1e-12)


def test_other_backends_and_circuits_are_left_alone() -> None:
    seal = compile_model(_mlp(), RNG.uniform(-1, 1, size=(4, 1, 8)), degree=3, backend="seal")
    assert seal.params.noise_flooding is None
    assert "noise_flooding" not in seal.metadata
    with pytest.raises(ConfigurationError, match="--backend openfhe"):
        add_noise_flooding(seal)
    with pytest.raises(ConfigurationError, match="stack of the input shape"):
        seal.metadata["backend"] = "openfhe"
        add_noise_flooding(seal, np.zeros((2, 5)))


def test_without_an_output_bound_the_output_keeps_a_spare_level() -> None:
    model, calibration = _mlp(), RNG.uniform(-1, 1, size=(16, 1, 8))
    plain = compile_model(model, calibration, degree=3, backend="openfhe", noise_flooding=False)
    flooded = add_noise_flooding(plain, calibration)
    assert flooded.params.depth == plain.depth + 1
    assert flooded.output_layout.scale == 1.0
    assert flooded.metadata["noise_flooding"]["output_shift_bits"] == 0
