"""CKKS parameters, the security table they are checked against, and their selection.

A modulus chain here is ``[first, scale x depth, special]`` in bits: the first prime holds
the integer part of the result at the last level, each of the ``depth`` middle primes is
consumed by one rescale, and the special prime serves key switching. The sum of all of them
is what the security bound limits. OpenFHE's noise-flooding decryption fixes its own chain
shape (:func:`select_flooding_parameters`), and its settings (:class:`NoiseFlooding`) are
part of the parameters, so they reach the manifest, the fingerprint and both contexts.

The bounds are the maximum ``log2(q*p)`` for a ternary secret and error of standard
deviation 3.2 from the Homomorphic Encryption Standard (Albrecht et al., "Homomorphic
Encryption Security Standard", HomomorphicEncryption.org, 2018, Table 1, classical
security). The same table is what SEAL's ``CoeffModulus.MaxBitCount`` and OpenFHE's
``HEStd_*_classic`` levels enforce, and the standard's estimates cover the known quantum
lattice attacks at these sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from he_inference.errors import ConfigurationError, InsecureParametersError

# Maximum total modulus bits per ring degree, per security level (HE Standard, Table 1).
MAX_MODULUS_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
SECURITY_LEVELS = tuple(MAX_MODULUS_BITS)
RING_DEGREES = (1024, 2048, 4096, 8192, 16384, 32768)

# SEAL's primes are at most 60 bits, and NTT-friendly primes much below 20 bits are too few.
MAX_PRIME_BITS = 60
MIN_PRIME_BITS = 20

# The range the automatic choice tries for the scale. Encoding and rescaling noise is about
# 2^6-2^8 units of the scale at these ring degrees, so 2^26 still leaves some 18 bits of
# precision for values of order one, ample for logits; 2^40 is the usual ceiling.
AUTO_SCALE_BITS = tuple(range(40, 25, -1))

# OpenFHE's noise-flooding decryption (64-bit build) fixes the scale at 2^59 and the first
# prime at 60 bits whatever the parameters ask, and refuses a flooding noise above 2^56
# units of the scale (fewer than 3 bits of precision left).
FLOODING_SCALE_BITS = 59
FLOODING_FIRST_PRIME_BITS = 60
FLOODING_MAX_BITS = 56.0
# The flooding standard deviation is sqrt(12 * queries) * 2^(security / 2) * the circuit's
# noise (Li, Micciancio, Schultz and Sorrell, CRYPTO 2022, Corollary 2 as corrected in
# OpenFHE's CKKS_NOISE_FLOODING.md); OpenFHE 1.6 fixes security 30 and one query.
FLOODING_BASE_SECURITY = 30


@dataclass(frozen=True)
class NoiseFlooding:
    """Noise-flooding decryption: what a flooding context needs, published in the manifest.

    Decryption adds a discrete Gaussian large enough to hide the ciphertext's own noise,
    which is a function of the secret key, so a shared decrypted result no longer gives the
    key away (Li and Micciancio, EUROCRYPT 2021).

    Attributes:
        noise_bits: log2 of the standard deviation of the circuit's output noise, in units
            of the scaled plaintext's coefficients (OpenFHE's ``GetLogError``), measured by
            running the circuit once at compile time.
        statistical_security: bits of statistical distance the flooding buys per query set.
        adversarial_queries: decryptions of related ciphertexts an attacker may see.
    """

    noise_bits: float
    statistical_security: int = FLOODING_BASE_SECURITY
    adversarial_queries: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.noise_bits):
            raise ConfigurationError(f"noise estimate 2^{self.noise_bits} is not finite")
        if self.statistical_security < FLOODING_BASE_SECURITY or self.adversarial_queries < 1:
            raise ConfigurationError(
                f"statistical security {self.statistical_security} and adversarial queries "
                f"{self.adversarial_queries}: ask for at least {FLOODING_BASE_SECURITY} bits "
                f"and one query"
            )
        if self.flooding_bits > FLOODING_MAX_BITS:
            raise ConfigurationError(
                f"flooding noise of 2^{self.flooding_bits:.1f} (circuit noise 2^"
                f"{self.noise_bits:.1f}) exceeds OpenFHE's 2^{FLOODING_MAX_BITS:.0f}, which "
                f"leaves under 3 bits of precision: lower the statistical security or the "
                f"adversarial queries, or compile without noise flooding"
            )

    @property
    def estimate_bits(self) -> float:
        """The noise estimate handed to OpenFHE, raised to stand for more security or queries.

        OpenFHE 1.6 accepts neither setting for CKKS decryption, so the factor they add to
        the standard deviation, ``2^((security - 30) / 2) * sqrt(queries)``, goes into the
        estimate instead: the flooding noise is the same.
        """
        extra = (self.statistical_security - FLOODING_BASE_SECURITY) / 2
        return self.noise_bits + extra + math.log2(self.adversarial_queries) / 2

    @property
    def flooding_bits(self) -> float:
        """log2 of the flooding noise's standard deviation per coefficient."""
        queries = math.log2(math.sqrt(12 * self.adversarial_queries))
        return self.statistical_security / 2 + queries + self.noise_bits

    def slot_noise(self, poly_modulus_degree: int) -> float:
        """Standard deviation the flooding adds to each decrypted slot value.

        Measured at sqrt(N) times the per-coefficient deviation over the scale (the
        decoding sums N coefficients, and OpenFHE's decoder adds noise of its own as large).
        """
        bits = self.flooding_bits + 0.5 * math.log2(poly_modulus_degree) - FLOODING_SCALE_BITS
        return float(2.0**bits)

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready form, the one written into manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> NoiseFlooding:
        """Rebuild the settings from :meth:`to_dict` output.

        Raises:
            ConfigurationError: a field is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise ConfigurationError(f"invalid noise flooding settings {data!r}")
        try:
            return cls(
                noise_bits=float(data["noise_bits"]),
                statistical_security=int(data["statistical_security"]),
                adversarial_queries=int(data["adversarial_queries"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid noise flooding settings {data!r}: {exc}") from exc


@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters shared by the compiler, the backends, the server and the client.

    Attributes:
        poly_modulus_degree: the ring degree N; a ciphertext has N/2 slots.
        coeff_modulus_bits: bit sizes of the chain, first prime first and special prime last.
        scale_bits: log2 of the encoding scale; the middle primes have this size.
        security_level: classical security in bits (128, 192 or 256).
        noise_flooding: noise-flooding decryption settings, or ``None`` for plain
            decryption (circuit files older than this field load as ``None``).
    """

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int
    security_level: int = 128
    noise_flooding: NoiseFlooding | None = None
    extra: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def slots(self) -> int:
        """Number of complex slots of one ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Number of rescales the chain allows (the middle primes)."""
        return len(self.coeff_modulus_bits) - 2

    @property
    def total_bits(self) -> int:
        """Total bits of the modulus q*p that the security bound limits."""
        return sum(self.coeff_modulus_bits)

    @property
    def first_prime_bits(self) -> int:
        """Bits of the first prime, which holds the result at the last level."""
        return self.coeff_modulus_bits[0]

    @property
    def special_prime_bits(self) -> int:
        """Bits of the special prime used by key switching."""
        return self.coeff_modulus_bits[-1]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form, the one written into manifests."""
        data = asdict(self)
        data["coeff_modulus_bits"] = list(self.coeff_modulus_bits)
        data.pop("extra")
        # Absent rather than null without flooding, so the fingerprints of plain-decryption
        # parameters (and the key folders named by them) stay what they were.
        if self.noise_flooding is None:
            data.pop("noise_flooding")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CkksParameters:
        """Rebuild parameters from :meth:`to_dict` output, validating them again.

        Raises:
            ConfigurationError: a field is missing or has the wrong type.
            InsecureParametersError: the chain is too long for the ring degree.
        """
        try:
            bits = data["coeff_modulus_bits"]
            if not isinstance(bits, (list, tuple)):
                raise TypeError("coeff_modulus_bits must be a list")
            flooding = data.get("noise_flooding")
            return cls(
                poly_modulus_degree=int(data["poly_modulus_degree"]),  # type: ignore[call-overload]
                coeff_modulus_bits=tuple(int(b) for b in bits),
                scale_bits=int(data["scale_bits"]),  # type: ignore[call-overload]
                security_level=int(data.get("security_level", 128)),  # type: ignore[call-overload]
                noise_flooding=None if flooding is None else NoiseFlooding.from_dict(flooding),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid CKKS parameters {data!r}: {exc}") from exc

    def fingerprint(self) -> str:
        """A short hash naming these parameters, carried by every wire envelope."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def max_modulus_bits(poly_modulus_degree: int, security_level: int = 128) -> int:
    """The largest total modulus in bits allowed for a ring degree at a security level.

    Raises:
        ConfigurationError: the security level or ring degree is not in the table.
    """
    if security_level not in MAX_MODULUS_BITS:
        raise ConfigurationError(
            f"security level {security_level} is not supported: choose one of "
            f"{', '.join(map(str, SECURITY_LEVELS))}"
        )
    table = MAX_MODULUS_BITS[security_level]
    if poly_modulus_degree not in table:
        raise ConfigurationError(
            f"ring degree {poly_modulus_degree} is not supported: choose one of "
            f"{', '.join(map(str, RING_DEGREES))}"
        )
    return table[poly_modulus_degree]


