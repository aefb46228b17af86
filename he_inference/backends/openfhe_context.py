"""OpenFHE crypto contexts from CKKS parameters: key switching, security, decryption mode.

The parameters say a ring degree, a modulus chain and a security level; OpenFHE takes a
multiplicative depth and prime sizes instead, adds key-switching primes of its own and checks
the result against its security tables. Finding a setting that it accepts for the same ring
degree is a search, kept here apart from the backend's operations
(:mod:`he_inference.backends.openfhe`, which also says why scaling is FIXEDMANUAL).

The modulus chain OpenFHE builds is ``[first, scale x depth]`` for Q plus key-switching
primes P that OpenFHE sizes itself (60-bit primes, enough to cover the largest key-switching
digit with a margin of about four bits). That P is not the chain's single special prime, so
:func:`build_context` tries, in order, until OpenFHE's own ``HEStd_*_classic`` check
accepts the same ring degree:

1. HYBRID key switching with the fewest digits (smallest keys, fastest switching);
2. HYBRID with one digit per prime and the first prime shortened to 56 bits or less, so one
   60-bit P prime suffices: Q*P is then no longer than the chain in ``params`` (the result
   keeps ``first - scale_bits`` integer bits instead of the chain's);
3. BV key switching with 10-bit digits (no P at all): keys about 3x larger and rotations
   about 2^-15 noisier than HYBRID's; logged at WARNING.

Measured chains (bits, Q then P): N=8192 ``(60,40,40,60)`` -> ``(55,40,41 | 60)`` = 195 by
step 2; N=16384 ``(60,40x6,60)`` -> ``(60,40,41,40,41,40,41 | 60,60)`` = 420 with 4 digits
by step 1; N=16384 ``(60,40x7,60)`` -> ``(55,41,40,41,40,41,40,41 | 60)`` = 395 by step 2.

Parameters with ``noise_flooding`` make a NOISE_FLOODING_DECRYPT context in EXEC_EVALUATION
mode: decryption adds a discrete Gaussian of standard deviation ``sqrt(12) * 2^15 * 2^e``
(OpenFHE 1.6's fixed statistical security 30 and one query) for the published noise estimate
``e``, which hides the ciphertext's own, key-dependent noise. The mode and the estimate are
part of the crypto parameters, so the client's and the server's contexts are both built from
the manifest's parameters or a result does not load. ``estimation=True`` (the backend's
``noise_estimation``) makes the EXEC_NOISE_ESTIMATION context in which the compiler measures
``e`` (``OpenFheBackend.noise_bits``). Under flooding OpenFHE's 64-bit build fixes the scale
at 2^59 and the first prime at 60 bits, which the parameters must already say
(``params.select_flooding_parameters``).
"""

from __future__ import annotations

import logging
from typing import Any

import openfhe

from he_inference.errors import ConfigurationError, InsecureParametersError
from he_inference.params import (
    FLOODING_FIRST_PRIME_BITS,
    FLOODING_SCALE_BITS,
    CkksParameters,
)

logger = logging.getLogger(__name__)

_SECURITY = {
    128: openfhe.HEStd_128_classic,
    192: openfhe.HEStd_192_classic,
    256: openfhe.HEStd_256_classic,
}
# One 60-bit P prime covers a digit of up to 55 or 56 bits, by ring degree (OpenFHE 1.6).
_HYBRID_MAX_DIGIT_BITS = 56
_BV_DIGIT_BITS = 10


def _decryption_mode(ccp: Any, params: CkksParameters, estimation: bool) -> str:
    """Set the decryption noise and execution modes on ``ccp``; return a description.

    Raises:
        ConfigurationError: a flooding mode is asked for off OpenFHE's flooding chain.
    """
    flooding = params.noise_flooding
    if flooding is None and not estimation:
        return "plain decryption"
    if (params.scale_bits, params.first_prime_bits) != (
        FLOODING_SCALE_BITS,
        FLOODING_FIRST_PRIME_BITS,
    ):
        # OpenFHE would evaluate at 2^59 anyway, and an estimate measured at another scale
        # would not be the flooding context's noise.
        raise ConfigurationError(
            f"noise flooding needs scale 2^{FLOODING_SCALE_BITS} and a "
            f"{FLOODING_FIRST_PRIME_BITS}-bit first prime, not 2^{params.scale_bits} and "
            f"{params.first_prime_bits} bits: choose params.select_flooding_parameters"
        )
    ccp.SetDecryptionNoiseMode(openfhe.NOISE_FLOODING_DECRYPT)
    if estimation or flooding is None:  # the second only when estimating (returned above)
        ccp.SetExecutionMode(openfhe.EXEC_NOISE_ESTIMATION)
        return "noise estimation"
    ccp.SetExecutionMode(openfhe.EXEC_EVALUATION)
    ccp.SetNoiseEstimate(flooding.estimate_bits)
    return f"noise-flooding decryption (2^{flooding.flooding_bits:.1f})"


