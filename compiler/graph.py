"""The model under compilation and the graph helpers every pass shares.

Passes edit the ``onnx.ModelProto`` in place rather than a private IR: the graph stays
something onnxruntime can run at every step, which is what the affine-map extraction in
``lower.py`` and the calibration in ``calibrate.py`` rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from he_inference.errors import InvalidModelError, UnsupportedModelError

logger = logging.getLogger(__name__)

#: Domain of the nodes the passes introduce (fused SiLU and GELU); onnxruntime never sees it.
FUSED_DOMAIN = "he_inference"

#: onnxruntime 1.18 and later read IR version 10; newer exporters write 11 for the same ops.
RUNTIME_IR_VERSION = 10


def runtime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime officially runs."""
    import onnxruntime as ort

    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    # From the onnxruntime release notes: 1.20 runs opset 21, 1.21-1.22 run 22, 1.23 runs 23.
    if (major, minor) >= (1, 23):
        return 23
    return 22 if (major, minor) >= (1, 21) else 21


@dataclass
class ImportedModel:
    """An ONNX model with one data input of static shape, as the passes see it.

    Attributes:
        model: the graph being rewritten (passes edit it in place).
        original: the model as imported (batch fixed, opset upgraded), which onnxruntime
            runs for calibration; every activation input of ``model`` is named in it (a pass
            that makes a new one adds the nodes computing it here too).
        input_name: the one data input.
        input_shape: its static shape, batch dimension fixed.
        input_dtype: its numpy dtype (float32 or float64).
        shapes: static shape of every tensor, from shape inference and one reference run.
        sha256: hash of the source bytes, recorded in the circuit's metadata.
        opset: default-domain opset after any upgrade.
        producer: producer name and version the exporter wrote.
        postprocess: steps moved out of the graph to run on the client in the clear.
    """

    model: onnx.ModelProto
    original: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype[Any]
    shapes: dict[str, tuple[int, ...]]
    sha256: str
    opset: int
    producer: str
    postprocess: list[dict[str, Any]] = field(default_factory=list)

    @property
    def graph(self) -> onnx.GraphProto:
        """The graph being rewritten."""
        return self.model.graph

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs."""
        return [o.name for o in self.model.graph.output]

    def constants(self) -> dict[str, np.ndarray]:
        """Every initializer as a numpy array."""
        return {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}

    def encrypted(self) -> set[str]:
        """Tensors that depend on the data input (all others are constants)."""
        tainted = {self.input_name}
        for node in self.model.graph.node:
            if any(name in tainted for name in node.input if name):
                tainted.update(o for o in node.output if o)
        return tainted


class NameScope:
    """Fresh tensor and node names for what a pass adds, unique in every graph given."""

    def __init__(self, *graphs: onnx.GraphProto) -> None:
        self._used: set[str] = set()
        for graph in graphs:
            self._used.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
            self._used.update(t.name for t in graph.initializer)
            for node in graph.node:
                self._used.update(node.input)
                self._used.update(node.output)
                self._used.add(node.name)

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... when that name is taken; now taken."""
        name, count = base, 0
        while name in self._used:
            count += 1
            name = f"{base}_{count}"
        self._used.add(name)
        return name


def node_key(node: onnx.NodeProto) -> str:
    """A stable key for a node: its first output (protobuf wrappers have no stable id)."""
    return str(node.output[0])


def set_nodes(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Replace the node list of a graph."""
    kept = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        kept.append(copy)
    del graph.node[:]
    graph.node.extend(kept)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: node for node in graph.node for o in node.output if o}


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of ``old`` (nodes and graph outputs) read ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for output in graph.output:
        if output.name == old:
            output.name = new


def prune_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers that no node reads."""
    used = {name for node in graph.node for name in node.input}
    used.update(o.name for o in graph.output)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def describe(node: onnx.NodeProto) -> str:
    """``'name' (OpType)`` for messages; unnamed nodes are named by their first output."""
    return f"'{node.name or node.output[0]}' ({node.op_type})"


def session(model: onnx.ModelProto) -> Any:
    """An onnxruntime CPU session for a model, quiet and single-threaded.

    Raises:
        UnsupportedModelError: onnxruntime refuses the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # expected failures (a batched probe) stay quiet
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if model.ir_version > RUNTIME_IR_VERSION:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = RUNTIME_IR_VERSION
    try:
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {exc}") from exc


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of a model whose graph outputs are exactly ``names`` (types left to inference)."""
    copy: onnx.ModelProto = onnx.ModelProto.FromString(model.SerializeToString())
    known = {v.name: v for v in [*copy.graph.value_info, *copy.graph.output, *copy.graph.input]}
    del copy.graph.output[:]
    for name in names:
        if name in known and known[name].type.HasField("tensor_type"):
            info = onnx.ValueInfoProto.FromString(known[name].SerializeToString())
            info.type.tensor_type.ClearField("shape")
            copy.graph.output.append(info)
        else:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def submodel(
    source: ImportedModel,
    nodes: Sequence[onnx.NodeProto],
    input_name: str,
    input_shape: Sequence[int | str],
    outputs: Sequence[str],
) -> onnx.ModelProto:
    """A model of some nodes reading one tensor, their constant inputs as initializers.

    Raises:
        InvalidModelError: a node reads a tensor that is neither the input nor a constant.
    """
    constants = {t.name: t for t in source.graph.initializer}
    produced = {o for node in nodes for o in node.output} | {input_name}
    initializers = []
    for name in dict.fromkeys(n for node in nodes for n in node.input if n):
        if name in produced:
            continue
        if name not in constants:
            raise InvalidModelError(f"tensor {name!r} is neither encrypted nor constant")
        initializers.append(constants[name])
    elem_type = helper.np_dtype_to_tensor_dtype(source.input_dtype)
    graph = helper.make_graph(
        list(nodes),
        "segment",
        [helper.make_tensor_value_info(input_name, elem_type, list(input_shape))],
        [helper.make_tensor_value_info(o, elem_type, None) for o in outputs],
        initializers,
    )
    model: onnx.ModelProto = helper.make_model(
        graph, opset_imports=list(source.model.opset_import)
    )
    model.ir_version = min(source.model.ir_version or RUNTIME_IR_VERSION, RUNTIME_IR_VERSION)
    return model
