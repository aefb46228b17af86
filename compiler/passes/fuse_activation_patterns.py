"""Fuse activations that exporters write as elementwise arithmetic into one activation node.

SiLU (``x * Sigmoid(x)``), exact GELU (``0.5 * x * (1 + Erf(x / sqrt 2))``), GELU's tanh
form (``0.5 * x * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``, which torch's
``approximate='tanh'`` exports as separate ops below opset 20), GELU's sigmoid form
(``x * Sigmoid(1.702 x)``, "QuickGELU", fused as a SiLU with ``alpha``) and Mish
(``x * Tanh(Softplus(x))``, separate ops below opset 18). Left as exported, each is
products of encrypted values around another activation: a polynomial, one to three
ciphertext multiplications (a level each), and a polynomial fitted to Erf or Tanh on a
range wider than the whole function needs. Fused, each becomes one polynomial fitted to
the whole function, which is cheaper and more accurate.

Exporters spell these functions many ways (``Pow(x, 3)`` or ``x * x * x``, the 0.5 on
either side, ``Div`` by sqrt 2 or ``Mul`` by its inverse, constants on either operand), so
the pattern is recognised by value rather than by shape: around each Sigmoid, Erf or Tanh,
every region of elementwise arithmetic on scalar constants that reads one tensor ``x``,
and whose intermediate tensors nothing outside it reads, is evaluated in numpy on a grid
and compared with each fusable function. The fused nodes live in the ``he_inference``
domain; their input is a tensor of the original model, so calibration still sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from compiler.graph import (
    FUSED_DOMAIN,
    ImportedModel,
    consumers,
    describe,
    node_key,
    producers,
    set_nodes,
)
from he_inference.approx import activation

logger = logging.getLogger(__name__)

_Op = Callable[..., np.ndarray]

#: Elementwise operators a fusable region is made of, as numpy functions.
_ELEMENTWISE: dict[str, _Op] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
    "Neg": np.negative,
    "Sigmoid": activation("Sigmoid"),
    "Erf": activation("Erf"),
    "Tanh": np.tanh,
    "Softplus": activation("Softplus"),
}
_CENTRES = frozenset({"Sigmoid", "Erf", "Tanh"})

#: What a region may fuse into: (op_type, attributes of the fused node, the function).
_FUSED: list[tuple[str, dict[str, str | float], _Op]] = [
    ("SiLU", {}, activation("SiLU")),
    ("Gelu", {}, activation("Gelu")),
    ("Gelu", {"approximate": "tanh"}, activation("Gelu", approximate_tanh=1.0)),
    ("Mish", {}, lambda x: x * np.tanh(np.logaddexp(0.0, x))),
    ("SiLU", {"alpha": 1.702}, activation("SiLU", alpha=1.702)),
]

#: Where a region is compared with each function; wide enough that GELU's two forms, which
#: differ by at most 4.7e-4, are told apart by ``_MATCH_TOLERANCE`` times the peak of 10.
_GRID = np.linspace(-10.0, 10.0, 401)
_MATCH_TOLERANCE = 1e-5

#: How far from the centre a region's input and output are searched, in nodes.
_REACH = 6


def fuse_activation_patterns(imported: ImportedModel) -> int:
    """Fuse SiLU, GELU and Mish patterns in place; returns how many were fused."""
    graph = imported.graph
    constants = {
        name: float(array.reshape(-1)[0])
        for name, array in imported.constants().items()
        if array.size == 1 and array.dtype.kind in "fiu"
    }
    context = _Context(graph, constants, imported.shapes)
    removed: set[str] = set()
    replacements: dict[str, onnx.NodeProto] = {}
    count = 0
    for node in graph.node:
        if node.op_type not in _CENTRES or node.domain not in ("", "ai.onnx"):
            continue
        if node_key(node) in removed:
            continue
        match = context.match(node, removed)
        if match is None:
            continue
        x, region, (op_type, attrs, _) = match
        last = region[-1]
        removed.update(node_key(n) for n in region)
        fused = helper.make_node(
            op_type, [x], [last.output[0]], name=last.name or node.name, domain=FUSED_DOMAIN
        )
        fused.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        replacements[node_key(last)] = fused
        count += 1
        logger.debug(
            "fused %d nodes around %s into %s%s", len(region), describe(node), op_type, attrs
        )

    if count:
        set_nodes(
            graph,
            [
                replacements.get(node_key(n), n)
                for n in graph.node
                if node_key(n) not in removed or node_key(n) in replacements
            ],
        )
        if not any(o.domain == FUSED_DOMAIN for o in imported.model.opset_import):
            imported.model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    logger.info("fuse_activation_patterns: %d SiLU/GELU/Mish patterns fused", count)
    return count


class _Context:
    """The graph's producers and readers, and how to match a region around a centre."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        constants: dict[str, float],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.constants = constants
        self.shapes = shapes
        self.made = producers(graph)
        self.readers = consumers(graph)
        self.outputs = {o.name for o in graph.output}
        self.order = {node_key(n): i for i, n in enumerate(graph.node)}

    def match(
        self, centre: onnx.NodeProto, removed: set[str]
    ) -> tuple[str, list[onnx.NodeProto], tuple[str, dict[str, str | float], _Op]] | None:
        """``(x, region in graph order, fused kind)`` of the nearest region that fuses."""
        for y in self._downstream(centre):
            for x in self._upstream(centre):
                region = self._region(x, y)
                if region is None or any(node_key(n) in removed for n in region):
                    continue
                kind = self._identify(x, region)
                if kind is not None:
                    return x, region, kind
        return None

    def _elementwise(self, node: onnx.NodeProto) -> bool:
        return node.op_type in _ELEMENTWISE and node.domain in ("", "ai.onnx")

    def _downstream(self, centre: onnx.NodeProto) -> list[str]:
        """Candidate outputs: tensors reached from the centre through single readers."""
        found, current = [], centre.output[0]
        for _ in range(_REACH):
            readers = self.readers.get(current, [])
            if len(readers) != 1 or not self._elementwise(readers[0]):
                break
            current = readers[0].output[0]
            found.append(current)
        return found

    def _upstream(self, centre: onnx.NodeProto) -> list[str]:
        """Candidate inputs: the centre's input and the tensors it is computed from, nearest
        first, through elementwise nodes only."""
        found: list[str] = []
        frontier = [centre.input[0]]
        for _ in range(_REACH):
            step: list[str] = []
            for name in frontier:
                if name in found or name in self.constants:
                    continue
                found.append(name)
                node = self.made.get(name)
                if node is not None and self._elementwise(node):
                    step.extend(n for n in node.input if n)
            frontier = step
        return found

    def _region(self, x: str, y: str) -> list[onnx.NodeProto] | None:
        """The nodes computing ``y`` from ``x`` and scalar constants alone, or ``None``."""
        nodes: dict[str, onnx.NodeProto] = {}
        stack = [y]
        while stack:
            name = stack.pop()
            if name == x or name in self.constants:
                continue
            node = self.made.get(name)
            if node is None or not self._elementwise(node) or len(nodes) > 4 * _REACH:
                return None  # reads another tensor, or a non-scalar constant
            if node_key(node) not in nodes:
                nodes[node_key(node)] = node
                stack.extend(n for n in node.input if n)
        if self.shapes.get(x) is None or self.shapes.get(x) != self.shapes.get(y):
            return None  # a fused activation keeps its input's shape
        inside = set(nodes)
        for node in nodes.values():
            out = node.output[0]
            if out != y and (
                out in self.outputs
                or any(node_key(r) not in inside for r in self.readers.get(out, []))
            ):
                return None  # an intermediate tensor is read elsewhere
        return sorted(nodes.values(), key=lambda n: self.order[node_key(n)])

    def _identify(
        self, x: str, region: list[onnx.NodeProto]
    ) -> tuple[str, dict[str, str | float], _Op] | None:
        """The fusable function the region computes on the grid, if any."""
        values: dict[str, np.ndarray] = {x: _GRID}
        with np.errstate(all="ignore"):
            for node in region:
                operands = [
                    values[n] if n in values else np.float64(self.constants[n])
                    for n in node.input
                    if n
                ]
                values[node.output[0]] = np.asarray(_ELEMENTWISE[node.op_type](*operands))
        result = values[region[-1].output[0]]
        if result.shape != _GRID.shape or not np.all(np.isfinite(result)):
            return None
        best, best_error = None, np.inf
        for kind in _FUSED:
            target = kind[2](_GRID)
            error = float(np.abs(result - target).max()) / max(1.0, float(np.abs(target).max()))
            if error < best_error:
                best, best_error = kind, error
        return best if best_error <= _MATCH_TOLERANCE else None
