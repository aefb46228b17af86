"""Checks on a query before it is encrypted, and the post-processing after decryption.

The checks run on the client because the server cannot: it sees only ciphertexts. A value
outside the calibrated input range is the quiet failure mode of CKKS inference, since the
activation polynomials were fitted only on the ranges that the calibration data reached and
diverge quickly beyond them, so it is an error unless the caller asks for a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from he_inference.circuit import Layout
from he_inference.errors import InputError

logger = logging.getLogger(__name__)

OUTPUTS = ("logits", "probabilities", "labels")
#: The output the ONNX model itself ended in, read from the manifest's post-processing.
AUTO = "auto"


def check_queries(
    x: Any,
    layout: Layout,
    input_range: tuple[float, float] | None,
    *,
    allow_out_of_range: bool = False,
) -> tuple[np.ndarray, str]:
    """Validate one query ``[*shape]`` or a batch ``[n, *shape]`` against the manifest.

    A model whose query shape starts with the ONNX batch dimension 1, such as
    ``(1, 1, 8, 8)``, also takes ``n`` queries in ONNX's own batched form ``(n, 1, 8, 8)``.

    Returns:
        The queries as float64 ``[n, *shape]``, and the form they came in: ``single``,
        ``stacked`` (``[n, *shape]``) or ``onnx`` (``[n, *shape[1:]]``).

    Raises:
        InputError: the input is not numeric, has the wrong shape, holds no queries, holds
            NaN or infinity, or leaves the input range (unless ``allow_out_of_range``, which
            logs a warning instead).
    """
    array = np.asarray(x)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise InputError(
            f"the input has dtype {array.dtype}: pass real numbers (an integer or float array)"
        )
    shape = layout.shape
    if array.shape == shape:
        form, batch = "single", array.reshape(1, *shape)
    elif array.ndim == len(shape) + 1 and array.shape[1:] == shape:
        form, batch = "stacked", array
    elif shape and shape[0] == 1 and array.ndim == len(shape) and array.shape[1:] == shape[1:]:
        form, batch = "onnx", array.reshape(array.shape[0], *shape)
    else:
        forms = [f"(n, {', '.join(map(str, shape))})"]
        if shape and shape[0] == 1:
            forms.append(f"(n, {', '.join(map(str, shape[1:]))})")
        raise InputError(
            f"the input has shape {array.shape}: the model takes one query of shape {shape} "
            f"or a batch of shape {' or '.join(forms)}"
        )
    if not len(batch):
        raise InputError(
            f"the input has shape {array.shape}, which holds no queries: pass at least one"
        )
    batch = batch.astype(np.float64)

    finite = np.isfinite(batch)
    if not finite.all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        count = int((~finite).sum())
        others = f" ({count} values in all are not)" if count > 1 else ""
        raise InputError(
            f"{_where(index, batch[index], shape, len(batch))}: values must be finite{others}"
        )

    if input_range is not None:
        lower, upper = input_range
        outside = (batch < lower) | (batch > upper)
        if outside.any():
            index = tuple(int(i) for i in np.argwhere(outside)[0])
            count = int(outside.sum())
            found = (
                f"{_where(index, batch[index], shape, len(batch))}, outside the model's "
                f"calibrated input range [{lower:g}, {upper:g}]"
                + (f" ({count} values in all are)" if count > 1 else "")
            )
            if not allow_out_of_range:
                raise InputError(
                    f"{found}: the circuit's polynomials and its modulus are sized for that "
                    f"range; scale the input as in training, or allow it explicitly "
                    f"(allow_out_of_range=True, or --allow-out-of-range on the command line)"
                )
            logger.warning(
                "%s: allowed, but the results may be inaccurate, since the circuit's "
                "polynomials and its modulus are sized for that range",
                found,
            )
    return batch, form


def _where(index: tuple[int, ...], value: float, shape: tuple[int, ...], count: int) -> str:
    """A value and where it sits, as the user indexes it: the query, then its element."""
    query, element = index[0], index[1:]
    flat = int(np.ravel_multi_index(element, shape)) if shape else 0
    who = f"query {query} (of {count})" if count > 1 else "the query"
    return f"{who} holds {value:.6g} at element {element} of shape {shape} (flat index {flat})"


def default_output(steps: list[dict[str, Any]]) -> str:
    """The output the ONNX model ended in: ``labels`` after ArgMax (or a classifier's
    labels), ``probabilities`` after Softmax or a logistic, else ``logits``."""
    ops = {step.get("op") for step in steps}
    if ops & {"argmax", "zipmap"}:
        return "labels"
    if ops & {"softmax", "logsoftmax", "sigmoid"}:
        return "probabilities"
    return "logits"


def check_output(output: str) -> None:
    """Refuse an output kind that :func:`postprocess` does not make.

    Raises:
        InputError: ``output`` is not one of ``auto``, ``logits``, ``probabilities``,
            ``labels``.
    """
    if output not in (AUTO, *OUTPUTS):
        raise InputError(f"output={output!r}: choose one of {', '.join((AUTO, *OUTPUTS))}")


def postprocess(
    outputs: np.ndarray,
    out_shape: tuple[int, ...],
    form: str,
    steps: list[dict[str, Any]],
    output: str,
) -> np.ndarray:
    """Logits, softmax probabilities or argmax labels, shaped like the queries came in.

    ``outputs`` is ``[n, *out_shape]``. ``steps`` is the manifest's ``postprocess`` list (the
    ops the compiler removed from the end of the model because they are cheap in the clear
    and costly under encryption); its axis, counted on the ONNX output with its batch
    dimension, is used for softmax and argmax alike, the last axis when it names none.
    ``auto`` makes what the model itself ended in (:func:`default_output`).

    Raises:
        InputError: ``output`` is not one of ``auto``, ``logits``, ``probabilities``,
            ``labels``.
    """
    check_output(output)
    if output == AUTO:
        output = default_output(steps)
    n = outputs.shape[0]
    onnx_batched = bool(out_shape) and out_shape[0] == 1
    # In ONNX's batched form [n, *out_shape[1:]] the manifest's axis means what it says.
    result = outputs.reshape(n, *out_shape[1:]) if onnx_batched else outputs
    if output != "logits":
        axis = _axis(steps)
        if onnx_batched:
            result = _apply(result, axis, output, steps)
        else:
            result = np.stack([_apply(row, axis, output, steps) for row in result])
    if not onnx_batched:
        return result[0] if form == "single" else result
    if form == "stacked":
        return result.reshape(n, 1, *result.shape[1:])
    return result


def _axis(steps: list[dict[str, Any]]) -> int:
    for step in steps:
        if step.get("op") in ("softmax", "argmax") and "axis" in step:
            return int(step["axis"])
    return -1


def _apply(values: np.ndarray, axis: int, output: str, steps: list[dict[str, Any]]) -> np.ndarray:
    ops = {step.get("op"): step for step in steps}
    if output == "labels":
        labels: np.ndarray = np.argmax(values, axis=axis)
        names = ops.get("argmax", {}).get("labels")
        # A classifier's own class labels (skl2onnx), in place of the score's index.
        named: np.ndarray = np.asarray(names)[labels] if names else labels
        return named
    if "sigmoid" in ops:
        # One-vs-rest logistic scores, then (skl2onnx's Normalizer) scaled to sum to one.
        logistic: np.ndarray = 1.0 / (1.0 + np.exp(-values))
        if "normalize_l1" in ops:
            logistic = logistic / np.sum(logistic, axis=axis, keepdims=True)
        return logistic
    shifted = values - np.max(values, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / np.sum(exp, axis=axis, keepdims=True)
    return probabilities
