"""Rewrite joins of encrypted values from different roots into Adds of linear maps.

A circuit adds two ciphertext values of one shape (``BinaryNode`` "add") and applies
affine maps to one value; it has no subtraction, concatenation, broadcast or n-ary sum of
ciphertexts. Each of those joins is a sum of linear maps of its operands, so it becomes
one: ``Sub(a, b)`` is ``Add(a, Neg(b))``; ``Concat(a, b, ...)`` along an axis is the sum of
each operand zero-padded (``Pad``) to the output shape at its offset; ``Sum`` is a chain
of ``Add`` and ``Mean`` the same over operands scaled by ``1/n``; an operand that
broadcasts is first expanded (``Expand``) to the output shape. Constant operands sum into
one bias. The Neg, Pad, Mul and Expand nodes land in their operand's affine segment, so
they cost no level: ``lower.py`` measures each segment as one map. Operands of one root are
summed first, inside their segment, so the join costs one ciphertext addition (no level)
per extra root and one linear node per root.

Joins whose operands all share one root are left alone: they are part of one affine map
already. The join's last Add keeps the node's name and output, so calibration and the
per-layer report still find it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.graph import ImportedModel, NameScope, describe, set_nodes
from compiler.ops import root_tensors

logger = logging.getLogger(__name__)

_JOINS = frozenset({"Add", "Sub", "Sum", "Mean", "Concat"})


def rewrite_encrypted_joins(imported: ImportedModel) -> int:
    """Rewrite every join of several roots into Adds of two equal shapes; returns the count."""
    graph = imported.graph
    constants = imported.constants()
    encrypted = imported.encrypted()
    roots = root_tensors(graph.node, imported.input_name, encrypted, constants)
    names = NameScope(graph)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        secret = [n for n in node.input if n in encrypted]
        shape = imported.shapes.get(node.output[0])
        if (
            node.op_type not in _JOINS
            or node.domain not in ("", "ai.onnx")
            or len({roots[n] for n in secret}) < 2
            or shape is None
            or (
                node.op_type == "Add"
                and len(secret) == 2
                and all(imported.shapes.get(n) == shape for n in secret)
            )
        ):
            nodes.append(node)  # one affine map, or already a BinaryNode add
            continue
        join = _Join(imported, node, names, shape)
        if node.op_type == "Concat":
            join.concat(constants, encrypted)
        else:
            join.add_up(constants, encrypted)
        nodes.extend(join.finish(roots))
        count += 1
        logger.debug(
            "%s over %d roots rewritten into %d nodes",
            describe(node),
            len({roots[n] for n in secret}),
            len(join.nodes),
        )
    if count:
        set_nodes(graph, nodes)
    logger.info("rewrite_encrypted_joins: %d joins of several roots rewritten into Adds", count)
    return count


class _Join:
    """The nodes replacing one join: one term per encrypted operand, plus a constant bias."""

    def __init__(
        self,
        imported: ImportedModel,
        node: onnx.NodeProto,
        names: NameScope,
        shape: tuple[int, ...],
    ) -> None:
        self.imported = imported
        self.node = node
        self.names = names
        self.shape = shape
        self.base = node.name or node.output[0]
        self.nodes: list[onnx.NodeProto] = []
        self.terms: list[tuple[str, str]] = []  # (tensor of the output's shape, operand)
        self.bias: np.ndarray | None = None

    def add_up(self, constants: dict[str, np.ndarray], encrypted: set[str]) -> None:
        """Terms of Add, Sub, Sum and Mean: negated, scaled by 1/n, expanded as needed."""
        operands = [n for n in self.node.input if n]
        weight = 1.0 / len(operands) if self.node.op_type == "Mean" else 1.0
        for index, name in enumerate(operands):
            sign = -1.0 if self.node.op_type == "Sub" and index == 1 else 1.0
            if name not in encrypted:
                self._add_bias(sign * weight * constants[name].astype(np.float64))
                continue
            tensor = name
            if sign < 0:
                tensor = self._emit("Neg", [tensor], self.imported.shapes[name])
            if weight != 1.0:
                factor = self._constant("weight", np.array(weight))
                tensor = self._emit("Mul", [tensor, factor], self.imported.shapes[name])
            if self.imported.shapes[name] != self.shape:
                target = self._constant("shape", np.array(self.shape, np.int64))
                tensor = self._emit("Expand", [tensor, target], self.shape)
            self.terms.append((tensor, name))

    def concat(self, constants: dict[str, np.ndarray], encrypted: set[str]) -> None:
        """Terms of Concat: each operand zero-padded to the output shape at its offset."""
        rank = len(self.shape)
        axis = int(next((a.i for a in self.node.attribute if a.name == "axis"), 0)) % rank
        offset = 0
        for name in self.node.input:
            value = constants.get(name) if name not in encrypted else None
            width = (value.shape if value is not None else self.imported.shapes[name])[axis]
            before = [0] * rank
            after = [0] * rank
            before[axis], after[axis] = offset, self.shape[axis] - offset - width
            offset += width
            if width == 0:
                continue
            if value is not None:
                widths = list(zip(before, after, strict=True))
                self._add_bias(np.pad(value.astype(np.float64), widths))
                continue
            pads = self._constant("pads", np.array(before + after, np.int64))
            self.terms.append((self._emit("Pad", [name, pads], self.shape), name))

    def finish(self, roots: dict[str, str]) -> list[onnx.NodeProto]:
        """Sum the terms root by root (linear), then join the roots with Adds."""
        groups: dict[str, list[str]] = {}
        for tensor, operand in self.terms:
            groups.setdefault(roots[operand], []).append(tensor)
        sums = []
        for tensors in groups.values():
            total = tensors[0]
            for tensor in tensors[1:]:
                total = self._emit("Add", [total, tensor], self.shape)
            sums.append(total)
        if self.bias is not None:
            bias = self._constant("bias", np.broadcast_to(self.bias, self.shape))
            sums[0] = self._emit("Add", [sums[0], bias], self.shape)
        if len(sums) == 1:  # the other roots' operands were empty along the axis
            self._emit("Identity", sums, self.shape, output=self.node.output[0])
            return self.nodes
        total = sums[0]
        for index, tensor in enumerate(sums[1:], start=2):
            last = index == len(sums)
            total = self._emit(
                "Add",
                [total, tensor],
                self.shape,
                output=self.node.output[0] if last else None,
                name=self.node.name if last and self.node.name else None,
            )
        return self.nodes

    def _add_bias(self, value: np.ndarray) -> None:
        self.bias = value if self.bias is None else self.bias + value

    def _constant(self, label: str, value: np.ndarray) -> str:
        name = self.names.fresh(f"{self.node.output[0]}/{label}")
        if value.dtype.kind == "f":
            value = value.astype(self.imported.input_dtype)
        self.imported.graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(value), name)
        )
        return name

    def _emit(
        self,
        op_type: str,
        inputs: list[str],
        shape: tuple[int, ...],
        *,
        output: str | None = None,
        name: str | None = None,
    ) -> str:
        output = output or self.names.fresh(f"{self.node.output[0]}/{op_type.lower()}")
        node_name = name or self.names.fresh(f"{self.base}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=node_name))
        self.imported.shapes[output] = tuple(shape)
        return output
