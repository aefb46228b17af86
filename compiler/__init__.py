"""ONNX in, CKKS circuit out: :func:`compile_model` is the one entry point.

The pipeline reads top to bottom in :func:`compile_model`, one named step per line; each
pass is its own module under ``compiler/passes/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from compiler.calibrate import calibrate_ranges
from compiler.flooding import add_noise_flooding
from compiler.lower import lower, plan
from compiler.onnx_import import import_model
from compiler.passes.collect_unsupported import collect_unsupported
from compiler.passes.expand_prelu import expand_prelu
from compiler.passes.extract_postprocess import extract_postprocess
from compiler.passes.fold_constants import fold_constants
from compiler.passes.fuse_activation_patterns import fuse_activation_patterns
from compiler.passes.remove_identity import remove_identity
from compiler.passes.rewrite_encrypted_joins import rewrite_encrypted_joins
from compiler.passes.rewrite_linear_classifier import rewrite_linear_classifier
from compiler.verify import verify_circuit, verify_model
from he_inference.circuit import Circuit
from he_inference.errors import ConfigurationError

logger = logging.getLogger(__name__)

__all__ = ["compile_model"]


def compile_model(
    model: str | Path | bytes | onnx.ModelProto,
    calibration: np.ndarray | None = None,
    *,
    input_range: tuple[float, float] | None = None,
    degree: int | None = None,
    error_budget: float = 0.01,
    max_degree: int = 31,
    security_level: int = 128,
    scale_bits: int | None = None,
    batch: int = 1,
    name: str | None = None,
    margin: float = 0.1,
    backend: str = "seal",
    noise_flooding: bool = True,
    flooding_security: int = 30,
    flooding_queries: int = 1,
) -> Circuit:
    """Compile an ONNX model into a CKKS circuit.

    Args:
        model: a path, the model's bytes, or a loaded ``ModelProto``.
        calibration: representative inputs, one of the input's shape or a stack of them;
            the activation ranges are measured on them.
        input_range: ``(min, max)`` of the inputs, used without calibration data.
        degree: a fixed polynomial degree for every activation; ``None`` takes the lowest
            degree that meets ``error_budget``.
        error_budget: the largest error of each polynomial, relative to the activation's
            largest magnitude on its interval.
        max_degree: the highest degree the automatic fit may use.
        security_level: 128, 192 or 256 bits.
        scale_bits: log2 of the CKKS scale; ``None`` picks the largest that fits.
        batch: queries packed side by side in one ciphertext (throughput mode).
        name: the circuit's name; the file name or the graph name by default.
        margin: each calibrated range is widened by this fraction of its width per side.
        backend: the backend the circuit will run on; its key switching shapes the chain
            (OpenFHE reserves a 60-bit key-switching prime, so it may need a larger ring).
        noise_flooding: on OpenFHE, decrypt with noise flooding (see compiler/flooding.py):
            the circuit runs once here to measure its noise, and its chain moves to scale
            2^59, which about doubles the ring degree. Ignored on other backends.
        flooding_security: statistical security of the flooding, in bits (at least 30).
        flooding_queries: decryptions of related ciphertexts an attacker may collect.

    Raises:
        InvalidModelError: the model is not valid ONNX or has the wrong inputs or outputs.
        UnsupportedModelError: it uses operators or patterns that cannot be lowered (all
            of them are listed in one message).
        ConfigurationError: an option is out of range, or no polynomial meets the budget.
        InsecureParametersError: no ring degree fits the circuit at the security level.
        BackendUnavailableError: flooding on OpenFHE is asked for and openfhe is missing.
    """
    if batch < 1:
        raise ConfigurationError(f"batch {batch} (--batch): pass at least 1 query per ciphertext")
    if not 0 < error_budget < 1:
        raise ConfigurationError(
            f"error_budget {error_budget:g} (--error-budget): pass a fraction above 0 and "
            f"below 1, such as 0.01"
        )
    if degree is not None and degree < 1:
        raise ConfigurationError(f"degree {degree} (--degree): pass a degree of at least 1")
    imported = import_model(model)
    verify_model(imported)

    # Shape chains and weight arithmetic become initializers: every tensor left is constant
    # or encrypted, which is what classifying nodes as linear or not relies on.
    fold_constants(imported)
    # Identity and Dropout do nothing at inference and would split affine segments.
    remove_identity(imported)
    # skl2onnx classifiers: only the scores are encrypted work; labels and probabilities
    # are recomputed on the client.
    rewrite_linear_classifier(imported)
    # Softmax/ArgMax at the end run on the client after decryption, exactly and for free.
    extract_postprocess(imported)
    # A per-channel PRelu slope cannot be one polynomial's: a Relu between linear maps can.
    expand_prelu(imported)
    # SiLU, GELU (Erf or Tanh form) and Mish written as arithmetic become one polynomial
    # each instead of two plus products.
    fuse_activation_patterns(imported)
    # Sub, Concat, Sum, Mean and broadcasts over several roots become Adds of linear maps.
    rewrite_encrypted_joins(imported)
    # Every unsupported node is reported in one error before any key or range work.
    collect_unsupported(imported)
    # Roots and segments decide which tensors become circuit values and need ranges.
    the_plan = plan(imported)
    # Polynomials are fitted on the ranges the original model's activations take.
    # The output's range too, where data is given: it sizes the first prime (see lower).
    output = imported.output_names[0]
    wanted = the_plan.range_tensors()
    original = {o for n in imported.original.graph.node for o in n.output}
    if (calibration is not None or input_range is not None) and output in original:
        wanted = [*wanted, output]
    ranges, observed = calibrate_ranges(imported, wanted, calibration, input_range, margin)
    output_range = ranges.get(output)
    if output not in the_plan.range_tensors():
        ranges.pop(output, None)
    # Segments become measured affine maps, activations polynomials, then levels and params.
    circuit = lower(
        imported,
        the_plan,
        ranges,
        name=name or _default_name(model, imported),
        degree=degree,
        error_budget=error_budget,
        max_degree=max_degree,
        security_level=security_level,
        scale_bits=scale_bits,
        batch=batch,
        input_range=observed,
        output_bound=max(abs(output_range[0]), abs(output_range[1])) if output_range else None,
        backend=backend,
    )

    verify_circuit(circuit)
    # OpenFHE decrypts with noise flooding, sized from the circuit's own output noise: that
    # is measured here, where the weights are, and published in the parameters.
    if backend == "openfhe" and noise_flooding:
        circuit = add_noise_flooding(
            circuit,
            calibration,
            output_bound=max(abs(output_range[0]), abs(output_range[1])) if output_range else None,
            statistical_security=flooding_security,
            adversarial_queries=flooding_queries,
        )
    elif backend == "openfhe":
        circuit.metadata["noise_flooding"] = "off"
    return circuit


def _default_name(model: object, imported: object) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).stem
    graph_name = getattr(getattr(imported, "graph", None), "name", "")
    return str(graph_name or "model")
