"""Report every node the compiler cannot lower, all at once, before any key exists.

A user fixing a model wants the whole list in one run, with node names to find them in the
exporter's graph and the supported set to choose replacements from.
"""

from __future__ import annotations

import logging

from compiler.graph import ImportedModel, describe
from compiler.ops import SUPPORTED_OPS, activation_function, classify
from he_inference.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


def collect_unsupported(imported: ImportedModel) -> None:
    """Check every node; raise one error naming all that cannot be lowered.

    Raises:
        UnsupportedModelError: at least one node is unsupported (all are listed).
    """
    constants = imported.constants()
    encrypted = imported.encrypted()
    problems = []
    for node in imported.graph.node:
        if not any(name in encrypted for name in node.input):
            problems.append(f"{describe(node)}: a constant node that could not be folded")
            continue
        kind, reason = classify(node, encrypted, constants)
        if kind == "unsupported":
            problems.append(f"{describe(node)}: {reason}")
        elif kind == "activation":
            try:
                activation_function(node, constants)
            except UnsupportedModelError as exc:
                problems.append(str(exc))
    if problems:
        raise UnsupportedModelError(
            f"{len(problems)} node(s) cannot be compiled to CKKS:\n  "
            + "\n  ".join(problems)
            + f"\nsupported operators: {', '.join(sorted(SUPPORTED_OPS))} (and Softmax, "
            f"LogSoftmax, ArgMax, ZipMap at the end of the graph)"
        )
    logger.info("collect_unsupported: all %d nodes are supported", len(imported.graph.node))
