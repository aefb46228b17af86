"""Activation input ranges from calibration data, measured by onnxruntime.

Each polynomial is fitted on the interval its activation's inputs actually take, so the
ranges are measured on the original model (batch fixed, opset upgraded, nothing fused),
with every activation input added as an extra graph output: one run per calibration
sample returns all of them. Each range is widened by a margin (10% of its width on each
side by default), because inputs outside the interval make a polynomial diverge fast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from compiler.graph import ImportedModel, session, with_outputs
from he_inference.errors import ConfigurationError, InputError

logger = logging.getLogger(__name__)

#: Uniform samples drawn from a declared input range when no calibration data is given.
RANGE_SAMPLES = 64


def calibration_samples(imported: ImportedModel, calibration: np.ndarray) -> np.ndarray:
    """Calibration data as ``[n, *input_shape]`` (one sample, or many along a new axis).

    Raises:
        InputError: the data fits neither the input shape nor a stack of inputs.
    """
    data = np.asarray(calibration, dtype=imported.input_dtype)
    shape = imported.input_shape
    if data.shape == shape:
        return data[None]
    if data.shape[1:] == shape:
        return data
    if shape and shape[0] == 1 and data.shape[1:] == shape[1:]:
        return data[:, None]
    raise InputError(
        f"calibration data of shape {data.shape} does not match the model input {shape}: "
        f"pass one input of that shape or a stack [n, *shape]"
    )


def calibrate_ranges(
    imported: ImportedModel,
    tensors: Sequence[str],
    calibration: np.ndarray | None,
    input_range: tuple[float, float] | None,
    margin: float = 0.1,
) -> tuple[dict[str, tuple[float, float]], tuple[float, float] | None]:
    """Widened ``(lower, upper)`` of each named tensor, and the input's own range.

    Raises:
        ConfigurationError: activations need ranges and neither calibration data nor an
            input range was given.
        InputError: the calibration data has the wrong shape or is not finite.
    """
    if calibration is not None:
        samples = calibration_samples(imported, calibration)
        if not np.all(np.isfinite(samples)):
            raise InputError("calibration data holds NaN or infinite values")
        observed = (float(samples.min()), float(samples.max()))
    elif input_range is not None:
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ConfigurationError(f"input range [{lo}, {hi}] is empty")
        if tensors:
            logger.warning(
                "no calibration data: activation ranges come from %d uniform "
                "samples of the declared input range [%g, %g]; real inputs may "
                "fall outside them",
                RANGE_SAMPLES,
                lo,
                hi,
            )
        rng = np.random.default_rng(0)
        samples = rng.uniform(lo, hi, (RANGE_SAMPLES, *imported.input_shape)).astype(
            imported.input_dtype
        )
        observed = (lo, hi)
    elif tensors:
        raise ConfigurationError(
            f"the model has {len(tensors)} activation(s) whose polynomial needs an input "
            f"range: pass calibration inputs (a few hundred representative samples) or "
            f"input_range=(min, max)"
        )
    else:
        return {}, None
    if not tensors:
        return {}, observed

    names = list(dict.fromkeys(tensors))
    run = session(with_outputs(imported.original, names))
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    for sample in samples:
        feed = {imported.input_name: np.asarray(sample, dtype=imported.input_dtype)}
        for name, value in zip(names, run.run(names, feed), strict=True):
            low[name] = min(low[name], float(np.min(value)))
            high[name] = max(high[name], float(np.max(value)))
    ranges = {name: widen(low[name], high[name], margin) for name in names}
    logger.info(
        "calibrated %d activation ranges on %d samples (margin %.0f%%)",
        len(names),
        len(samples),
        100 * margin,
    )
    for name, (lo, hi) in ranges.items():
        logger.debug("range of %s: [%.4g, %.4g]", name, lo, hi)
    return ranges, observed


def widen(lower: float, upper: float, margin: float) -> tuple[float, float]:
    """``[lower, upper]`` widened by ``margin`` of its width on each side (never empty)."""
    width = upper - lower
    if width <= 0:
        width = max(abs(lower), 1e-3)
    return lower - margin * width, upper + margin * width
