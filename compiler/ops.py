"""Which ONNX operators the compiler lowers, and how each encrypted node is classified.

After constant folding every tensor is either constant or encrypted (it depends on the data
input), and each node that reads an encrypted tensor falls in one class:

- ``linear``: affine in its one encrypted source. Such nodes are never lowered one by one:
  ``lower.py`` measures the affine map of a whole segment with onnxruntime, so any op here
  that the runtime knows works without code of its own, and the map is checked to be affine.
- ``join``: Add/Sub/Sum/Mean/Concat reading several encrypted tensors; linear when they all
  derive from one root (see :func:`root_tensors`), an encrypted addition when not (the pass
  ``rewrite_encrypted_joins`` first turns every such join into Adds of two equal shapes).
- ``activation``: elementwise, replaced by a Chebyshev polynomial on its calibrated range.
- ``square`` and ``multiply``: exact products of encrypted values (one level each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from compiler.graph import FUSED_DOMAIN, attributes, describe
from he_inference.approx import Activation, activation
from he_inference.errors import ConfigurationError, UnsupportedModelError

LINEAR_OPS = frozenset(
    {
        "Gemm",
        "MatMul",
        "Conv",
        "ConvTranspose",
        "AveragePool",
        "GlobalAveragePool",
        "BatchNormalization",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Pad",
        "Sum",
        "Mean",
        "ReduceMean",
        "ReduceSum",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Slice",
        "Split",
        "Gather",
        "Expand",
        "Tile",
        "DepthToSpace",
        "SpaceToDepth",
        "Cast",
        "CumSum",
        "Einsum",
        "Resize",
        "Upsample",
        "Identity",
        "Dropout",
        "Scaler",
        "LinearRegressor",
    }
)
JOIN_OPS = frozenset({"Add", "Sub", "Sum", "Mean", "Concat"})

#: Elementwise activations with their polynomial fits (``approx.activation``, or below).
ACTIVATION_OPS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Sigmoid",
        "HardSigmoid",
        "Tanh",
        "Softplus",
        "Gelu",
        "SiLU",
        "HardSwish",
        "Clip",
        "Celu",
        "Softsign",
        "ThresholdedRelu",
        "Mish",
        "Abs",
        "Erf",
        "Exp",
        "Sin",
        "Cos",
        "Pow",
    }
)
POSTPROCESS_OPS = frozenset({"Softmax", "LogSoftmax", "ArgMax", "ZipMap"})
SUPPORTED_OPS = LINEAR_OPS | ACTIVATION_OPS

_FLOAT_CASTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}

_EXTRA: dict[str, Any] = {
    "Softsign": lambda a: lambda x: x / (1.0 + np.abs(x)),
    "Celu": lambda a: (
        lambda x: np.where(
            x >= 0, x, a.get("alpha", 1.0) * np.expm1(np.minimum(x, 0) / a.get("alpha", 1.0))
        )
    ),
    "ThresholdedRelu": lambda a: lambda x: np.where(x > a.get("alpha", 1.0), x, 0.0),
    "Mish": lambda a: lambda x: x * np.tanh(np.logaddexp(0.0, x)),
    "Abs": lambda a: np.abs,
    "Exp": lambda a: np.exp,
    "Sin": lambda a: np.sin,
    "Cos": lambda a: np.cos,
    "Pow": lambda a: lambda x: np.power(x, a["exponent"]),
}


def classify(
    node: onnx.NodeProto, encrypted: set[str], constants: dict[str, np.ndarray]
) -> tuple[str, str | None]:
    """The class of a node that reads an encrypted tensor, or ``unsupported`` and why."""
    op = node.op_type
    secret = [i for i, name in enumerate(node.input) if name in encrypted]
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        return "unsupported", "control flow on encrypted data is not supported"
    if node.domain == FUSED_DOMAIN:
        return "activation", None
    if node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
        return "unsupported", f"operator domain {node.domain!r} is not supported"

    if op == "Mul" and len(secret) == 2:
        same = node.input[0] == node.input[1]
        return ("square", None) if same else ("multiply", None)
    if op == "Pow":
        exponent = constants.get(node.input[1])
        if 1 in secret or exponent is None or exponent.size != 1:
            return "unsupported", "Pow needs a constant scalar exponent"
        p = float(exponent.reshape(-1)[0])
        if p == 2.0:
            return "square", None
        if p == 1.0:
            return "linear", None
        if p.is_integer() and 2 < p <= 8:
            return "activation", None
        return "unsupported", f"Pow with exponent {p:g}: only integer exponents 1 to 8"
    if op in JOIN_OPS and len(secret) > 1:
        return "join", None
    if op in ACTIVATION_OPS:
        if secret != [0]:
            return "unsupported", "the activation's parameters must be constants"
        return "activation", None
    if op in LINEAR_OPS:
        if len(secret) != 1:
            return "unsupported", "two encrypted operands of a linear operator"
        if op == "Div" and secret != [0]:
            return "unsupported", "division by an encrypted value is not supported"
        if op in ("Conv", "ConvTranspose", "Gather", "Slice", "Reshape") and secret != [0]:
            return "unsupported", f"{op} with encrypted parameters is not supported"
        if op == "Cast" and attributes(node).get("to") not in _FLOAT_CASTS:
            return "unsupported", "a cast of encrypted data to a non-float type"
        if op == "BatchNormalization" and attributes(node).get("training_mode"):
            return "unsupported", "BatchNormalization in training mode"
        if op == "Dropout":  # remove_identity removed every inference-time Dropout
            return "unsupported", "Dropout in training mode, or with its mask output used"
        return "linear", None
    if op in POSTPROCESS_OPS:
        return "unsupported", (
            f"{op} is supported only at the end of the graph, where it runs "
            f"on the client after decryption"
        )
    return "unsupported", "no encrypted lowering exists for this operator"


def root_tensors(
    nodes: Iterable[onnx.NodeProto],
    input_name: str,
    encrypted: set[str],
    constants: dict[str, np.ndarray],
) -> dict[str, str]:
    """Each encrypted tensor's root: the data input or the nearest non-linear node's output.

    A linear node, and a join whose encrypted inputs all have one root, keep their input's
    root; every other node (an activation, a product, a join of several roots) starts one.
    """
    roots = {input_name: input_name}
    for node in nodes:
        inputs = [n for n in node.input if n in encrypted]
        if not inputs:
            continue
        kind, _ = classify(node, encrypted, constants)
        linear = kind == "linear" or (kind == "join" and len({roots[n] for n in inputs}) == 1)
        for out in node.output:
            if out:
                roots[out] = roots[inputs[0]] if linear else out
    return roots


def activation_function(
    node: onnx.NodeProto, constants: dict[str, np.ndarray]
) -> tuple[Activation, str]:
    """The numpy function an activation node computes, and a label for the manifest.

    Raises:
        UnsupportedModelError: the activation's parameters cannot be lowered (a PRelu slope
            that is not one constant, a Clip bound that is not constant).
    """
    op = node.op_type
    attrs = {k: v for k, v in attributes(node).items() if isinstance(v, (int, float))}
    if op == "PRelu":
        slope = constants.get(node.input[1])
        if slope is None or slope.size != 1:
            shape = None if slope is None else slope.shape
            raise UnsupportedModelError(
                f"PRelu {describe(node)} has a per-channel slope of shape {shape}: one "
                f"polynomial takes only a shared (scalar) slope; the pass expand_prelu rewrites "
                f"a constant per-channel one into a Relu and linear maps"
            )
        attrs = {"slope": float(slope.reshape(-1)[0])}
    elif op == "Clip":
        for index, key in ((1, "min"), (2, "max")):
            if len(node.input) > index and node.input[index]:
                bound = constants.get(node.input[index])
                if bound is None:
                    raise UnsupportedModelError(f"Clip {describe(node)} has a non-constant {key}")
                attrs[key] = float(bound.reshape(-1)[0])
    elif op == "Gelu":
        attrs = (
            {"approximate_tanh": 1.0}
            if attributes(node).get("approximate") in (b"tanh", "tanh")
            else {}
        )
    elif op == "Pow":
        attrs = {"exponent": float(constants[node.input[1]].reshape(-1)[0])}

    if op in _EXTRA:
        fn: Activation = _EXTRA[op](attrs)
    else:
        try:
            fn = activation(op, **attrs)
        except ConfigurationError as exc:
            raise UnsupportedModelError(f"{describe(node)}: {exc}") from exc
    shown = ", ".join(f"{k}={v:g}" for k, v in sorted(attrs.items()) if math.isfinite(v))
    return fn, f"{op}({shown})" if shown else op
