"""Move Softmax, LogSoftmax, ArgMax and ZipMap at the end of the graph to the client.

These run after decryption, in the clear, on the client: evaluating them under CKKS would
cost a deep polynomial (an exponential and a division) for a result that the client can
compute exactly from the logits. In the middle of the graph they are refused, since the
next layer needs their encrypted result.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx

from compiler.graph import (
    ImportedModel,
    attributes,
    consumers,
    describe,
    node_key,
    producers,
    set_nodes,
)
from compiler.ops import POSTPROCESS_OPS
from he_inference.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


def extract_postprocess(imported: ImportedModel) -> list[dict[str, Any]]:
    """Strip trailing post-processing nodes into ``imported.postprocess``; returns the steps.

    Each step names the ONNX output it produces; steps naming the same output apply in
    order to the decrypted value.

    Raises:
        UnsupportedModelError: outputs remain that are different encrypted tensors, or a
            post-processing operator sits in the middle of the graph.
    """
    graph = imported.graph
    removed: set[str] = set()
    steps: list[dict[str, Any]] = []
    roots: list[str] = []
    made = producers(graph)
    readers = consumers(graph)
    for output in graph.output:
        chain: list[dict[str, Any]] = []
        name = output.name
        while name in made and made[name].op_type in POSTPROCESS_OPS:
            node = made[name]
            others = [n for n in readers.get(name, []) if node_key(n) not in removed]
            if others:
                break
            chain.insert(0, _step(node, output.name))
            removed.add(node_key(node))
            name = node.input[0]
        steps.extend(chain)
        roots.append(name)

    distinct = list(dict.fromkeys(roots))
    if len(distinct) > 1:
        raise UnsupportedModelError(
            f"the model has {len(distinct)} encrypted outputs ({', '.join(map(repr, distinct))})"
            f" and a circuit has one: keep one output, or concatenate them in the model"
        )
    if steps:
        set_nodes(graph, [n for n in graph.node if node_key(n) not in removed])
        template = next((o for o in graph.output if o.name == distinct[0]), None)
        del graph.output[:]
        graph.output.append(template or onnx.helper.make_empty_tensor_value_info(distinct[0]))
    imported.postprocess = [*imported.postprocess, *steps]
    middle = [n for n in graph.node if n.op_type in POSTPROCESS_OPS]
    if middle:
        raise UnsupportedModelError(
            "; ".join(f"{describe(n)} is in the middle of the graph" for n in middle)
            + ": it runs only at the end, on the client after decryption"
        )
    logger.info(
        "extract_postprocess: %d steps moved to the client: %s",
        len(steps),
        [s["op"] for s in steps],
    )
    return steps


def _step(node: onnx.NodeProto, output: str) -> dict[str, Any]:
    attrs = attributes(node)
    if node.op_type in ("Softmax", "LogSoftmax"):
        return {"op": node.op_type.lower(), "axis": int(attrs.get("axis", -1)), "output": output}
    if node.op_type == "ArgMax":
        return {
            "op": "argmax",
            "axis": int(attrs.get("axis", 0)),
            "keepdims": bool(attrs.get("keepdims", 1)),
            "output": output,
        }
    labels = attrs.get("classlabels_int64s") or [
        s.decode() if isinstance(s, bytes) else s for s in attrs.get("classlabels_strings", [])
    ]
    return {"op": "zipmap", "labels": list(labels), "output": output}
