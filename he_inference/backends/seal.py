"""Microsoft SEAL through TenSEAL's low-level ``tenseal.sealapi`` bindings.

These bindings save and load SEAL objects through file paths only, so every serialisation
here goes through an in-memory file: a ``memfd`` on Linux, a file on ``/dev/shm`` (or the
temporary folder) elsewhere. Nothing is written to disk per ciphertext.

Symmetric encryption with the secret key saves in SEAL's seeded form: the second
polynomial of a fresh ciphertext (and of every evaluation key) is replaced by the seed of
the generator that drew it, which halves a query's upload and the key upload.

Compression is SEAL's default, zstd: the bindings accept no compression mode, and the only
way to "none" is to decompress after SEAL has compressed. Measured on one core for a fresh
(non-seeded) ciphertext, zstd is 15% smaller at N=8192 (334 kB against 393 kB) and 21%
smaller at N=16384 (1.65 MB against 2.10 MB). Loading the uncompressed form is faster
(0.4 ms against 1.0 ms, 3.5 ms against 12.5 ms), but producing it costs a further
decompression (0.6 ms, 4.9 ms) on every save, so over a round trip "none" is both larger and
slower, and zstd stays.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import tenseal
import tenseal.sealapi as sealapi

from he_inference.backends.base import EVALUATION_KEY_KINDS, KEY_KINDS, Backend
from he_inference.errors import (
    CircuitError,
    ConfigurationError,
    InsecureParametersError,
    KeyError_,
    LevelExhaustedError,
    MalformedPayloadError,
    ParameterMismatchError,
)
from he_inference.params import CkksParameters

try:  # only to tell "other parameters" from "garbage" in a rejected zstd payload
    import zstandard
except ImportError:  # pragma: no cover - then such payloads are reported as malformed
    zstandard = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_SEC_LEVELS = {
    128: sealapi.SEC_LEVEL_TYPE.TC128,
    192: sealapi.SEC_LEVEL_TYPE.TC192,
    256: sealapi.SEC_LEVEL_TYPE.TC256,
}

# SEAL's serialisation header (serialization.h): magic, header size, version major and
# minor, compression mode, reserved, total size including the header.
_HEADER = struct.Struct("<HBBBBHQ")
_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
# Ciphertext members before the coefficients: parms_id (32), is_ntt_form (1), size,
# poly_modulus_degree, coeff_modulus_size, scale, correction_factor (8 each), then the
# coefficient array as a nested SEAL object (its own 16-byte header and an 8-byte count).
_CIPHERTEXT_OVERHEAD = 32 + 1 + 5 * 8 + _HEADER.size + 8

_T = TypeVar("_T")


class SealCiphertext:
    """A SEAL ciphertext, with its seeded serialisation while it is fresh."""

    __slots__ = ("_backend", "_ct", "seeded")

    def __init__(
        self,
        backend: SealBackend,
        ct: sealapi.Ciphertext | None = None,
        seeded: bytes | None = None,
    ) -> None:
        self._backend = backend
        self._ct = ct
        self.seeded = seeded

    @property
    def ct(self) -> sealapi.Ciphertext:
        """The expanded ciphertext, loaded from the seed on first use.

        A client that only encrypts and uploads never pays for the expansion. Two threads
        racing here both load the same bytes and one result wins, which is harmless.
        """
        if self._ct is None:
            if self.seeded is None:
                raise CircuitError("a SEAL ciphertext handle holds neither data nor a seed")
            self._ct = self._backend._load_object(sealapi.Ciphertext(), self.seeded)
        return self._ct


class SealBackend(Backend):
    """CKKS over SEAL: one context, its keys, an encoder and an evaluator.

    The SEAL evaluator, encoder, encryptor and decryptor are safe to share between threads
    for evaluation, and every serialisation uses its own in-memory file, so one instance
    serves concurrent requests. Loading keys while evaluating is not synchronised.
    """

    name = "seal"
    supports_hoisting = False

    def __init__(self, params: CkksParameters) -> None:
        super().__init__(params)
        self._context = _make_context(params)
        self._encoder = sealapi.CKKSEncoder(self._context)
        self._evaluator = sealapi.Evaluator(self._context)
        self._scale = float(2**params.scale_bits)
        self._parms_ids = _data_parms_ids(self._context)
        self._known_parms_ids = {tuple(p) for p in self._parms_ids}
        self._known_parms_ids.add(tuple(self._context.key_parms_id()))
        self._top_index = self._context.first_context_data().chain_index()
        self._level_scales = self._exact_scales()

        self._secret_key: sealapi.SecretKey | None = None
        self._public_key: sealapi.PublicKey | None = None
        self._relin_keys: sealapi.RelinKeys | None = None
        self._galois_keys: sealapi.GaloisKeys | None = None
        self._steps: frozenset[int] = frozenset()
        self._encryptor: sealapi.Encryptor | None = None
        self._decryptor: sealapi.Decryptor | None = None
        # Seeded forms of the keys generated here, half the size of a re-serialised key.
        self._seeded_keys: dict[str, bytes] = {}
        self._version: str | None = None
        self._version_lock = threading.Lock()

    # -- keys -------------------------------------------------------------------------

    def generate_keys(self, rotation_steps: Sequence[int]) -> None:
        steps = sorted({self.normalise_step(s) for s in rotation_steps} - {0})
        keygen = sealapi.KeyGenerator(self._context)
        secret_key = keygen.secret_key()
        public_key = sealapi.PublicKey()
        keygen.create_public_key(public_key)
        relin_seeded = self._save_object(keygen.create_relin_keys())
        # A list of unsigned ints picks the overload that takes Galois elements.
        galois_seeded = self._save_object(
            keygen.create_galois_keys([self._galois_element(s) for s in steps])
        )

        self._seeded_keys = {"relin_keys": relin_seeded, "galois_keys": galois_seeded}
        self._install_keys(
            secret_key=secret_key,
            public_key=public_key,
            relin_keys=self._load_object(sealapi.RelinKeys(), relin_seeded),
            galois_keys=self._load_object(sealapi.GaloisKeys(), galois_seeded),
        )
        logger.info(
            "generated SEAL keys for N=%d with %d rotation steps (relin %d B, galois %d B)",
            self.params.poly_modulus_degree,
            len(steps),
            len(relin_seeded),
            len(galois_seeded),
        )

    @property
    def has_secret_key(self) -> bool:
        return self._secret_key is not None

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        return tuple(sorted(self._steps))

    def serialize_keys(self, kinds: Sequence[str] = EVALUATION_KEY_KINDS) -> dict[str, bytes]:
        keys = {
            "secret_key": self._secret_key,
            "public_key": self._public_key,
            "relin_keys": self._relin_keys,
            "galois_keys": self._galois_keys,
        }
        out: dict[str, bytes] = {}
        for kind in kinds:
            if kind not in keys:
                raise KeyError_(f"unknown key kind {kind!r}: choose from {', '.join(KEY_KINDS)}")
            key = keys[kind]
            if key is None:
                raise KeyError_(f"this SEAL context holds no {kind}: generate or load it first")
            out[kind] = self._seeded_keys.get(kind) or self._save_object(key)
        return out

    def load_keys(self, keys: dict[str, bytes]) -> None:
        factories: dict[str, Callable[[], Any]] = {
            "secret_key": sealapi.SecretKey,
            "public_key": sealapi.PublicKey,
            "relin_keys": sealapi.RelinKeys,
            "galois_keys": sealapi.GaloisKeys,
        }
        loaded: dict[str, Any] = {}
        for kind, data in keys.items():
            if kind not in factories:
                raise KeyError_(f"unknown key kind {kind!r}: choose from {', '.join(KEY_KINDS)}")
            loaded[kind] = self._checked_load(factories[kind](), data, kind)

        # Parse everything before installing anything, so a bad key leaves no half state.
        for kind, data in keys.items():
            self._seeded_keys.pop(kind, None)
            if kind in EVALUATION_KEY_KINDS:
                self._seeded_keys[kind] = data
        self._install_keys(**loaded)
        logger.info("loaded SEAL keys %s", ", ".join(f"{k} ({len(v)} B)" for k, v in keys.items()))

    def _install_keys(self, **keys: Any) -> None:
        if "secret_key" in keys:
            self._secret_key = keys["secret_key"]
            self._decryptor = sealapi.Decryptor(self._context, self._secret_key)
        if "public_key" in keys:
            self._public_key = keys["public_key"]
        if "relin_keys" in keys:
            self._relin_keys = keys["relin_keys"]
        if "galois_keys" in keys:
            self._galois_keys = keys["galois_keys"]
            self._steps = self._steps_of(self._galois_keys)
        if self._secret_key is not None:
            self._encryptor = sealapi.Encryptor(self._context, self._secret_key)
        elif self._public_key is not None:
            self._encryptor = sealapi.Encryptor(self._context, self._public_key)

    def _galois_element(self, step: int) -> int:
        # SEAL's GaloisTool maps a left rotation by step s in [1, N/2) to 3^s mod 2N (the
        # bindings do not expose the tool itself, so the rule is applied here).
        return pow(3, step, 2 * self.params.poly_modulus_degree)

    def _steps_of(self, galois_keys: sealapi.GaloisKeys) -> frozenset[int]:
        """The rotation steps a loaded key set covers, by walking the powers of 3 mod 2N."""
        if galois_keys.size() == 0:
            return frozenset()
        modulus = 2 * self.params.poly_modulus_degree
        steps, element = [], 1
        for step in range(1, self.params.slots):
            element = element * 3 % modulus
            if galois_keys.has_key(element):
                steps.append(step)
        return frozenset(steps)

    def _exact_scales(self) -> list[float]:
        """The scale of a rescaled ciphertext at each level: 2^s, then scale^2 / q dropped.

        Every ciphertext of one level has this one scale, whatever path made it, so values
        from two paths add without any correction, and every plaintext is encoded at the
        scale of the level it meets. Declaring the scale to be 2^s after each rescale instead
        would multiply the slots by 2^s / q_i (q_i = 1 mod 2N is only near 2^s): a relative
        error of up to 1e-4 per level at a 28-bit scale, which a square activation doubles.
        """
        scales = [self._scale]
        for level in range(self.params.depth):
            data = self._context.get_context_data(self._parms_ids[level])
            dropped = float(data.parms().coeff_modulus()[-1].value())
            scales.append(scales[-1] * scales[-1] / dropped)
        return scales

    def _dropped_prime(self, level: int) -> float:
        data = self._context.get_context_data(self._parms_ids[level])
        return float(data.parms().coeff_modulus()[-1].value())

    # -- data -------------------------------------------------------------------------

    def encode(self, values: npt.NDArray[Any] | float, level: int = 0) -> sealapi.Plaintext:
        if level < 0:
            raise CircuitError(f"cannot encode at level {level}: levels count from 0")
        self.check_level(level, "encoding")
        plaintext = sealapi.Plaintext()
        parms_id = self._parms_ids[level]
        scale = self._level_scales[level]
        if np.ndim(values) == 0:
            # A constant encodes as a constant polynomial, without a transform over slots.
            self._encoder.encode(float(values), parms_id, scale, plaintext)
        else:
            self._encoder.encode(self.pad(np.asarray(values)).tolist(), parms_id, scale, plaintext)
        return plaintext

    def encrypt(self, values: npt.NDArray[Any]) -> SealCiphertext:
        if self._encryptor is None:
            raise KeyError_("this SEAL context holds neither a secret nor a public key to encrypt")
        plaintext = self.encode(values)
        if self._secret_key is not None:
            return SealCiphertext(
                self, seeded=self._save_object(self._encryptor.encrypt_symmetric(plaintext))
            )
        ct = sealapi.Ciphertext()
        self._encryptor.encrypt(plaintext, ct)
        return SealCiphertext(self, ct)

    def decrypt(self, ct: SealCiphertext) -> npt.NDArray[np.float64]:
        if self._decryptor is None:
            raise KeyError_("this SEAL context holds no secret key and cannot decrypt")
        plaintext = sealapi.Plaintext()
        self._decryptor.decrypt(ct.ct, plaintext)
        return np.asarray(self._encoder.decode_double(plaintext), dtype=np.float64)

    def level(self, ct: SealCiphertext) -> int:
        return self._level_of(ct.ct.parms_id())

    def _level_of(self, parms_id: list[int]) -> int:
        chain_index: int = self._context.get_context_data(parms_id).chain_index()
        return int(self._top_index - chain_index)

    # -- arithmetic ---------------------------------------------------------------------

    def add(self, a: SealCiphertext, b: SealCiphertext) -> SealCiphertext:
        self._same_level(a.ct, b.ct, "add")
        return self._apply("add", self._evaluator.add, a.ct, b.ct)

    def sub(self, a: SealCiphertext, b: SealCiphertext) -> SealCiphertext:
        self._same_level(a.ct, b.ct, "sub")
        return self._apply("sub", self._evaluator.sub, a.ct, b.ct)

    def negate(self, a: SealCiphertext) -> SealCiphertext:
        return self._apply("negate", self._evaluator.negate, a.ct)

    def add_plain(self, ct: SealCiphertext, pt: sealapi.Plaintext) -> SealCiphertext:
        self._same_level(ct.ct, pt, "add_plain")
        return self._apply("add_plain", self._evaluator.add_plain, ct.ct, pt)

    def multiply_plain(self, ct: SealCiphertext, pt: sealapi.Plaintext) -> SealCiphertext:
        self._same_level(ct.ct, pt, "multiply_plain")
        if pt.is_zero():
            # SEAL refuses a product that is exactly zero (a "transparent" ciphertext that
            # would carry no encryption). The constant polynomial 1 stands in: it encodes
            # 2^-scale_bits in every slot, so the product is x * 2^-scale_bits, far below the
            # encryption noise, and the result keeps the level and scale of a true product.
            pt = self.encode(2.0**-self.params.scale_bits, self.level(ct))
        return self._apply("multiply_plain", self._evaluator.multiply_plain, ct.ct, pt)

    def multiply(self, a: SealCiphertext, b: SealCiphertext) -> SealCiphertext:
        if self._relin_keys is None:
            raise KeyError_("multiply needs relin_keys and none were generated or loaded")
        self._same_level(a.ct, b.ct, "multiply")
        product = self._apply("multiply", self._evaluator.multiply, a.ct, b.ct)
        self._evaluator.relinearize_inplace(product.ct, self._relin_keys)
        return product

    def rescale(self, ct: SealCiphertext) -> SealCiphertext:
        level = self.level(ct)
        self.check_level(level + 1, "rescale")
        expected = self._level_scales[level] ** 2
        if abs(ct.ct.scale / expected - 1) > 1e-9:
            raise CircuitError(
                f"rescale expects a product at scale 2^{np.log2(expected):.2f} and got "
                f"scale 2^{np.log2(ct.ct.scale):.2f}: rescale once after each product only"
            )
        out = self._apply("rescale", self._evaluator.rescale_to_next, ct.ct)
        out.ct.scale = self._level_scales[level + 1]  # equal up to the last bit of a double
        return out

    def drop_to_level(self, ct: SealCiphertext, level: int) -> SealCiphertext:
        current = self.level(ct)
        if level < current:
            raise CircuitError(f"cannot raise a ciphertext from level {current} to {level}")
        self.check_level(level, "drop_to_level")
        if level == current:
            return ct
        # Switching the modulus keeps the scale of the old level, and each level has its own
        # exact scale, so the last step is a product with 1 encoded at the scale that lands
        # on the new level's scale after the rescale: one plaintext product, no extra level.
        below = self._apply(
            "drop_to_level", self._evaluator.mod_switch_to, ct.ct, self._parms_ids[level - 1]
        )
        unit_scale = (
            self._level_scales[level]
            * self._dropped_prime(level - 1)
            / self._level_scales[current]
        )
        unit = sealapi.Plaintext()
        self._encoder.encode(1.0, self._parms_ids[level - 1], unit_scale, unit)
        product = self._apply("drop_to_level", self._evaluator.multiply_plain, below.ct, unit)
        out = self._apply("drop_to_level", self._evaluator.rescale_to_next, product.ct)
        out.ct.scale = self._level_scales[level]
        return out

    def rotate(self, ct: SealCiphertext, step: int) -> SealCiphertext:
        step = self.normalise_step(step)
        if step == 0:
            return ct
        if self._galois_keys is None or step not in self._steps:
            raise KeyError_(
                f"no Galois key for rotation step {step}: generate keys with this step"
            )
        # SEAL accepts steps in (-N/2, N/2); the normalised step is in [1, N/2).
        return self._apply("rotate", self._evaluator.rotate_vector, ct.ct, step, self._galois_keys)

    def _same_level(self, a: Any, b: Any, what: str) -> None:
        if a.parms_id() != b.parms_id():
            raise CircuitError(
                f"{what} of operands at levels {self._level_of(a.parms_id())} and "
                f"{self._level_of(b.parms_id())}: drop the higher one to the lower level first"
            )

    def _apply(self, what: str, operation: Callable[..., None], *args: Any) -> SealCiphertext:
        out = sealapi.Ciphertext()
        try:
            operation(*args, out)
        except (ValueError, RuntimeError) as exc:
            if "scale out of bounds" in str(exc):
                # A product at the last level: its scale no longer fits the first prime.
                raise LevelExhaustedError(
                    f"{what} at level {self._level_of(args[0].parms_id())} overflows "
                    f"the modulus (the chain has {self.params.depth} levels): compile with a "
                    f"larger depth or fewer multiplications"
                ) from exc
            if "transparent" in str(exc):
                raise CircuitError(
                    f"{what} gives exactly zero (its operands cancel) and SEAL refuses such a "
                    f"ciphertext, which would carry no encryption: drop the cancelling terms "
                    f"from the circuit"
                ) from exc
            raise CircuitError(f"SEAL refused {what}: {exc}") from exc
        return SealCiphertext(self, out)

    # -- serialisation ----------------------------------------------------------------

    def serialize_ciphertext(self, ct: SealCiphertext) -> bytes:
        if ct.seeded is not None:
            return ct.seeded
        return self._save_object(ct.ct)

    def load_ciphertext(self, data: bytes) -> SealCiphertext:
        limit = self.max_ciphertext_bytes()
        if len(data) > limit:
            raise MalformedPayloadError(
                f"a ciphertext of {len(data)} bytes exceeds the {limit} bytes that one of "
                f"this context can have"
            )
        # SEAL inflates a compressed body without bounding the output: a few kilobytes of
        # zstd can claim gigabytes. The inflated size is checked first, in bounded steps.
        _check_inflated_size(data, limit, "ciphertext")
        ct = self._checked_load(sealapi.Ciphertext(), data, "ciphertext")
        if ct.size() != 2:
            raise MalformedPayloadError(f"a ciphertext of size {ct.size()} is not relinearised")
        # Every ciphertext here is at its level's scale or, between a product and its
        # rescale, at its square; any other scale would decrypt to wrong values silently.
        level_scale = self._level_scales[self._level_of(ct.parms_id())]
        if ct.scale not in (level_scale, level_scale**2):
            raise ParameterMismatchError(
                f"a ciphertext at scale 2^{np.log2(ct.scale):.2f} does not fit this context's "
                f"scale 2^{np.log2(level_scale):.2f} at its level"
            )
        return SealCiphertext(self, ct)

    def max_ciphertext_bytes(self) -> int:
        # The largest valid ciphertext is a relinearised, non-seeded one at level 0: two
        # polynomials of N coefficients per data prime, 8 bytes each, plus the metadata,
        # then SEAL's own upper bound for the zstd frame around it.
        primes = len(self.params.coeff_modulus_bits) - 1
        raw = _CIPHERTEXT_OVERHEAD + 2 * self.params.poly_modulus_degree * primes * 8
        bound: int = sealapi.Serialization.ComprSizeEstimate(raw, sealapi.COMPR_MODE_TYPE.ZSTD)
        return _HEADER.size + max(bound, raw)

    @property
    def library_version(self) -> str:
        with self._version_lock:
            if self._version is None:
                header = self._save_object(self._context.key_context_data().parms())[:16]
                _, _, major, minor, _, _, _ = _HEADER.unpack(header)
                self._version = f"tenseal-{tenseal.__version__}/seal-{major}.{minor}"
        return self._version

    def _checked_load(self, target: _T, data: bytes, what: str) -> _T:
        """Load with SEAL's validating load, after checking the header's size field.

        Raises:
            MalformedPayloadError: the bytes are truncated, padded or do not parse.
            ParameterMismatchError: the object was made for other parameters.
        """
        if len(data) < _HEADER.size:
            raise MalformedPayloadError(f"{what} of {len(data)} bytes is shorter than a header")
        magic, header_size, _, _, compr_mode, _, size = _HEADER.unpack_from(data)
        if magic != _MAGIC or header_size != _HEADER.size:
            raise MalformedPayloadError(f"{what} does not start with a SEAL header")
        if size != len(data):
            raise MalformedPayloadError(
                f"{what} declares {size} bytes and the payload has {len(data)}"
            )
        try:
            loaded = self._load_object(target, data)
        except Exception as exc:  # SEAL raises ValueError, RuntimeError or OSError here
            parms_id = _leading_parms_id(data, compr_mode)
            if parms_id is not None and parms_id not in self._known_parms_ids:
                raise ParameterMismatchError(
                    f"{what} was made for other CKKS parameters than N="
                    f"{self.params.poly_modulus_degree}, chain "
                    f"{list(self.params.coeff_modulus_bits)}: use keys and ciphertexts of "
                    f"this context"
                ) from exc
            raise MalformedPayloadError(f"{what} is rejected by SEAL: {exc}") from exc
        # SEAL's load has run is_valid_for (metadata, coefficient ranges) already; the
        # metadata check again is cheap and keeps this safe if the bindings ever switch to
        # an unchecked load.
        if not sealapi.is_metadata_valid_for(loaded, self._context):
            raise MalformedPayloadError(f"{what} is not valid for this context")
        return loaded

    def _save_object(self, obj: Any) -> bytes:
        with _memory_file() as (fd, path):
            obj.save(path)
            return _read_all(fd)

    def _load_object(self, target: _T, data: bytes) -> _T:
        with _memory_file() as (fd, path):
            os.pwrite(fd, data, 0)
            target.load(self._context, path)  # type: ignore[attr-defined]
        return target


def _make_context(params: CkksParameters) -> sealapi.SEALContext:
    """A SEAL context for the parameters, with SEAL enforcing the same security table.

    Raises:
        ConfigurationError: SEAL cannot build the chain (too few primes of a size).
        InsecureParametersError: SEAL finds the chain too long for the security level.
    """
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(
            sealapi.CoeffModulus.Create(
                params.poly_modulus_degree, list(params.coeff_modulus_bits)
            )
        )
    except (ValueError, RuntimeError) as exc:
        raise ConfigurationError(
            f"SEAL cannot build the chain {list(params.coeff_modulus_bits)} for "
            f"N={params.poly_modulus_degree}: {exc}; use larger primes"
        ) from exc
    context = sealapi.SEALContext(parms, True, _SEC_LEVELS[params.security_level])
    if not context.parameters_set():
        message = context.parameters_error_message()
        if "security" in message:
            raise InsecureParametersError(
                f"SEAL refuses N={params.poly_modulus_degree} with "
                f"{params.total_bits} modulus bits at {params.security_level}-bit security: "
                f"{message}"
            )
        raise ConfigurationError(f"SEAL refuses the parameters {params.to_dict()}: {message}")
    return context


def _data_parms_ids(context: sealapi.SEALContext) -> list[list[int]]:
    """The parms_id of each level, level 0 (the top of the data chain) first."""
    ids = []
    data = context.first_context_data()
    while data is not None:
        ids.append(data.parms_id())
        data = data.next_context_data()
    return ids


def _check_inflated_size(data: bytes, limit: int, what: str) -> None:
    """Refuse a SEAL object whose compressed body inflates beyond ``limit`` bytes.

    Raises:
        MalformedPayloadError: the body inflates past the limit or is not a valid stream.
    """
    if len(data) < _HEADER.size:
        raise MalformedPayloadError(f"{what} of {len(data)} bytes is shorter than a header")
    compr_mode = _HEADER.unpack_from(data)[4]
    body = data[_HEADER.size :]
    total = 0
    try:
        if compr_mode == _COMPR_ZLIB:
            total = len(zlib.decompressobj().decompress(body, limit + 1))
        elif compr_mode == _COMPR_ZSTD and zstandard is not None:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
            while total <= limit:
                chunk = reader.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
        else:
            total = len(body)
    except Exception as exc:  # zlib.error, zstandard.ZstdError
        raise MalformedPayloadError(f"{what} is not a valid compressed stream: {exc}") from exc
    if total > limit:
        raise MalformedPayloadError(
            f"{what} inflates beyond the {limit} bytes that one of this context can have"
        )


def _leading_parms_id(data: bytes, compr_mode: int) -> tuple[int, ...] | None:
    """The parms_id at the start of a SEAL object's body, or None when it cannot be read."""
    body = data[_HEADER.size :]
    try:
        if compr_mode == _COMPR_ZSTD:
            if zstandard is None:
                return None
            head = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read(32)
        elif compr_mode == _COMPR_ZLIB:
            head = zlib.decompressobj().decompress(body, 64)
        elif compr_mode == _COMPR_NONE:
            head = body
        else:
            return None
    except Exception:  # zlib.error, zstandard.ZstdError: the bytes are not a frame at all
        return None
    if len(head) < 32:
        return None
    return struct.unpack_from("<4Q", head)


@contextmanager
def _memory_file() -> Iterator[tuple[int, str]]:
    """An empty in-memory file as (descriptor, path), one per call so threads never share."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("he-inference-seal", os.MFD_CLOEXEC)
        try:
            yield fd, f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=folder, prefix="he-inference-seal-") as handle:
        yield handle.fileno(), handle.name


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
