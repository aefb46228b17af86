"""Evaluate every node whose inputs are all constant, so only encrypted nodes remain.

Exporters compute reshape targets at run time (``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``) and fold nothing; with the input shape fixed those chains are constants, and
removing them is what lets every remaining node be classified as linear or not. ``Shape`` and
``Size`` of an encrypted tensor fold too, since every shape is static here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.graph import ImportedModel, prune_initializers, session, set_nodes

logger = logging.getLogger(__name__)

_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)


def fold_constants(imported: ImportedModel) -> int:
    """Replace constant subgraphs by initializers; returns how many nodes were folded."""
    graph = imported.graph
    constants = imported.constants()
    encrypted = imported.encrypted()
    opsets = {o.domain or "": o.version for o in imported.model.opset_import}
    kept: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        values = _evaluate(node, constants, encrypted, imported.shapes, opsets)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values, strict=False):
            if name:
                constants[name] = value
                graph.initializer.append(numpy_helper.from_array(value, name))
        folded += 1
        logger.debug("folded %s node %r", node.op_type, node.name)
    set_nodes(graph, kept)
    prune_initializers(graph)
    logger.info("fold_constants: %d nodes folded into initializers, %d remain", folded, len(kept))
    return folded


def _evaluate(
    node: onnx.NodeProto,
    constants: dict[str, np.ndarray],
    encrypted: set[str],
    shapes: dict[str, tuple[int, ...]],
    opsets: dict[str, int],
) -> list[np.ndarray] | None:
    if node.op_type in _NONDETERMINISTIC:
        return None
    inputs = [name for name in node.input if name]
    if node.op_type in ("Shape", "Size") and inputs and inputs[0] in shapes:
        shape = np.array(shapes[inputs[0]], dtype=np.int64)
        if node.op_type == "Size":
            return [np.array(np.prod(shape), dtype=np.int64)]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return [shape[attrs.get("start", 0) : attrs.get("end", len(shape))]]
    if any(name in encrypted and name not in constants for name in inputs):
        return None
    if not all(name in constants for name in inputs):
        return None
    feeds = {name: constants[name] for name in inputs}
    try:
        from onnx.reference import ReferenceEvaluator

        domain = node.domain or ""
        evaluator = ReferenceEvaluator(node, opsets={domain: opsets.get(domain, 1)})
        outputs: list[Any] | None = list(evaluator.run(None, feeds))
    except Exception:  # the reference lacks some ops: onnxruntime is the second opinion
        outputs = _evaluate_with_runtime(node, feeds, opsets)
    if outputs is None:
        return None
    if not all(isinstance(v, (np.ndarray, np.generic)) for v in outputs):
        return None
    return [np.asarray(v) for v in outputs]


def _evaluate_with_runtime(
    node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets: dict[str, int]
) -> list[Any] | None:
    graph = helper.make_graph(
        [node],
        "fold",
        [],
        [helper.make_empty_tensor_value_info(o) for o in node.output if o],
        [numpy_helper.from_array(v, k) for k, v in feeds.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
    )
    try:
        return list(session(model).run(None, {}))
    except Exception:  # left in place; collect_unsupported reports it if it matters
        logger.debug("cannot fold %s node %r", node.op_type, node.name)
        return None
