"""Rewrite PRelu with a per-channel slope into one Relu and linear maps around it.

A polynomial node applies the same coefficients in every slot, so it computes PRelu only
when the slope is one number (then PRelu is one fitted polynomial, left as it is). For a
slope tensor ``s``, ``PRelu(x, s) = s * x + (1 - s) * Relu(x)``, and because Relu is
positively homogeneous, ``(1 - s) * Relu(x) = sign(1 - s) * Relu(|1 - s| * x)``. So the
node becomes

    Add(Mul(x, s), Relu(Mul(x, |1 - s|)))         when every s <= 1 (the usual case)
    Add(Mul(x, s), Mul(Relu(Mul(x, |1 - s|)), sign(1 - s)))   otherwise

Both products by ``x`` land in ``x``'s affine segment and the interval map of the Relu's
polynomial folds into the first, so the usual case costs what a scalar PRelu costs plus
one ciphertext addition (no level) and one more linear node from ``x``'s root; a slope
above 1 costs one more level, for the product by the signs. The slope broadcasts against
``x`` as ONNX broadcasts PRelu's (numpy rules, from the last axis), which Mul follows.

The Relu's input is new, so its node is added to the calibration model too, where its
range is measured like any other activation input.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.graph import ImportedModel, NameScope, describe, set_nodes

logger = logging.getLogger(__name__)


def expand_prelu(imported: ImportedModel) -> int:
    """Rewrite every PRelu with a constant slope of several values; returns how many."""
    graph = imported.graph
    constants = imported.constants()
    encrypted = imported.encrypted()
    names = NameScope(graph, imported.original.graph)  # the calibration model gets some too
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        slope = constants.get(node.input[1]) if len(node.input) > 1 else None
        if (
            node.op_type != "PRelu"
            or node.domain not in ("", "ai.onnx")
            or node.input[0] not in encrypted
            or slope is None
            or slope.size == 1
        ):
            nodes.append(node)
            continue
        nodes.extend(_expand(imported, node, slope, names))
        count += 1
    if count:
        set_nodes(graph, nodes)
    logger.info("expand_prelu: %d per-channel PRelu nodes expanded", count)
    return count


def _expand(
    imported: ImportedModel, node: onnx.NodeProto, slope: np.ndarray, names: NameScope
) -> list[onnx.NodeProto]:
    x, y = node.input[0], node.output[0]
    base = node.name or y
    shape = imported.shapes[x]
    gain = 1.0 - slope.astype(np.float64)
    nodes: list[onnx.NodeProto] = []

    def constant(label: str, value: np.ndarray) -> onnx.TensorProto:
        tensor = numpy_helper.from_array(value.astype(slope.dtype), names.fresh(f"{y}/{label}"))
        imported.graph.initializer.append(tensor)
        return tensor

    def emit(op_type: str, inputs: list[str], label: str, output: str | None = None) -> str:
        out = output or names.fresh(f"{y}/{label}")
        made = helper.make_node(op_type, inputs, [out], name=names.fresh(f"{base}/{label}"))
        nodes.append(made)
        imported.shapes[out] = shape
        return out

    magnitude = constant("gain", np.abs(gain))
    scaled = emit("Mul", [x, magnitude.name], "scaled")
    # Calibration measures the Relu's input on the original model, so it computes it too.
    imported.original.graph.initializer.append(magnitude)
    imported.original.graph.node.append(nodes[-1])
    positive = emit("Relu", [scaled], "relu")
    if np.any(gain < 0):
        signs = constant("sign", np.where(gain < 0, -1.0, 1.0))
        positive = emit("Mul", [positive, signs.name], "signed")
    leak = emit("Mul", [x, node.input[1]], "leak")
    emit("Add", [leak, positive], "add", output=y)
    nodes[-1].name = node.name or nodes[-1].name
    logger.debug(
        "%s with slope of shape %s expanded%s",
        describe(node),
        slope.shape,
        "" if np.all(gain >= 0) else " (a slope above 1 costs one level for the signs)",
    )
    return nodes
