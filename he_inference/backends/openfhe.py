"""CKKS over OpenFHE's Python bindings: hoisted rotations, Chebyshev series, OpenMP.

Scaling is FIXEDMANUAL rather than OpenFHE's default FLEXIBLEAUTO. The evaluator accounts
levels itself (products are summed, then rescaled once) and the same circuit must consume
the same levels on every backend; FLEXIBLEAUTO rescales lazily inside the next product and
adjusts scales behind the caller's back, so levels would drift from SEAL's and the plain
backend's. Under FIXEDMANUAL ``GetLevel`` counts the rescales done so far (0 when fresh),
exactly the contract's level, and ``Rescale`` / ``LevelReduce`` are the only level changes.

The crypto context itself (the key switching OpenFHE accepts for the parameters' ring
degree, the security level, and the noise-flooding and noise-estimation decryption modes)
is built in :mod:`he_inference.backends.openfhe_context`;
:attr:`OpenFheBackend.key_switching` says which key switching was chosen.

OpenFHE keeps evaluation keys in process-global maps keyed by the secret key's tag (a random
128-bit hex id), and ``GenCryptoContext`` returns one shared context for equal parameters.
Two backends in one process (client and server in a test) therefore share one C++ context
and, for the same secret key, one key entry: keys never clobber those of another secret
key. Each backend serves one key tag and refuses ciphertexts and keys of any other; its
rotation steps are those the process holds for that tag (the same secret key's keys). A
key upload filed under a tag already in use must match the keys held for it (OpenFHE itself
refuses a second relin key for a tag and silently replaces Galois keys).

Known shortcomings:

- The global key maps only grow: the bindings clear them only as a whole
  (``ClearEvalMultKeys``, ``ReleaseAllContexts``), so a long-running server should evaluate
  in worker processes that it recycles. Each parameter set also leaves one throwaway relin
  and Galois key there (see :meth:`OpenFheBackend._references`).
- OpenFHE's binary (cereal) parser trusts the lengths and type ids in its input and can
  allocate without bound or crash on hostile bytes. Sizes, the exact header and the key-tag
  framing are checked before parsing, which stops truncated and foreign payloads, not a
  forged body behind a valid header: parse untrusted bytes in a memory-limited worker.
- The parser ignores trailing bytes. Ciphertexts and public/secret keys are written in a
  canonical form and compared byte for byte after parsing, but evaluation key maps cannot
  be (a relin key cannot be filed twice under one tag), so padding behind valid evaluation
  keys is caught only where the tag is already held; the wire envelope's length and hash
  catch it elsewhere.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import openfhe

from he_inference.backends.base import EVALUATION_KEY_KINDS, KEY_KINDS, Backend
from he_inference.backends.openfhe_context import build_context
from he_inference.errors import (
    CircuitError,
    ConfigurationError,
    KeyError_,
    LevelExhaustedError,
    MalformedPayloadError,
    ParameterMismatchError,
)
from he_inference.params import CkksParameters

logger = logging.getLogger(__name__)

# The contract's arrays are real float64 slot vectors of any shape (flattened on encode).
_Array = np.ndarray[Any, Any]

THREADS_ENV = "HE_INFERENCE_OPENFHE_THREADS"

_PARAMS_MARKER = b"lbcrypto::CryptoParametersCKKSRNS"
_SCHEME_MARKER = b"lbcrypto::SchemeCKKSRNS"
# Reference serialisations per parameter set and key switching (see OpenFheBackend._references).
_REFERENCES: dict[str, dict[str, bytes]] = {}
_HEX_TAG = re.compile(rb"[0-9a-f]{32}")
_TAG_LEN = 32
# Serialised headers measured at under 1 KiB; the slack also covers cereal's per-tower data.
_HEADER_SLACK = 16384

# The bindings expose no thread setter, so OpenMP is driven through libgomp, which openfhe
# links (the same soname resolves to the already loaded library). omp_set_num_threads sets
# the calling thread's value only, so it is applied per calling thread (see _apply_threads).
try:
    _GOMP: Any = ctypes.CDLL("libgomp.so.1")
except OSError:  # pragma: no cover - openfhe wheels for Linux always link libgomp
    _GOMP = None


def openmp_max_threads() -> int | None:
    """OpenMP's thread count for the calling thread, or ``None`` without libgomp."""
    return int(_GOMP.omp_get_max_threads()) if _GOMP is not None else None