def _key_switching_candidates(
    params: CkksParameters, estimation: bool
) -> list[tuple[str, Any, int, int]]:
    """The key-switching settings to try, in order: (description, technique, digits, first bits).

    The order is the module docstring's: HYBRID by digit count, HYBRID with a shortened first
    prime, then BV.
    """
    primes = params.depth + 1
    first = params.first_prime_bits
    candidates: list[tuple[str, Any, int, int]] = [
        (f"HYBRID with {dnum} digits", openfhe.HYBRID, dnum, first)
        for dnum in range(1, primes + 1)
    ]
    # Keep at least ten integer bits above the scale when shortening the first prime. Under
    # flooding OpenFHE fixes the first prime at 60 bits, so shortening it is no way out.
    if params.noise_flooding is None and not estimation:
        candidates += [
            (f"HYBRID with {primes} digits, first prime {bits} bits", openfhe.HYBRID, primes, bits)
            for bits in range(min(first - 1, _HYBRID_MAX_DIGIT_BITS), params.scale_bits + 9, -1)
        ]
    candidates.append((f"BV with {_BV_DIGIT_BITS}-bit digits", openfhe.BV, 0, first))
    return candidates


def build_context(params: CkksParameters, estimation: bool = False) -> tuple[Any, str]:
    """The crypto context for ``params`` and a description of the key switching chosen.

    Raises:
        ConfigurationError: the security level has no OpenFHE equivalent, or a flooding
            mode is asked for off the flooding chain.
        InsecureParametersError: OpenFHE accepts no key-switching setting at this ring degree.
    """
    if params.security_level not in _SECURITY:
        raise ConfigurationError(f"security level {params.security_level} has no OpenFHE level")
    first = params.first_prime_bits
    for description, technique, digits, first_bits in _key_switching_candidates(
        params, estimation
    ):
        ccp = openfhe.CCParamsCKKSRNS()
        ccp.SetRingDim(params.poly_modulus_degree)
        ccp.SetMultiplicativeDepth(params.depth)
        ccp.SetScalingModSize(params.scale_bits)
        ccp.SetFirstModSize(first_bits)
        ccp.SetScalingTechnique(openfhe.FIXEDMANUAL)
        ccp.SetBatchSize(params.slots)
        ccp.SetSecurityLevel(_SECURITY[params.security_level])
        ccp.SetKeySwitchTechnique(technique)
        if technique == openfhe.HYBRID:
            ccp.SetNumLargeDigits(digits)
        else:
            ccp.SetDigitSize(_BV_DIGIT_BITS)
        mode = _decryption_mode(ccp, params, estimation)
        try:
            context = openfhe.GenCryptoContext(ccp)
        except RuntimeError:
            continue
        for feature in (openfhe.PKE, openfhe.KEYSWITCH, openfhe.LEVELEDSHE, openfhe.ADVANCEDSHE):
            context.Enable(feature)
        level = logging.WARNING if technique == openfhe.BV or first_bits != first else logging.INFO
        logger.log(
            level,
            "OpenFHE N=%d depth=%d scale=2^%d: key switching %s, %s",
            params.poly_modulus_degree,
            params.depth,
            params.scale_bits,
            description,
            mode,
        )
        return context, description
    raise InsecureParametersError(
        f"OpenFHE accepts no key-switching setting for N={params.poly_modulus_degree} with the "
        f"chain {list(params.coeff_modulus_bits)} at {params.security_level}-bit security: "
        f"use a larger ring degree or a shorter chain"
    )