def validate(params: CkksParameters) -> None:
    """Check prime sizes and the security bound.

    Raises:
        ConfigurationError: a prime size or the scale is out of range.
        InsecureParametersError: the chain is longer than the bound for the ring degree.
    """
    bits = params.coeff_modulus_bits
    if len(bits) < 2:
        raise ConfigurationError(
            f"the modulus chain {list(bits)} needs at least a first and a special prime"
        )
    for b in bits:
        if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS:
            raise ConfigurationError(
                f"prime of {b} bits in chain {list(bits)}: each prime must have "
                f"{MIN_PRIME_BITS} to {MAX_PRIME_BITS} bits"
            )
    if params.scale_bits >= params.first_prime_bits:
        raise ConfigurationError(
            f"scale 2^{params.scale_bits} leaves no room in the first prime of "
            f"{params.first_prime_bits} bits: make the first prime larger than the scale"
        )
    if params.noise_flooding is not None and (
        params.scale_bits != FLOODING_SCALE_BITS
        or params.first_prime_bits != FLOODING_FIRST_PRIME_BITS
    ):
        raise ConfigurationError(
            f"noise-flooding decryption runs at scale 2^{FLOODING_SCALE_BITS} with a "
            f"{FLOODING_FIRST_PRIME_BITS}-bit first prime, not 2^{params.scale_bits} and "
            f"{params.first_prime_bits}: choose the chain with select_flooding_parameters"
        )
    bound = max_modulus_bits(params.poly_modulus_degree, params.security_level)
    if params.total_bits > bound:
        raise InsecureParametersError(
            f"the modulus chain has {params.total_bits} bits and N={params.poly_modulus_degree}"
            f" allows {bound} at {params.security_level}-bit security: shorten the chain "
            f"(lower depth or scale) or use a larger ring degree"
        )


