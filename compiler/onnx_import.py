"""Load an ONNX model, check it, and bring it to the one form the passes expect.

That form is: one floating-point data input with a static shape (the dynamic batch dimension
fixed to 1, one query), weights as initializers and not as graph inputs (IR < 4 exporters
listed them among the inputs), a default-domain opset of at least ``TARGET_OPSET`` (older
models are upgraded with ``onnx.version_converter`` and the upgrade is checked against
onnxruntime on a random input, because the converter has silently changed semantics of some
adapters before), and a static shape for every tensor.

Shapes come from ``onnx.shape_inference`` and, to cover what it cannot infer (a Reshape fed
by a Shape/Gather/Concat chain), from one onnxruntime run on a zero input that returns every
intermediate tensor: with a static input, every shape in an inference graph without
data-dependent operators is fixed, and those operators are refused later anyway.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from compiler.graph import ImportedModel, runtime_max_opset, session, with_outputs
from he_inference.errors import InvalidModelError, UnsupportedModelError

logger = logging.getLogger(__name__)

#: Older models are upgraded to this opset; the passes and lowering are written against it.
TARGET_OPSET = 17

ModelSource = str | Path | bytes | onnx.ModelProto

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}


def import_model(source: ModelSource, *, target_opset: int = TARGET_OPSET) -> ImportedModel:
    """Load, check and normalise a model for compilation.

    Args:
        source: a path, the model's bytes, or a loaded ``ModelProto``.
        target_opset: models with an older default-domain opset are upgraded to this one.

    Raises:
        InvalidModelError: the bytes are not ONNX, the model fails the checker, it has no or
            several data inputs, a non-float input, a dynamic dimension other than the
            batch, or an output that does not depend on the input.
        UnsupportedModelError: the opset upgrade fails or changes the model's results.
    """
    model, raw = _load(source)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InvalidModelError(f"the model fails the ONNX checker: {exc}") from exc

    _drop_initializer_inputs(model)
    input_name, dims, dtype = _data_input(model)
    shape = _fix_input_shape(model, dims)
    _check_reachable(model, input_name)
    model = _upgrade_opset(model, input_name, shape, dtype, target_opset)
    model = _infer_shapes(model)
    shapes = _static_shapes(model, input_name, shape, dtype)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    producer = f"{model.producer_name} {model.producer_version}".strip()
    logger.info(
        "imported model: input %s %s %s, opset %d, %d nodes, producer %r",
        input_name,
        shape,
        np.dtype(dtype).name,
        opset,
        len(model.graph.node),
        producer,
    )
    return ImportedModel(
        model=model,
        original=onnx.ModelProto.FromString(model.SerializeToString()),
        input_name=input_name,
        input_shape=shape,
        input_dtype=np.dtype(dtype),
        shapes=shapes,
        sha256=hashlib.sha256(raw).hexdigest(),
        opset=opset,
        producer=producer,
    )


def _load(source: ModelSource) -> tuple[onnx.ModelProto, bytes]:
    if isinstance(source, onnx.ModelProto):
        raw = source.SerializeToString()
        return onnx.ModelProto.FromString(raw), raw  # the caller's model stays untouched
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
        where = "the given bytes"
    else:
        where = str(source)
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidModelError(f"cannot read model file {where}: {exc.strerror}") from exc
    try:
        model = onnx.ModelProto.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidModelError(
            f"{where} is not an ONNX model ({exc}): export it with torch.onnx.export, "
            f"tf2onnx or skl2onnx"
        ) from exc
    if not model.HasField("graph") or not model.graph.node or not model.graph.output:
        raise InvalidModelError(
            f"{where} holds no ONNX graph with nodes and outputs: the file is truncated or "
            f"not an ONNX model"
        )
    if not isinstance(source, (bytes, bytearray, memoryview)):
        try:
            onnx.load_external_data_for_model(model, str(Path(source).parent))
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"cannot load external data of {where}: {exc}") from exc
    return model, raw


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 listed weights among the graph inputs; they are weights, not data."""
    weights = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in weights]
    if len(data) != len(model.graph.input):
        logger.info(
            "%d initializers listed as graph inputs are treated as weights",
            len(model.graph.input) - len(data),
        )
        del model.graph.input[:]
        model.graph.input.extend(data)
    # IR 4 is the first to allow initializers that are not inputs (the converter needs it).
    model.ir_version = max(model.ir_version, 4)


def _data_input(model: onnx.ModelProto) -> tuple[str, tuple[Any, ...], type]:
    inputs = list(model.graph.input)
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise InvalidModelError(
            f"the model has {len(inputs)} data inputs ({names}) and encrypted inference takes "
            f"exactly one: store the other inputs as initializers"
        )
    value = inputs[0]
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor.elem_type not in _FLOAT_TYPES:
        kind = (
            onnx.TensorProto.DataType.Name(tensor.elem_type)
            if value.type.HasField("tensor_type")
            else "a non-tensor type"
        )
        raise InvalidModelError(
            f"input {value.name!r} has element type {kind}: CKKS encrypts real numbers, so the "
            f"input must be float or double (feed integer or token inputs through an "
            f"embedding outside the model)"
        )
    if not tensor.HasField("shape"):
        raise InvalidModelError(f"input {value.name!r} has no shape: export it with a fixed one")
    dims: list[Any] = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in tensor.shape.dim
    ]
    return value.name, tuple(dims), _FLOAT_TYPES[tensor.elem_type]


