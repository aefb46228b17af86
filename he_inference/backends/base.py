"""The backend contract: what the evaluator, the client and the server ask of a CKKS library.

Ciphertexts and plaintexts are opaque handles owned by the backend that made them. Levels
count rescales from the top of the chain: a fresh ciphertext is at level 0 and the last
usable level is ``params.depth``. Products (``multiply_plain``, ``multiply``) do not rescale:
the evaluator sums products first and rescales once per sum, which costs one level per
linear map instead of one per term.

Rotation is to the left: ``rotate(ct, k)[t] == ct[(t + k) % slots]``, so a negative step
rotates to the right. A rotation needs a Galois key for its step, generated on the client
by :meth:`Backend.generate_keys` for exactly the steps the circuit lists.

Key kinds, as carried on the wire: ``secret_key`` (never leaves the client), ``public_key``,
``relin_keys`` and ``galois_keys``. The evaluation keys are the last two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from he_inference.errors import LevelExhaustedError
from he_inference.params import CkksParameters

EVALUATION_KEY_KINDS = ("relin_keys", "galois_keys")
KEY_KINDS = ("secret_key", "public_key", *EVALUATION_KEY_KINDS)

Ciphertext = Any
Plaintext = Any


class Backend(ABC):
    """One CKKS context with its keys, over one library."""

    name: ClassVar[str]
    #: Whether :meth:`rotate_many` shares one key-switch decomposition across steps.
    supports_hoisting: ClassVar[bool] = False
    #: Whether :meth:`evaluate_chebyshev` runs the library's own series evaluation.
    supports_chebyshev: ClassVar[bool] = False

    def __init__(self, params: CkksParameters) -> None:
        self.params = params

    # -- keys -------------------------------------------------------------------------

    @abstractmethod
    def generate_keys(self, rotation_steps: Sequence[int]) -> None:
        """Generate secret, public, relinearisation and Galois keys for exactly these steps."""

    @property
    @abstractmethod
    def has_secret_key(self) -> bool:
        """Whether this context can decrypt (the client's) or not (the server's)."""

    @property
    @abstractmethod
    def rotation_steps(self) -> tuple[int, ...]:
        """The rotation steps that Galois keys are loaded for, normalised to [0, slots)."""

    @abstractmethod
    def serialize_keys(self, kinds: Sequence[str] = EVALUATION_KEY_KINDS) -> dict[str, bytes]:
        """Serialise the named key kinds; the default is the evaluation keys only.

        Raises:
            KeyError_: a kind is unknown or its key was never generated or loaded.
        """

    @abstractmethod
    def load_keys(self, keys: dict[str, bytes]) -> None:
        """Load serialised keys, each checked against this context.

        Raises:
            MalformedPayloadError: the bytes do not parse as that kind of key.
            ParameterMismatchError: the key was made for other parameters.
        """

    # -- data -------------------------------------------------------------------------

    @abstractmethod
    def encode(self, values: np.ndarray | float, level: int = 0) -> Plaintext:
        """Encode real values (zero-padded to the slots) or a constant at a level, at scale."""

    @abstractmethod
    def encrypt(self, values: np.ndarray) -> Ciphertext:
        """Encrypt real values at level 0; symmetric (seeded) when the secret key is here."""

    @abstractmethod
    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        """Decrypt to ``slots`` real float64 values.

        Raises:
            KeyError_: this context holds no secret key.
        """

    @abstractmethod
    def level(self, ct: Ciphertext) -> int:
        """Rescales consumed so far by this ciphertext (0 when fresh)."""

    # -- arithmetic ---------------------------------------------------------------------

    @abstractmethod
    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """a + b; both at the same level and scale."""

    @abstractmethod
    def sub(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """a - b; both at the same level and scale."""

    @abstractmethod
    def negate(self, a: Ciphertext) -> Ciphertext:
        """-a."""

    @abstractmethod
    def add_plain(self, ct: Ciphertext, pt: Plaintext) -> Ciphertext:
        """ct + pt; pt encoded at the ciphertext's level and scale."""

    @abstractmethod
    def multiply_plain(self, ct: Ciphertext, pt: Plaintext) -> Ciphertext:
        """ct * pt without rescaling; pt encoded at the ciphertext's level."""

    @abstractmethod
    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """a * b relinearised, without rescaling; both at the same level."""

    @abstractmethod
    def rescale(self, ct: Ciphertext) -> Ciphertext:
        """Divide by the next prime: one level down, scale back to 2^scale_bits.

        Raises:
            LevelExhaustedError: the ciphertext is already at the last level.
        """

    @abstractmethod
    def drop_to_level(self, ct: Ciphertext, level: int) -> Ciphertext:
        """Switch to a lower level without changing the value (no noise, no scale change)."""

    @abstractmethod
    def rotate(self, ct: Ciphertext, step: int) -> Ciphertext:
        """Rotate left by ``step`` slots (negative: right).

        Raises:
            KeyError_: no Galois key was loaded for this step.
        """

    def rotate_many(self, ct: Ciphertext, steps: Sequence[int]) -> dict[int, Ciphertext]:
        """Rotations of one ciphertext by several steps; hoisted where the backend can."""
        return {
            step: (ct if step % self.params.slots == 0 else self.rotate(ct, step))
            for step in steps
        }

    def evaluate_chebyshev(
        self, ct: Ciphertext, coefficients: np.ndarray, lower: float, upper: float
    ) -> Ciphertext:
        """Evaluate a Chebyshev series on [lower, upper] with the library's own routine."""
        raise NotImplementedError(f"the {self.name} backend has no native Chebyshev series")

    # -- serialisation ----------------------------------------------------------------

    @abstractmethod
    def serialize_ciphertext(self, ct: Ciphertext) -> bytes:
        """Serialise one ciphertext (seeded where it was symmetrically encrypted)."""

    @abstractmethod
    def load_ciphertext(self, data: bytes) -> Ciphertext:
        """Load one ciphertext, checked against this context.

        Raises:
            MalformedPayloadError: the bytes do not parse as a ciphertext.
            ParameterMismatchError: it was made for other parameters.
        """

    @abstractmethod
    def max_ciphertext_bytes(self) -> int:
        """The largest serialised size a valid ciphertext of this context can have."""

    @property
    def library_version(self) -> str:
        """Version of the underlying library, written into wire headers."""
        return "unknown"

    # -- helpers shared by every backend -------------------------------------------------

    def check_level(self, level: int, what: str) -> None:
        """Raise when ``level`` is past the end of the chain.

        Raises:
            LevelExhaustedError: the level is beyond ``params.depth``.
        """
        if level > self.params.depth:
            raise LevelExhaustedError(
                f"{what} needs level {level} and the modulus chain has {self.params.depth} "
                f"levels: compile with a larger depth (ring degree) or fewer multiplications"
            )

    def pad(self, values: np.ndarray | Sequence[float]) -> np.ndarray:
        """Zero-pad real values to the slot count.

        Raises:
            InputError: there are more values than slots.
        """
        from he_inference.errors import InputError

        arr = np.asarray(values, dtype=np.float64).ravel()
        if arr.size > self.params.slots:
            raise InputError(f"{arr.size} values do not fit in {self.params.slots} slots")
        out = np.zeros(self.params.slots)
        out[: arr.size] = arr
        return out

    def normalise_step(self, step: int) -> int:
        """A rotation step as the equivalent left rotation in [0, slots)."""
        return step % self.params.slots