def chain_bits(
    depth: int,
    scale_bits: int,
    integer_bits: int,
    special_prime_bits: int | None = None,
    max_first_bits: int = MAX_PRIME_BITS,
) -> tuple[int, ...]:
    """The chain ``[first, scale x depth, special]`` for a depth and scale.

    The special prime defaults to the first prime's size: SEAL's key switching adds noise
    in proportion to the largest prime over the special one, so it must not be smaller.
    """
    first = min(max_first_bits, scale_bits + integer_bits)
    return (first, *([scale_bits] * depth), special_prime_bits or first)


# What each backend's key switching needs of the chain. OpenFHE sizes its own key-switching
# primes (P) in 60-bit primes, and one such prime covers digits of up to 55 bits; SEAL uses
# the special prime as given.
BACKEND_CHAIN_RULES: dict[str, dict[str, int]] = {
    "seal": {},
    "plain": {},
    "openfhe": {"special_prime_bits": 60, "max_first_bits": 55},
}


def select_parameters(
    depth: int,
    slots: int,
    *,
    scale_bits: int | None = None,
    integer_bits: int = 20,
    security_level: int = 128,
    min_ring_degree: int | None = None,
    backend: str = "seal",
) -> CkksParameters:
    """Choose the smallest ring degree whose security bound fits the circuit.

    Args:
        depth: rescales the circuit performs on its longest path.
        slots: slots one ciphertext must hold (at most N/2).
        scale_bits: log2 of the scale; ``None`` tries 2^40 down to 2^26 for each ring degree
            and takes the largest that fits the smallest ring.
        integer_bits: bits above the scale kept by the first prime, so results up to
            about 2^(integer_bits - 1) in magnitude decrypt correctly.
        security_level: 128, 192 or 256.
        min_ring_degree: do not go below this ring degree.
        backend: the backend the parameters are for (its key switching shapes the chain).

    Raises:
        ConfigurationError: the arguments are out of range.
        InsecureParametersError: no supported ring degree fits the depth at this security.
    """
    if depth < 0 or slots < 1:
        raise ConfigurationError(f"depth {depth} and slots {slots} must be positive")
    max_modulus_bits(RING_DEGREES[0], security_level)  # validates the level
    rules = BACKEND_CHAIN_RULES.get(backend)
    if rules is None:
        raise ConfigurationError(
            f"unknown backend {backend!r}: choose one of {', '.join(BACKEND_CHAIN_RULES)}"
        )
    scales = (scale_bits,) if scale_bits is not None else AUTO_SCALE_BITS
    for degree in RING_DEGREES:
        if degree // 2 < slots or (min_ring_degree and degree < min_ring_degree):
            continue
        bound = MAX_MODULUS_BITS[security_level][degree]
        for scale in scales:
            bits = chain_bits(depth, scale, integer_bits, **rules)
            if sum(bits) <= bound:
                return CkksParameters(degree, bits, scale, security_level)
    largest = RING_DEGREES[-1]
    needed = sum(chain_bits(depth, scales[-1], integer_bits, **rules))
    raise InsecureParametersError(
        f"the circuit needs depth {depth} ({needed} modulus bits at scale 2^{scales[-1]}) and "
        f"{slots} slots; N={largest} allows "
        f"{MAX_MODULUS_BITS[security_level][largest]} bits at {security_level}-bit security: "
        f"lower the activation degree, fuse more layers, or use a smaller scale"
    )