def _default_threads() -> int:
    value = os.environ.get(THREADS_ENV, "1")
    try:
        threads = int(value)
    except ValueError as exc:
        raise ConfigurationError(f"{THREADS_ENV}={value!r} is not an integer") from exc
    return threads


def _canonical(data: bytes, parse: Any) -> bytes:
    """The bytes of ``data`` parsed and written again, the form every load compares with."""
    canonical: bytes = openfhe.Serialize(parse(data, openfhe.BINARY), openfhe.BINARY)
    return canonical


class OpenFheBackend(Backend):
    """CKKS over OpenFHE with FIXEDMANUAL scaling, hoisted rotations and Chebyshev series."""

    name = "openfhe"
    supports_hoisting = True
    supports_chebyshev = True

    def __init__(
        self, params: CkksParameters, threads: int | None = None, noise_estimation: bool = False
    ) -> None:
        """A context for ``params``.

        Args:
            params: the CKKS parameters; with ``noise_flooding`` set, decryption floods.
            threads: OpenMP threads per calling thread (``HE_INFERENCE_OPENFHE_THREADS``).
            noise_estimation: make OpenFHE's EXEC_NOISE_ESTIMATION context instead, in which
                :meth:`noise_bits` measures a result's noise (for the compiler, with a
                throwaway key: its ciphertexts load into no other context).
        """
        super().__init__(params)
        self.threads = _default_threads() if threads is None else threads
        if self.threads < 1:
            raise ConfigurationError(f"OpenFHE threads must be at least 1, not {self.threads}")
        self._local = threading.local()
        self._apply_threads()
        self.noise_estimation = noise_estimation
        self._cc, self.key_switching = build_context(params, noise_estimation)
        self._secret_key: Any = None
        self._public_key: Any = None
        self._tag: str | None = None
        self._relin = False
        self._steps: set[int] = set()
        # The estimation context has the parameters' fingerprint but other crypto parameters.
        mode = "/estimation" if noise_estimation else ""
        self._reference_id = f"{params.fingerprint()}/{self.key_switching}{mode}"
        self._step_of_index: dict[int, int] | None = None

    def _apply_threads(self) -> None:
        # OpenMP's thread count is per calling thread; the server evaluates in worker threads,
        # so set it once in each thread that reaches the library (one attribute check after).
        if _GOMP is not None and getattr(self._local, "threads", None) != self.threads:
            _GOMP.omp_set_num_threads(self.threads)
            self._local.threads = self.threads

    # -- keys -------------------------------------------------------------------------

    def generate_keys(self, rotation_steps: Sequence[int]) -> None:
        self._apply_threads()
        steps = sorted({self.normalise_step(s) for s in rotation_steps} - {0})
        pair = self._cc.KeyGen()
        self._secret_key, self._public_key = pair.secretKey, pair.publicKey
        self._tag = pair.secretKey.GetKeyTag()
        self._cc.EvalMultKeyGen(self._secret_key)
        if steps:
            self._cc.EvalRotateKeyGen(self._secret_key, steps)
        self._relin = True
        self._steps = set(steps)
        logger.info("generated OpenFHE keys: %d rotation steps, tag %s", len(steps), self._tag)

    @property
    def has_secret_key(self) -> bool:
        return self._secret_key is not None

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        return tuple(sorted(self._steps))

    def serialize_keys(self, kinds: Sequence[str] = EVALUATION_KEY_KINDS) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for kind in kinds:
            if kind not in KEY_KINDS:
                raise KeyError_(f"unknown key kind {kind!r}: choose from {', '.join(KEY_KINDS)}")
            if kind == "secret_key" and self._secret_key is not None:
                data = openfhe.Serialize(self._secret_key, openfhe.BINARY)
                out[kind] = _canonical(data, openfhe.DeserializePrivateKeyString)
            elif kind == "public_key" and self._public_key is not None:
                data = openfhe.Serialize(self._public_key, openfhe.BINARY)
                out[kind] = _canonical(data, openfhe.DeserializePublicKeyString)
            elif kind == "relin_keys" and self._relin and self._tag is not None:
                out[kind] = openfhe.SerializeEvalMultKeyString(openfhe.BINARY, self._tag)
            elif kind == "galois_keys" and self._tag is not None:
                # The global map may hold more steps for this tag (another backend in this
                # process); a serialisation carries the whole map for the tag.
                out[kind] = openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, self._tag)
            else:
                raise KeyError_(f"this OpenFHE context holds no {kind}: generate or load it")
        return out

    def load_keys(self, keys: dict[str, bytes]) -> None:
        self._apply_threads()
        order = sorted(keys, key=lambda k: KEY_KINDS.index(k) if k in KEY_KINDS else -1)
        for kind in order:
            if kind not in KEY_KINDS:
                raise MalformedPayloadError(f"unknown key kind {kind!r}")
            data = keys[kind]
            if kind in ("secret_key", "public_key"):
                self._load_key_pair_half(kind, data)
            elif kind == "relin_keys":
                self._load_relin_keys(data)
            else:
                self._load_galois_keys(data)

    def _references(self) -> dict[str, bytes]:
        """Reference serialisations of this context's objects, made once per process.

        A throwaway key pair gives the exact bytes before the key tag of a ciphertext, a
        public and a secret key (cereal framing plus the full crypto parameters), and the
        parameter block of each kind of evaluation key. Its relin key and one Galois key stay
        in OpenFHE's global maps (together 3 MB at N=8192 with three primes and 38 MB at
        N=16384 with eight), once per parameter set and process.
        """
        cached = _REFERENCES.get(self._reference_id)
        if cached is not None:
            return cached
        pair = self._cc.KeyGen()
        tag = pair.secretKey.GetKeyTag().encode()
        self._cc.EvalMultKeyGen(pair.secretKey)
        samples = {
            "ciphertext": openfhe.Serialize(
                self._cc.Encrypt(pair.publicKey, self.encode(0.0)), openfhe.BINARY
            ),
            "public_key": openfhe.Serialize(pair.publicKey, openfhe.BINARY),
            "secret_key": openfhe.Serialize(pair.secretKey, openfhe.BINARY),
        }
        refs = {kind: data[: data.find(tag) - 8] for kind, data in samples.items()}
        self._cc.EvalRotateKeyGen(pair.secretKey, [1])
        maps = {
            "relin_keys": openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag.decode()),
            "galois_keys": openfhe.SerializeEvalAutomorphismKeyString(
                openfhe.BINARY, tag.decode()
            ),
        }
        for kind, data in maps.items():
            start = data.find(_PARAMS_MARKER)
            refs[kind] = data[start : data.find(_SCHEME_MARKER, start)]
        _REFERENCES[self._reference_id] = refs
        return refs

    def _check_framed(self, kind: str, data: bytes, header: bytes) -> str:
        """Check the bytes before and the framing of the key tag; return the tag."""
        if not isinstance(data, bytes):
            raise MalformedPayloadError(f"{kind} must be bytes, not {type(data).__name__}")
        end = len(header) + 8 + _TAG_LEN
        if len(data) < end + self._tower_bytes():
            raise MalformedPayloadError(f"{kind} of {len(data)} bytes is truncated")
        if not data.startswith(header):
            if _PARAMS_MARKER in data[:4096]:
                raise ParameterMismatchError(f"{kind} was made for other CKKS parameters")
            raise MalformedPayloadError(f"the bytes are not an OpenFHE CKKS {kind}")
        length = int.from_bytes(data[len(header) : len(header) + 8], "little")
        tag = data[len(header) + 8 : end]
        if length != _TAG_LEN or not _HEX_TAG.fullmatch(tag):
            raise MalformedPayloadError(f"the key tag of {kind} is malformed")
        return tag.decode()

    def _check_key_map(self, kind: str, data: bytes) -> str:
        """Check an evaluation key map's framing and parameters before parsing; return its tag."""
        if not isinstance(data, bytes) or len(data) < 64 + self._tower_bytes():
            raise MalformedPayloadError(f"{kind} of {len(data)} bytes is truncated")
        # A format byte, a u64 entry count, then the u64 length and hex characters of the one
        # key tag the map is filed under.
        count = int.from_bytes(data[1:9], "little")
        length = int.from_bytes(data[9:17], "little")
        tag = data[17 : 17 + _TAG_LEN]
        if data[0] != 1 or count != 1 or length != _TAG_LEN or not _HEX_TAG.fullmatch(tag):
            raise MalformedPayloadError(f"{kind} do not hold one key set under one key tag")
        head = data[:8192]
        if self._references()[kind] not in head:
            if _PARAMS_MARKER in head:
                raise ParameterMismatchError(f"{kind} were made for other CKKS parameters")
            raise MalformedPayloadError(f"{kind} are not OpenFHE CKKS evaluation keys")
        self._check_tag(kind, tag.decode())
        return tag.decode()

    def _check_tag(self, kind: str, tag: str) -> None:
        if self._tag is not None and tag != self._tag:
            raise ParameterMismatchError(
                f"{kind} belong to key tag {tag} and this context holds keys of {self._tag}: "
                f"upload all keys of one client together"
            )

    def _load_key_pair_half(self, kind: str, data: bytes) -> None:
        tag = self._check_framed(kind, data, self._references()[kind])
        self._check_tag(kind, tag)
        parse = (
            openfhe.DeserializePrivateKeyString
            if kind == "secret_key"
            else openfhe.DeserializePublicKeyString
        )
        try:
            key = parse(data, openfhe.BINARY)
        except RuntimeError as exc:
            raise MalformedPayloadError(f"{kind} does not parse: {exc}") from exc
        self._check_context(kind, key.GetCryptoContext())
        if openfhe.Serialize(key, openfhe.BINARY) != data:
            raise MalformedPayloadError(f"{kind} carries bytes beyond or unlike the key")
        self._tag = tag
        if kind == "secret_key":
            self._secret_key = key
        else:
            self._public_key = key

    def _load_relin_keys(self, data: bytes) -> None:
        tag = self._check_key_map("relin_keys", data)
        # Loading replaces what the global map holds for the tag, so a different key filed
        # under a tag already in use (another client's) is refused before it lands.
        if tag in openfhe.CryptoContext.GetAllEvalMultKeys():
            if openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag) != data:
                raise ParameterMismatchError(
                    f"relin_keys for key tag {tag} differ from the ones this process holds"
                )
        else:
            try:
                openfhe.DeserializeEvalMultKeyString(data, openfhe.BINARY)
            except RuntimeError as exc:
                raise MalformedPayloadError(f"relin_keys do not parse: {exc}") from exc
            if openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag) != data:
                raise MalformedPayloadError("relin_keys carry bytes beyond or unlike the key")
        self._tag, self._relin = tag, True

    def _load_galois_keys(self, data: bytes) -> None:
        tag = self._check_key_map("galois_keys", data)
        held = openfhe.CryptoContext.GetExistingEvalAutomorphismKeyIndices(tag)
        if held:
            # Loading replaces keys filed under the same tag and index: an upload for a tag in
            # use must match what is held, or come after its own matching relin key.
            same = openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, tag) == data
            if not same and not self._relin:
                raise ParameterMismatchError(
                    f"galois_keys for key tag {tag} differ from the ones this process holds: "
                    f"load them with their relin_keys"
                )
        try:
            openfhe.DeserializeEvalAutomorphismKeyString(data, openfhe.BINARY)
        except RuntimeError as exc:
            raise MalformedPayloadError(f"galois_keys do not parse: {exc}") from exc
        if not held and openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, tag) != data:
            raise MalformedPayloadError("galois_keys carry bytes beyond or unlike the keys")
        self._tag = tag
        self._steps = self._loaded_steps(tag)

    def _loaded_steps(self, tag: str) -> set[int]:
        # Every step whose key the process holds for this tag: the same secret key's keys,
        # whichever backend of this process generated or loaded them.
        if self._step_of_index is None:
            self._step_of_index = {
                int(self._cc.FindAutomorphismIndex(step)): step
                for step in range(1, self.params.slots)
            }
        indices = openfhe.CryptoContext.GetExistingEvalAutomorphismKeyIndices(tag)
        unknown = [i for i in indices if i not in self._step_of_index]
        if unknown:
            raise ParameterMismatchError(
                f"galois_keys hold automorphisms {unknown[:4]} that are no slot rotation at "
                f"N={self.params.poly_modulus_degree}"
            )
        return {self._step_of_index[int(i)] for i in indices}

    def _check_context(self, kind: str, context: Any) -> None:
        if context.GetRingDimension() != self.params.poly_modulus_degree:
            raise ParameterMismatchError(
                f"{kind} was made for N={context.GetRingDimension()}, this context has "
                f"N={self.params.poly_modulus_degree}"
            )
        if context != self._cc:
            # OpenFHE files every deserialised object under the registered context with equal
            # parameters, so a different context means different parameters.
            raise ParameterMismatchError(f"{kind} was made for other CKKS parameters")

    # -- data -------------------------------------------------------------------------

    def encode(self, values: _Array | float, level: int = 0) -> Any:
        self.check_level(level, "encoding")
        if np.ndim(values) == 0:
            slots = np.full(self.params.slots, float(values))
        else:
            slots = self.pad(values)  # type: ignore[arg-type]
        return self._cc.MakeCKKSPackedPlaintext(slots, 1, level, None, self.params.slots)

    def encrypt(self, values: _Array) -> Any:
        # Symmetric where the secret key is here (as the contract asks), else public-key. The
        # bindings have no seeded encryption either way, so a fresh ciphertext is two full
        # polynomials: twice a SEAL seeded one (0.39 MB instead of about 0.2 MB at N=8192 with
        # three primes).
        key = self._secret_key if self._secret_key is not None else self._public_key
        if key is None:
            raise KeyError_("this OpenFHE context holds no secret or public key: generate keys")
        self._apply_threads()
        return self._cc.Encrypt(key, self.encode(values, 0))

    def decrypt(self, ct: Any) -> _Array:
        # A decrypted CKKS result at full precision lets whoever holds its ciphertext recover
        # the secret key (Li and Micciancio 2021). With params.noise_flooding this context is
        # NOISE_FLOODING_DECRYPT, and Decrypt adds the flooding noise sized from the estimate
        # the compiler measured and the manifest publishes (see openfhe_context's docstring).
        # Without it (circuits compiled with flooding off, or before it existed) decryption
        # adds only OpenFHE's fixed decoding noise, about as large as the ciphertext's own
        # noise, and the README says what a user must not share back.
        if self._secret_key is None:
            raise KeyError_("this context holds no secret key and cannot decrypt")
        return np.asarray(self._decrypt(ct).GetRealPackedValue(), dtype=np.float64)

    def _decrypt(self, ct: Any) -> Any:
        self._apply_threads()
        try:
            plaintext = self._cc.Decrypt(self._secret_key, ct)
        except RuntimeError as exc:
            # OpenFHE refuses to decode when the noise has swamped the scale.
            raise CircuitError(f"decryption failed, the result is all noise: {exc}") from exc
        plaintext.SetLength(self.params.slots)
        return plaintext

    def noise_bits(self, ct: Any) -> float:
        """log2 of the standard deviation of ``ct``'s noise, in units of the scaled plaintext.

        OpenFHE measures it on the imaginary parts of the decoded slots, which a real-valued
        computation leaves holding noise only (Costache et al., ePrint 2022/162, argue that
        this tracks the real parts' noise). It is the estimate a flooding context needs.

        Raises:
            ConfigurationError: this is not a noise-estimation context.
            KeyError_: this context holds no secret key.
        """
        if not self.noise_estimation:
            raise ConfigurationError(
                "noise is measured in a noise-estimation context: make the backend with "
                "noise_estimation=True"
            )
        if self._secret_key is None:
            raise KeyError_("this context holds no secret key and cannot decrypt")
        return float(self._decrypt(ct).GetLogError())

    def level(self, ct: Any) -> int:
        # Under FIXEDMANUAL GetLevel is the number of rescales (and level drops) so far.
        return int(ct.GetLevel())

    # -- arithmetic ---------------------------------------------------------------------

    def _same_level(self, a: Any, b: Any, what: str) -> None:
        if a.GetLevel() != b.GetLevel():
            raise CircuitError(f"{what} of operands at levels {a.GetLevel()} and {b.GetLevel()}")

    def add(self, a: Any, b: Any) -> Any:
        self._same_level(a, b, "add")
        return self._cc.EvalAdd(a, b)

    def sub(self, a: Any, b: Any) -> Any:
        self._same_level(a, b, "sub")
        return self._cc.EvalSub(a, b)

    def negate(self, a: Any) -> Any:
        return self._cc.EvalNegate(a)

    def add_plain(self, ct: Any, pt: Any) -> Any:
        self._same_level(ct, pt, "add_plain")
        return self._cc.EvalAdd(ct, pt)

    def multiply_plain(self, ct: Any, pt: Any) -> Any:
        self._same_level(ct, pt, "multiply_plain")
        self._apply_threads()
        return self._cc.EvalMult(ct, pt)

    def multiply(self, a: Any, b: Any) -> Any:
        self._same_level(a, b, "multiply")
        if not self._relin:
            raise KeyError_("multiply needs relin_keys: generate or load them")
        self._apply_threads()
        return self._cc.EvalMult(a, b)

    def rescale(self, ct: Any) -> Any:
        self.check_level(ct.GetLevel() + 1, "rescale")
        self._apply_threads()
        return self._cc.Rescale(ct)

    def drop_to_level(self, ct: Any, level: int) -> Any:
        current = ct.GetLevel()
        if level < current:
            raise CircuitError(f"cannot raise a ciphertext from level {current} to {level}")
        self.check_level(level, "drop_to_level")
        if level == current:
            return ct
        return self._cc.LevelReduce(ct, None, level - current)

    def _check_step(self, step: int) -> int:
        normalised = self.normalise_step(step)
        if normalised and normalised not in self._steps:
            raise KeyError_(f"no Galois key for rotation step {step} (normalised {normalised})")
        return normalised

    def rotate(self, ct: Any, step: int) -> Any:
        normalised = self._check_step(step)
        if normalised == 0:
            return ct
        self._apply_threads()
        return self._cc.EvalRotate(ct, normalised)

    def rotate_many(self, ct: Any, steps: Sequence[int]) -> dict[int, Any]:
        """Rotations of one ciphertext, sharing one digit decomposition (hoisting).

        One EvalFastRotationPrecompute (the costly decomposition) serves every step; each
        step then costs only an automorphism and an inner product with its key.

        Raises:
            KeyError_: a step has no Galois key.
        """
        normalised = {step: self._check_step(step) for step in steps}
        if not any(normalised.values()):
            return {step: ct for step in steps}
        self._apply_threads()
        digits = self._cc.EvalFastRotationPrecompute(ct)
        order = self._cc.GetCyclotomicOrder()
        return {
            step: ct if k == 0 else self._cc.EvalFastRotation(ct, k, order, digits)
            for step, k in normalised.items()
        }

    def evaluate_chebyshev(self, ct: Any, coefficients: _Array, lower: float, upper: float) -> Any:
        """Evaluate ``chebval`` of the series on [lower, upper] with EvalChebyshevSeries.

        The coefficients are numpy's convention (``c0 * T0 + c1 * T1 + ...``, full c0);
        OpenFHE's series halves c0, so c0 is doubled here. Depth: OpenFHE maps [lower, upper]
        to [-1, 1] (one level) and then evaluates linearly below degree 5 and by
        Paterson-Stockmeyer from degree 5; the levels consumed are measured in the tests:
        about ceil(log2(degree)) + 1.

        Raises:
            LevelExhaustedError: the series needs more levels than the ciphertext has left.
        """
        coeffs = np.asarray(coefficients, dtype=np.float64).ravel()
        if coeffs.size == 0:
            raise CircuitError("a Chebyshev series needs at least one coefficient")
        native = coeffs.copy()
        native[0] *= 2.0
        self._apply_threads()
        try:
            return self._cc.EvalChebyshevSeries(ct, native.tolist(), float(lower), float(upper))
        except RuntimeError as exc:
            # The one way a valid call fails is running out of towers mid-series.
            raise LevelExhaustedError(
                f"a degree-{coeffs.size - 1} Chebyshev series from level {ct.GetLevel()} needs "
                f"more than the {self.params.depth} levels of the chain: lower the degree or "
                f"compile with a larger depth ({exc})"
            ) from exc

    # -- serialisation ----------------------------------------------------------------

    def serialize_ciphertext(self, ct: Any) -> bytes:
        """Serialise one ciphertext in the canonical form that :meth:`load_ciphertext` checks.

        OpenFHE writes a computed ciphertext and a parsed one differently (shared parameter
        pointers), and its parser ignores trailing bytes. Writing the parsed form, one extra
        parse per ciphertext (about 10 ms at N=8192), makes a load exact: what parses must
        serialise back to the very bytes received, which catches padding and splices.
        """
        return _canonical(
            openfhe.Serialize(ct, openfhe.BINARY), openfhe.DeserializeCiphertextString
        )

    def load_ciphertext(self, data: bytes) -> Any:
        """Load one ciphertext, checked against this context before and after parsing.

        OpenFHE's binary (cereal) parser trusts lengths and type ids in its input and can
        allocate without bound or crash on hostile bytes, so the bytes are checked first: the
        size against :meth:`max_ciphertext_bytes` and the exact header (this context's
        parameters) and key-tag framing. That stops truncated and foreign payloads, not a
        forged body behind a valid header: parse untrusted bytes in a memory-limited worker.

        Raises:
            MalformedPayloadError: the bytes do not parse as a ciphertext.
            ParameterMismatchError: it was made for other parameters or other keys.
        """
        if isinstance(data, bytes) and len(data) > self.max_ciphertext_bytes():
            raise MalformedPayloadError(
                f"ciphertext of {len(data)} bytes exceeds {self.max_ciphertext_bytes()} bytes"
            )
        tag = self._check_framed("ciphertext", data, self._references()["ciphertext"])
        if self._tag is not None and tag != self._tag:
            raise ParameterMismatchError(
                f"the ciphertext was encrypted under key tag {tag}, this context holds the keys "
                f"of {self._tag}"
            )

        try:
            ct = openfhe.DeserializeCiphertextString(data, openfhe.BINARY)
        except RuntimeError as exc:
            raise MalformedPayloadError(f"the ciphertext does not parse: {exc}") from exc
        self._check_context("ciphertext", ct.GetCryptoContext())
        level = int(ct.GetLevel())
        self.check_level(level, "loading a ciphertext")
        if ct.NumberCiphertextElements() != 2:
            raise MalformedPayloadError("the ciphertext does not have two polynomials")
        if openfhe.Serialize(ct, openfhe.BINARY) != data:
            raise MalformedPayloadError("the ciphertext carries bytes beyond or unlike its data")
        if ct.GetNoiseScaleDeg() not in (1, 2) or ct.GetSlots() != self.params.slots:
            raise ParameterMismatchError("the ciphertext's scale or slot count does not fit")
        return ct

    def _tower_bytes(self) -> int:
        return 8 * self.params.poly_modulus_degree

    def max_ciphertext_bytes(self) -> int:
        # Two polynomials of depth + 1 towers of N 64-bit words, plus the measured header
        # (under 1 KiB) with slack for cereal's per-tower framing.
        return 2 * (self.params.depth + 1) * self._tower_bytes() + _HEADER_SLACK

    @property
    def library_version(self) -> str:
        return f"openfhe-{openfhe.__version__}"
