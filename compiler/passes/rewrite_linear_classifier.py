"""Rewrite skl2onnx's LinearClassifier into a linear map and client-side post-processing.

skl2onnx writes a classifier as ``LinearClassifier -> (label, scores)`` followed by a Cast of
the label, a Normalizer of the probabilities and a ZipMap. Only the scores ``W x + b`` are
worth evaluating encrypted: the logistic or softmax transform, the normalisation and the
label lookup are exact and free in the clear. So the node becomes MatMul + Add (which the
affine measurement lowers like any linear layer), the graph's one output becomes the scores,
and the rest is recorded as post-processing steps for the client.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.graph import ImportedModel, attributes, consumers, describe, set_nodes
from he_inference.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

# What may follow a LinearClassifier and still be recomputed on the client.
TAIL_OPS = frozenset({"Cast", "Normalizer", "ZipMap", "Identity"})


def rewrite_linear_classifier(imported: ImportedModel) -> int:
    """Replace each LinearClassifier by its scores; returns how many were rewritten.

    Raises:
        UnsupportedModelError: something other than Cast, Normalizer or ZipMap reads the
            classifier's outputs, or its coefficients do not match its labels.
    """
    graph = imported.graph
    classifiers = [n for n in graph.node if n.op_type == "LinearClassifier"]
    if not classifiers:
        return 0
    if len(classifiers) > 1:
        raise UnsupportedModelError(
            f"{len(classifiers)} LinearClassifier nodes: a circuit has one output, so only "
            f"one classifier at the end of the graph is supported"
        )
    node = classifiers[0]
    attrs = attributes(node)
    labels = list(attrs.get("classlabels_ints") or []) or [
        s.decode() if isinstance(s, bytes) else str(s)
        for s in attrs.get("classlabels_strings", [])
    ]
    coefficients = np.asarray(attrs["coefficients"], dtype=np.float32)
    intercepts = np.asarray(attrs.get("intercepts", []), dtype=np.float32)
    rows = len(intercepts) if len(intercepts) else len(labels)
    weights: np.ndarray = coefficients.reshape(rows, -1)
    if rows == 1 and len(labels) == 2:
        # Binary: one score z for the second class. Scores [0, z] give the same label and,
        # through a softmax, the same probabilities as the logistic of z.
        weights = np.concatenate([np.zeros_like(weights), weights])
        intercepts = np.concatenate([np.zeros(1, np.float32), intercepts])
    elif rows != len(labels):
        raise UnsupportedModelError(
            f"{describe(node)} has {rows} coefficient rows for {len(labels)} labels"
        )

    tail = _tail(graph, node)
    post_transform = attrs.get("post_transform", b"NONE")
    post_transform = (
        post_transform.decode() if isinstance(post_transform, bytes) else post_transform
    )
    scores = f"{node.output[1]}_scores"
    w_name, b_name = f"{scores}_W", f"{scores}_b"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(weights.T), w_name),
            numpy_helper.from_array(intercepts.astype(np.float32), b_name),
        ]
    )
    product = f"{scores}_product"
    replacement = [
        helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{node.name}_MatMul"),
        helper.make_node("Add", [product, b_name], [scores], name=f"{node.name}_Add"),
    ]
    kept = [n for n in graph.node if n is not node and n not in tail]
    index = list(graph.node).index(node)
    set_nodes(graph, [*kept[:index], *replacement, *kept[index:]])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(scores, onnx.TensorProto.FLOAT, None))
    batch = imported.shapes[node.input[0]][:-1]
    imported.shapes[product] = imported.shapes[scores] = (*batch, weights.shape[0])

    steps: list[dict[str, Any]] = []
    if post_transform == "SOFTMAX" or (post_transform == "LOGISTIC" and rows == 1):
        steps.append({"op": "softmax", "axis": -1, "output": scores})
    elif post_transform == "LOGISTIC":
        steps.append({"op": "sigmoid", "output": scores})
        steps.append({"op": "normalize_l1", "output": scores})
    elif post_transform != "NONE":
        raise UnsupportedModelError(
            f"{describe(node)}: post_transform {post_transform} is not "
            f"supported (NONE, LOGISTIC and SOFTMAX are)"
        )
    steps.append({"op": "argmax", "axis": -1, "labels": labels, "output": scores})
    imported.postprocess = [*imported.postprocess, *steps]
    logger.info(
        "rewrite_linear_classifier: %s -> MatMul + Add, %d steps to the client",
        describe(node),
        len(steps),
    )
    return 1


def _tail(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Every node downstream of the classifier, all of which must be recomputable."""
    readers = consumers(graph)
    tail: list[onnx.NodeProto] = []
    frontier = [o for o in node.output if o]
    while frontier:
        name = frontier.pop()
        for reader in readers.get(name, []):
            if reader in tail:
                continue
            if reader.op_type not in TAIL_OPS:
                raise UnsupportedModelError(
                    f"{describe(reader)} reads the output of {describe(node)}: only Cast, "
                    f"Normalizer and ZipMap may follow a classifier (they run on the client)"
                )
            tail.append(reader)
            frontier.extend(o for o in reader.output if o)
    return tail
