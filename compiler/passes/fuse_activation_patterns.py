"""Rewrite SiLU (``x * Sigmoid(x)``) and exact GELU (``x * 0.5 * (1 + Erf(x / sqrt 2))``)
into single activation nodes.

Left as exported, each is a product of two encrypted values around another activation: one
polynomial and one ciphertext multiplication, and Erf's polynomial needs a wider range
than GELU's. Fused, each becomes one polynomial fitted to the whole function, which is both
cheaper (one level fewer) and more accurate. The fused nodes live in the ``he_inference``
domain; their input tensor is a tensor of the original model, so calibration still sees it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from compiler.graph import (
    FUSED_DOMAIN,
    ImportedModel,
    consumers,
    node_key,
    producers,
    set_nodes,
)

logger = logging.getLogger(__name__)


def fuse_activation_patterns(imported: ImportedModel) -> int:
    """Fuse SiLU and GELU patterns in place; returns how many were fused."""
    graph = imported.graph
    constants = imported.constants()
    outputs = {o.name for o in graph.output}
    removed: set[str] = set()
    replacements: dict[str, onnx.NodeProto] = {}
    readers = consumers(graph)
    made = producers(graph)

    def only_reader(name: str, node: onnx.NodeProto) -> bool:
        return name not in outputs and [node_key(n) for n in readers.get(name, [])] == [
            node_key(node)
        ]

    def is_const(name: str, value: float) -> bool:
        array = constants.get(name)
        return (
            array is not None
            and array.size == 1
            and bool(np.isclose(float(array.reshape(-1)[0]), value, rtol=1e-3))
        )

    count = 0
    for node in graph.node:
        if node_key(node) in removed:
            continue
        if node.op_type == "Sigmoid":
            x = node.input[0]
            muls = readers.get(node.output[0], [])
            if (
                len(muls) == 1
                and muls[0].op_type == "Mul"
                and only_reader(node.output[0], muls[0])
                and set(muls[0].input) == {x, node.output[0]}
            ):
                mul = muls[0]
                removed.add(node_key(node))
                replacements[node_key(mul)] = helper.make_node(
                    "SiLU", [x], [mul.output[0]], name=mul.name or node.name, domain=FUSED_DOMAIN
                )
                count += 1
        elif node.op_type == "Erf":
            chain = _match_gelu(node, made, readers, only_reader, is_const)
            if chain is not None:
                x, nodes = chain
                removed.update(node_key(n) for n in nodes[:-1])
                last = nodes[-1]
                replacements[node_key(last)] = helper.make_node(
                    "Gelu", [x], [last.output[0]], name=last.name or node.name, domain=FUSED_DOMAIN
                )
                count += 1

    if count:
        set_nodes(
            graph,
            [replacements.get(node_key(n), n) for n in graph.node if node_key(n) not in removed],
        )
        if not any(o.domain == FUSED_DOMAIN for o in imported.model.opset_import):
            imported.model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    logger.info("fuse_activation_patterns: %d SiLU/GELU patterns fused", count)
    return count


def _match_gelu(
    erf: onnx.NodeProto,
    made: dict[str, onnx.NodeProto],
    readers: dict[str, list[onnx.NodeProto]],
    only_reader: Callable[[str, onnx.NodeProto], bool],
    is_const: Callable[[str, float], bool],
) -> tuple[str, list[onnx.NodeProto]] | None:
    """``(x, nodes)`` when ``erf`` is the centre of an exact GELU, the last node the product."""
    scale = made.get(erf.input[0])
    if scale is None or not only_reader(erf.input[0], erf):
        return None
    divided = scale.op_type == "Div" and is_const(scale.input[1], math.sqrt(2.0))
    if divided or (scale.op_type == "Mul" and is_const(scale.input[1], 1 / math.sqrt(2.0))):
        x = scale.input[0]
    elif scale.op_type == "Mul" and is_const(scale.input[0], 1 / math.sqrt(2.0)):
        x = scale.input[1]
    else:
        return None
    adds = readers.get(erf.output[0], [])
    if len(adds) != 1 or adds[0].op_type != "Add" or not only_reader(erf.output[0], adds[0]):
        return None
    add = adds[0]
    other = [n for n in add.input if n != erf.output[0]]
    if len(other) != 1 or not is_const(other[0], 1.0):
        return None

    nodes = [scale, erf, add]
    current, have_x, have_half = add.output[0], False, False
    for _ in range(2):
        muls = readers.get(current, [])
        if len(muls) != 1 or muls[0].op_type != "Mul" or not only_reader(current, muls[0]):
            return None
        mul = muls[0]
        operand = mul.input[1] if mul.input[0] == current else mul.input[0]
        half = made.get(operand)
        if operand == x and not have_x:
            have_x = True
        elif is_const(operand, 0.5) and not have_half:
            have_half = True
        elif (
            half is not None
            and half.op_type == "Mul"
            and x in half.input
            and any(is_const(n, 0.5) for n in half.input)
            and only_reader(operand, mul)
        ):
            have_x = have_half = True
            nodes.append(half)
        else:
            return None
        nodes.append(mul)
        current = mul.output[0]
        if have_x and have_half:
            return x, nodes
    return None
