"""numpy with CKKS slot semantics and no encryption, for compiler tests and simulation.

It keeps every rule a real backend enforces (levels, Galois keys per step, level
alignment) so that a circuit which runs here runs on SEAL and OpenFHE too, and it is exact,
so packing bugs show as wrong numbers rather than noise. It never stands in for a real
backend in a test that claims encryption.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from he_inference.backends.base import EVALUATION_KEY_KINDS, Backend
from he_inference.errors import (
    CircuitError,
    KeyError_,
    MalformedPayloadError,
    ParameterMismatchError,
)
from he_inference.params import CkksParameters

_MAGIC = b"PLN1"


@dataclass
class PlainCiphertext:
    """Slot values with a level, standing in for a ciphertext."""

    values: np.ndarray
    level: int


@dataclass
class PlainPlaintext:
    """Slot values encoded for a level."""

    values: np.ndarray
    level: int


class PlainBackend(Backend):
    """Unencrypted reference backend with the same slot semantics as CKKS."""

    name = "plain"

    def __init__(self, params: CkksParameters) -> None:
        super().__init__(params)
        self._steps: set[int] = set()
        self._has_keys = False
        self._secret = False

    # -- keys -------------------------------------------------------------------------

    def generate_keys(self, rotation_steps: Sequence[int]) -> None:
        self._steps = {self.normalise_step(s) for s in rotation_steps} - {0}
        self._has_keys = True
        self._secret = True

    @property
    def has_secret_key(self) -> bool:
        return self._secret

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        return tuple(sorted(self._steps))

    def serialize_keys(self, kinds: Sequence[str] = EVALUATION_KEY_KINDS) -> dict[str, bytes]:
        if not self._has_keys:
            raise KeyError_("no keys were generated or loaded in this plain context")
        out: dict[str, bytes] = {}
        for kind in kinds:
            if kind == "galois_keys":
                steps = sorted(self._steps)
                out[kind] = _MAGIC + struct.pack(f"<I{len(steps)}I", len(steps), *steps)
            elif kind in ("relin_keys", "public_key") or (kind == "secret_key" and self._secret):
                out[kind] = _MAGIC + kind.encode()
            else:
                raise KeyError_(f"the plain context holds no {kind}")
        return out

    def load_keys(self, keys: dict[str, bytes]) -> None:
        for kind, data in keys.items():
            if not data.startswith(_MAGIC):
                raise MalformedPayloadError(f"{kind} is not a plain-backend key")
            body = data[len(_MAGIC) :]
            if kind == "galois_keys":
                if len(body) < 4:
                    raise MalformedPayloadError("truncated plain galois_keys")
                (count,) = struct.unpack_from("<I", body)
                if len(body) != 4 + 4 * count:
                    raise MalformedPayloadError("plain galois_keys have the wrong length")
                self._steps = set(struct.unpack_from(f"<{count}I", body, 4))
            elif body != kind.encode():
                raise MalformedPayloadError(f"{kind} does not hold a plain {kind}")
            if kind == "secret_key":
                self._secret = True
        self._has_keys = True

    # -- data -------------------------------------------------------------------------

    def encode(self, values: np.ndarray | float, level: int = 0) -> PlainPlaintext:
        self.check_level(level, "encoding")
        if np.ndim(values) == 0:
            return PlainPlaintext(np.full(self.params.slots, float(values)), level)
        return PlainPlaintext(self.pad(values), level)  # type: ignore[arg-type]

    def encrypt(self, values: np.ndarray) -> PlainCiphertext:
        return PlainCiphertext(self.pad(values), 0)

    def decrypt(self, ct: PlainCiphertext) -> np.ndarray:
        if not self._secret:
            raise KeyError_("this context holds no secret key and cannot decrypt")
        return ct.values.copy()

    def level(self, ct: PlainCiphertext) -> int:
        return ct.level

    # -- arithmetic ---------------------------------------------------------------------

    def _same_level(
        self, a: PlainCiphertext | PlainPlaintext, b: PlainCiphertext | PlainPlaintext, what: str
    ) -> None:
        if a.level != b.level:
            raise CircuitError(f"{what} of operands at levels {a.level} and {b.level}")

    def add(self, a: PlainCiphertext, b: PlainCiphertext) -> PlainCiphertext:
        self._same_level(a, b, "add")
        return PlainCiphertext(a.values + b.values, a.level)

    def sub(self, a: PlainCiphertext, b: PlainCiphertext) -> PlainCiphertext:
        self._same_level(a, b, "sub")
        return PlainCiphertext(a.values - b.values, a.level)

    def negate(self, a: PlainCiphertext) -> PlainCiphertext:
        return PlainCiphertext(-a.values, a.level)

    def add_plain(self, ct: PlainCiphertext, pt: PlainPlaintext) -> PlainCiphertext:
        self._same_level(ct, pt, "add_plain")
        return PlainCiphertext(ct.values + pt.values, ct.level)

    def multiply_plain(self, ct: PlainCiphertext, pt: PlainPlaintext) -> PlainCiphertext:
        self._same_level(ct, pt, "multiply_plain")
        return PlainCiphertext(ct.values * pt.values, ct.level)

    def multiply(self, a: PlainCiphertext, b: PlainCiphertext) -> PlainCiphertext:
        self._same_level(a, b, "multiply")
        return PlainCiphertext(a.values * b.values, a.level)

    def rescale(self, ct: PlainCiphertext) -> PlainCiphertext:
        self.check_level(ct.level + 1, "rescale")
        return PlainCiphertext(ct.values, ct.level + 1)

    def drop_to_level(self, ct: PlainCiphertext, level: int) -> PlainCiphertext:
        if level < ct.level:
            raise CircuitError(f"cannot raise a ciphertext from level {ct.level} to {level}")
        self.check_level(level, "drop_to_level")
        return PlainCiphertext(ct.values, level)

    def rotate(self, ct: PlainCiphertext, step: int) -> PlainCiphertext:
        step = self.normalise_step(step)
        if step == 0:
            return ct
        if step not in self._steps:
            raise KeyError_(f"no Galois key for rotation step {step}")
        return PlainCiphertext(np.roll(ct.values, -step), ct.level)

    # -- serialisation ----------------------------------------------------------------

    def serialize_ciphertext(self, ct: PlainCiphertext) -> bytes:
        return _MAGIC + struct.pack("<II", ct.level, ct.values.size) + ct.values.tobytes()

    def load_ciphertext(self, data: bytes) -> PlainCiphertext:
        if len(data) < 12 or not data.startswith(_MAGIC):
            raise MalformedPayloadError("not a plain-backend ciphertext")
        level, size = struct.unpack_from("<II", data, 4)
        if size != self.params.slots:
            raise ParameterMismatchError(
                f"ciphertext has {size} slots and this context {self.params.slots}"
            )
        if len(data) != 12 + 8 * size:
            raise MalformedPayloadError("plain ciphertext has the wrong length")
        self.check_level(level, "loading a ciphertext")
        return PlainCiphertext(np.frombuffer(data, np.float64, size, 12).copy(), level)

    def max_ciphertext_bytes(self) -> int:
        return 12 + 8 * self.params.slots

    @property
    def library_version(self) -> str:
        return f"numpy-{np.__version__}"