def select_flooding_parameters(
    depth: int,
    slots: int,
    *,
    security_level: int = 128,
    min_ring_degree: int | None = None,
    spare_level: bool = True,
) -> CkksParameters:
    """Choose the smallest ring degree for OpenFHE's noise-flooding decryption.

    The chain is ``[60, 59 x (depth + 1), 60]``: OpenFHE fixes the scale and the first
    prime, which leaves the last level one bit of integer room, so one level more than the
    circuit consumes keeps a second prime under the output (2^59 of room). Without
    ``spare_level`` the chain is ``[60, 59 x depth, 60]``, for an output already scaled
    below one (``compiler.flooding``). OpenFHE's HYBRID key switching then needs two 60-bit
    primes P for 60-bit digits, one more than the chain holds, so 60 bits more must fit
    under the bound; OpenFHE's BV (no P) fits without them but its keys are several times
    larger.

    Raises:
        ConfigurationError: the arguments are out of range.
        InsecureParametersError: no supported ring degree fits the depth at this security.
    """
    if depth < 0 or slots < 1:
        raise ConfigurationError(f"depth {depth} and slots {slots} must be positive")
    bits = (
        FLOODING_FIRST_PRIME_BITS,
        *([FLOODING_SCALE_BITS] * (depth + int(spare_level))),
        MAX_PRIME_BITS,
    )
    needed = sum(bits) + MAX_PRIME_BITS
    for degree in RING_DEGREES:
        if degree // 2 < slots or (min_ring_degree and degree < min_ring_degree):
            continue
        if needed <= max_modulus_bits(degree, security_level):
            return CkksParameters(degree, bits, FLOODING_SCALE_BITS, security_level)
    largest = RING_DEGREES[-1]
    raise InsecureParametersError(
        f"noise-flooding decryption of a depth-{depth} circuit needs {needed} modulus bits "
        f"(scale 2^{FLOODING_SCALE_BITS}) and N={largest} allows "
        f"{max_modulus_bits(largest, security_level)} at {security_level}-bit security: "
        f"compile with --no-noise-flooding (then keep decrypted results to yourself) or "
        f"lower the depth"
    )
