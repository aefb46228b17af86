"""Checks at the entry and the exit of the pipeline, so a compiler bug fails loudly there.

The entry check is on the model the passes will see; the exit check is on the circuit the
server will run: every value defined before it is read, levels consistent with each node
kind, the depth within the chain, the layout within the slots, and every rotation a linear
node needs covered by the Galois key list.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from compiler.graph import ImportedModel
from he_inference.circuit import Circuit, LinearNode, linear_rotation_steps
from he_inference.errors import CircuitError, InvalidModelError

logger = logging.getLogger(__name__)


def verify_model(imported: ImportedModel) -> None:
    """Check the imported model: one float input of static shape, one reachable output.

    Raises:
        InvalidModelError: one of those conditions fails.
    """
    graph = imported.graph
    if [i.name for i in graph.input] != [imported.input_name]:
        raise InvalidModelError(f"expected the one data input {imported.input_name!r}")
    if any(d <= 0 for d in imported.input_shape):
        raise InvalidModelError(f"input shape {imported.input_shape} is not static")
    try:
        onnx.checker.check_model(imported.model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"the normalised model fails the checker: {exc}") from exc
    encrypted = imported.encrypted()
    for output in imported.output_names:
        if output not in encrypted:
            raise InvalidModelError(f"output {output!r} does not depend on the input")


def verify_circuit(circuit: Circuit) -> None:
    """Check a compiled circuit's structure, levels, layout and rotation keys.

    Raises:
        CircuitError: the circuit is inconsistent (a compiler bug: please report it).
    """
    m = circuit.input_layout.period
    defined = {circuit.input_name: 0}
    problems = []
    for node in circuit.nodes:
        for name in node.inputs:
            if name not in defined:
                problems.append(f"{node.name} reads {name!r} before it is defined")
        if node.name in defined:
            problems.append(f"{node.name} is defined twice")
        expected_in = max((defined.get(n, 0) for n in node.inputs), default=0)
        if node.level_in != expected_in or node.level_out < node.level_in:
            problems.append(
                f"{node.name} has levels {node.level_in}->{node.level_out}, its "
                f"inputs end at {expected_in}"
            )
        if isinstance(node, LinearNode):
            missing = linear_rotation_steps(node, m) - set(circuit.rotation_steps)
            if missing:
                problems.append(f"{node.name} rotates by {sorted(missing)} without keys")
            for block in node.blocks:
                if block.diagonals.shape != (block.offsets.size, m) or np.any(
                    (block.offsets < 0) | (block.offsets >= m)
                ):
                    problems.append(f"{node.name} has a malformed block")
        defined[node.name] = node.level_out
    if circuit.output_name not in defined:
        problems.append(f"output {circuit.output_name!r} is never defined")
    if circuit.depth > circuit.params.depth:
        problems.append(f"depth {circuit.depth} exceeds the chain's {circuit.params.depth}")
    if 2 * m * circuit.input_layout.batch > circuit.params.slots:
        problems.append(f"period {m} does not fit {circuit.params.slots} slots")
    if problems:
        raise CircuitError(
            "the compiled circuit is inconsistent (a compiler bug): " + "; ".join(problems)
        )
    logger.info(
        "verified circuit %s: %d nodes, depth %d", circuit.name, len(circuit.nodes), circuit.depth
    )
