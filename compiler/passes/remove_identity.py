"""Remove Identity and inference-time Dropout, which would otherwise split linear segments."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from compiler.graph import ImportedModel, rename_uses, set_nodes

logger = logging.getLogger(__name__)


def remove_identity(imported: ImportedModel) -> int:
    """Rewire the readers of every Identity and Dropout to its input; returns the count."""
    graph = imported.graph
    constants = imported.constants()
    kept = []
    removed = 0
    read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in list(graph.node):
        mask_used = len(node.output) > 1 and node.output[1] in read
        if (
            node.op_type in ("Identity", "Dropout")
            and not mask_used
            and not _training(node, constants)
        ):
            rename_uses(graph, node.output[0], node.input[0])
            removed += 1
            continue
        kept.append(node)
    set_nodes(graph, kept)
    logger.info("remove_identity: %d Identity/Dropout nodes removed", removed)
    return removed


def _training(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """Whether a Dropout drops at run time (its training_mode input is not a constant false)."""
    if node.op_type != "Dropout" or len(node.input) < 3 or not node.input[2]:
        return False
    mode = constants.get(node.input[2])
    return mode is None or bool(mode.reshape(-1)[0])