def _fix_input_shape(model: onnx.ModelProto, dims: tuple[Any, ...]) -> tuple[int, ...]:
    """Fix a dynamic batch dimension to 1 (one query) and refuse any other dynamic one."""
    fixed = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int):
            fixed.append(dim)
        elif axis == 0:
            logger.info("dynamic batch dimension %r fixed to 1 (one query per evaluation)", dim)
            fixed.append(1)
        else:
            raise InvalidModelError(
                f"input dimension {axis} is dynamic ({dim!r}): only the batch dimension may be; "
                f"export the model with a fixed input shape"
            )
    shape = model.graph.input[0].type.tensor_type.shape
    for dim, value in zip(shape.dim, fixed, strict=True):
        dim.Clear()
        dim.dim_value = value
    # Outputs may name the dynamic batch symbolically; inference fills the dims in again.
    for output in model.graph.output:
        if output.type.HasField("tensor_type"):
            for dim in output.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.Clear()
    del model.graph.value_info[:]
    return tuple(fixed)


def _check_reachable(model: onnx.ModelProto, input_name: str) -> None:
    reached = {input_name}
    for node in model.graph.node:
        if any(name in reached for name in node.input):
            reached.update(node.output)
    unreachable = [o.name for o in model.graph.output if o.name not in reached]
    if unreachable:
        raise InvalidModelError(
            f"output(s) {', '.join(map(repr, unreachable))} do not depend on the input "
            f"{input_name!r} (or the nodes are not in topological order): a constant output "
            f"needs no encryption; remove it from the graph"
        )


def _upgrade_opset(
    model: onnx.ModelProto, input_name: str, shape: tuple[int, ...], dtype: type, target: int
) -> onnx.ModelProto:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    newest = runtime_max_opset()
    if version > newest:
        return _downgrade_opset(model, version, newest)
    if version >= target:
        return model
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, target)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises RuntimeError and its own C++ errors
        raise UnsupportedModelError(
            f"upgrading the model from opset {version} to {target} failed ({exc}): export "
            f"it again with opset {target} or later"
        ) from exc
    x: np.ndarray = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    try:
        before = session(model).run(None, {input_name: x})
    except UnsupportedModelError as exc:
        logger.warning(
            "opset %d model cannot run in onnxruntime (%s); the upgrade to %d is not verified",
            version,
            exc,
            target,
        )
        return upgraded
    after = session(upgraded).run(None, {input_name: x})
    for a, b in zip(before, after, strict=True):
        if np.shape(a) != np.shape(b) or not np.allclose(
            a, b, rtol=1e-4, atol=1e-5, equal_nan=True
        ):
            raise UnsupportedModelError(
                f"upgrading the model from opset {version} to {target} changes its results: "
                f"export it again with opset {target} or later"
            )
    logger.info("upgraded opset %d -> %d and verified it against onnxruntime", version, target)
    return upgraded


def _downgrade_opset(model: onnx.ModelProto, version: int, newest: int) -> onnx.ModelProto:
    """Opsets newer than onnxruntime runs are converted down; its runs measure the maps."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, newest)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError and its own C++ errors
        raise UnsupportedModelError(
            f"the model has opset {version} and the installed onnxruntime runs up to {newest}, "
            f"and converting it down failed ({exc}): export it with opset {newest} or lower"
        ) from exc
    logger.info("converted opset %d down to %d, the newest onnxruntime runs", version, newest)
    return converted


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise InvalidModelError(f"ONNX shape inference fails on the model: {exc}") from exc


def _static_shapes(
    model: onnx.ModelProto, input_name: str, shape: tuple[int, ...], dtype: type
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            if all(d >= 0 for d in dims):
                shapes[value.name] = tuple(dims)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)

    # One run returns every tensor's actual shape where inference left some open.
    tensor_outputs = [
        o
        for node in model.graph.node
        for o in node.output
        if o and node.op_type not in ("ZipMap",) and o not in shapes
    ]
    shapes[input_name] = shape
    if tensor_outputs:
        probe = with_outputs(model, tensor_outputs)
        try:
            values = session(probe).run(None, {input_name: np.zeros(shape, dtype)})
        except Exception as exc:  # the model itself fails later with a precise message
            logger.debug("reference run for shapes failed: %s", exc)
        else:
            for name, value in zip(tensor_outputs, values, strict=True):
                if isinstance(value, np.ndarray):
                    shapes[name] = tuple(value.shape)
    return shapes
