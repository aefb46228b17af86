"""Noise-flooding decryption for OpenFHE circuits: the compile step that runs the circuit.

A decrypted CKKS result carries the ciphertext's noise, which is a function of the secret
key, so a result shared at full precision with someone who holds its ciphertext (the
server) gives the key away (Li and Micciancio, EUROCRYPT 2021). OpenFHE's
NOISE_FLOODING_DECRYPT adds a Gaussian that hides that noise, sized from an estimate of it.
The estimate comes from running the circuit, weights included, in OpenFHE's
EXEC_NOISE_ESTIMATION mode, and both the client's and the server's contexts must be built
with it (it is part of the crypto parameters). So the compiler, which has the weights,
measures it once with a throwaway key and writes it into the parameters that the manifest
publishes; the server and the client then build the same flooding context from them.

What it costs: OpenFHE's 64-bit build evaluates flooding contexts at scale 2^59 on a 60-bit
first prime whatever the chain asks, which about doubles the ring degree for the usual
depths: keys, ciphertexts and latency grow with it. That first prime leaves the output one
bit of integer room. Where the output comes from a linear map and its calibrated bound is
known, the map's weights are divided by a power of two that brings the output below 1/8,
and the output layout's ``scale`` tells the client to multiply it back after decrypting:
this costs that many bits of the output's precision and saves a whole 59-bit level, the
one kept spare otherwise (``params.select_flooding_parameters``). The estimate is measured on
representative inputs, an average case: it holds for queries like the calibration data, and
Guo et al. (USENIX Security 2024) attack flooding whose estimate a crafted input exceeds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from he_inference.backends import backend_class
from he_inference.circuit import Circuit, LinearNode
from he_inference.errors import BackendUnavailableError, ConfigurationError
from he_inference.evaluate import encrypt_input, evaluate
from he_inference.params import (
    FLOODING_BASE_SECURITY,
    NoiseFlooding,
    select_flooding_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["add_noise_flooding"]

# Fewer bits than this left after flooding is worth a warning: the activation polynomials
# are fitted to errors of about 2^-7 of their range.
LOW_PRECISION_BITS = 10.0


def add_noise_flooding(
    circuit: Circuit,
    inputs: np.ndarray | None = None,
    *,
    output_bound: float | None = None,
    statistical_security: int = FLOODING_BASE_SECURITY,
    adversarial_queries: int = 1,
) -> Circuit:
    """The circuit on OpenFHE's flooding chain, with its measured noise in the parameters.

    Args:
        circuit: a circuit compiled for OpenFHE (any chain: a new one is chosen).
        inputs: representative queries of the input's shape (a stack of them); the first
            ``batch`` are packed into one query. ``None`` draws them uniformly from the
            circuit's input range.
        output_bound: the largest output magnitude expected (the calibrated one); with it,
            an output from a linear map is scaled down instead of kept on a spare level.
        statistical_security: bits of statistical security of the flooding (at least 30).
        adversarial_queries: decryptions of related ciphertexts an attacker may collect;
            the flooding noise grows with its square root.

    Raises:
        BackendUnavailableError: openfhe is not installed here.
        ConfigurationError: the circuit is for another backend, or its noise is too large to
            flood at the asked security.
        InsecureParametersError: no ring degree fits the flooding chain.
    """
    compiled_for = circuit.metadata.get("backend")
    if compiled_for not in (None, "openfhe"):
        raise ConfigurationError(
            f"noise-flooding decryption is OpenFHE's and circuit {circuit.name!r} is for "
            f"{compiled_for}: compile it with --backend openfhe"
        )
    try:
        backend_class("openfhe")
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(
            f"{exc}; or compile without noise flooding (--no-noise-flooding)"
        ) from exc
    from he_inference.backends.openfhe import OpenFheBackend

    layout = circuit.input_layout
    scaled = _scaled_output(circuit, output_bound)
    shift = 0
    if scaled is not None:
        circuit, shift = scaled
    # The levels the circuit's chain was sized for (its nodes' levels need not be recorded).
    params = select_flooding_parameters(
        circuit.params.depth,
        2 * layout.period * layout.batch,
        security_level=circuit.params.security_level,
        spare_level=scaled is None,
    )
    measuring = replace(circuit, params=params)
    queries = _queries(circuit, inputs)

    # A throwaway key in an EXEC_NOISE_ESTIMATION context: its ciphertexts load nowhere else,
    # and its keys stay in OpenFHE's process-global maps of the compiling process.
    backend = OpenFheBackend(params, noise_estimation=True)
    backend.generate_keys(circuit.rotation_steps)
    outputs, _ = evaluate(measuring, backend, encrypt_input(measuring, backend, queries))
    measured = max(backend.noise_bits(ct) for ct in outputs)
    # Rounded up, so the manifest's decimal form is exact and never below the measurement.
    flooding = NoiseFlooding(
        math.ceil(measured * 100) / 100, statistical_security, adversarial_queries
    )
    flooded = replace(params, noise_flooding=flooding)

    # Per output element, after the client multiplies by the output layout's scale.
    slot_noise = flooding.slot_noise(flooded.poly_modulus_degree) * 2.0**shift
    precision = -math.log2(slot_noise)
    metadata = dict(circuit.metadata)
    metadata["noise_flooding"] = {
        "slot_noise": slot_noise,
        "precision_bits": round(precision, 2),
        "output_shift_bits": shift,
        "estimated_on_queries": int(queries.shape[0]),
        "key_switching": backend.key_switching,
        "without_flooding": {
            "poly_modulus_degree": circuit.params.poly_modulus_degree,
            "coeff_modulus_bits": list(circuit.params.coeff_modulus_bits),
        },
    }
    logger.info(
        "noise flooding: circuit noise 2^%.2f, flooding 2^%.2f, about %.1f bits of precision "
        "per slot; N=%d -> %d, chain %d -> %d bits",
        measured,
        flooding.flooding_bits,
        precision,
        circuit.params.poly_modulus_degree,
        flooded.poly_modulus_degree,
        circuit.params.total_bits,
        flooded.total_bits,
    )
    if precision < LOW_PRECISION_BITS:
        logger.warning(
            "noise flooding leaves about %.1f bits of precision per slot (noise %.2g): lower "
            "the statistical security or adversarial queries, or compile without flooding",
            precision,
            slot_noise,
        )
    return replace(circuit, params=flooded, metadata=metadata)


def _queries(circuit: Circuit, inputs: np.ndarray | None) -> np.ndarray:
    """``batch`` queries of the input's shape, from ``inputs`` or the input range."""
    layout = circuit.input_layout
    if inputs is None:
        low, high = circuit.input_range or (-1.0, 1.0)
        rng = np.random.default_rng(0)
        return rng.uniform(low, high, size=(layout.batch, *layout.shape))
    x = np.asarray(inputs, dtype=np.float64)
    if x.size == 0 or x.size % layout.size:
        raise ConfigurationError(
            f"inputs of shape {x.shape} are no stack of the input shape {layout.shape}"
        )
    x = x.reshape(-1, *layout.shape)
    return (
        np.resize(x, (layout.batch, *layout.shape))
        if x.shape[0] < layout.batch
        else x[: layout.batch]
    )


def _scaled_output(circuit: Circuit, output_bound: float | None) -> tuple[Circuit, int] | None:
    """The circuit with its output map divided by ``2^shift`` so that ``|y| < 1/8``.

    None where that is not possible: no bound is known, or the output is not a linear map.
    """
    last = next((n for n in circuit.nodes if n.name == circuit.output_name), None)
    if output_bound is None or not isinstance(last, LinearNode):
        return None
    shift = max(0, math.ceil(math.log2(8.0 * max(output_bound, 2.0**-20))))
    factor = 2.0**-shift
    scaled = replace(
        last,
        blocks=[replace(b, diagonals=b.diagonals * factor) for b in last.blocks],
        bias=None if last.bias is None else last.bias * factor,
    )
    nodes = [scaled if n is last else n for n in circuit.nodes]
    layout = replace(circuit.output_layout, scale=circuit.output_layout.scale * 2.0**shift)
    logger.info(
        "noise flooding: output map %s scaled by 2^-%d (bound %.3g) to fit the first prime",
        last.name,
        shift,
        output_bound,
    )
    return replace(circuit, nodes=nodes, output_layout=layout), shift
