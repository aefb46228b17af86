"""The one exception tree of he-inference.

Every error that the library raises on purpose derives from :class:`HEInferenceError`, so
a caller can catch one class, and the server maps each class to one HTTP status in one
place (``server/errors.py``)::

    HEInferenceError
    ├── ConfigurationError          a setting or option is wrong or unsupported
    │   ├── InsecureParametersError     parameters weaker than the security level asked for
    │   └── BackendUnavailableError     the backend's library is not installed here
    ├── ModelError                  the ONNX model cannot be compiled
    │   ├── InvalidModelError           not ONNX, truncated, fails the checker, bad inputs
    │   └── UnsupportedModelError       unsupported operators or patterns (all listed)
    ├── CircuitError                a circuit file is malformed or does not fit
    │   ├── FormatVersionError          written by an incompatible format version
    │   └── LevelExhaustedError         an operation needs a level the chain does not have
    ├── WireError                   a wire envelope or serialised object is rejected
    │   ├── MalformedPayloadError       truncated, altered, oversized or unparsable bytes
    │   └── ParameterMismatchError      made for other parameters, backend or model
    ├── KeyError_                   evaluation keys are missing, invalid or refused
    │   ├── UnknownKeyError             no keys are stored under the given key id
    │   └── SecretKeyLeakError          an upload holds a secret key (refused)
    ├── InputError                  a query does not match the model's manifest
    ├── ServiceError                the server refused or failed a request
    │   ├── OverloadedError             the evaluation queue is full; retry later
    │   └── PartialResultError          (client.model) a predict stopped part-way; holds
    │                                   the answers it got
    └── StorageError                the key store or model folder cannot be written or read

``KeyError_`` carries a trailing underscore so that it never shadows the builtin.
"""

from __future__ import annotations


class HEInferenceError(Exception):
    """Base class of every error raised by he-inference on purpose."""


class ConfigurationError(HEInferenceError):
    """A setting or option is wrong or unsupported."""


class InsecureParametersError(ConfigurationError):
    """The CKKS parameters fall below the security level asked for."""


class BackendUnavailableError(ConfigurationError):
    """The backend's library is not installed or cannot be imported here."""


class ModelError(HEInferenceError):
    """The ONNX model cannot be compiled."""


class InvalidModelError(ModelError):
    """The file is not a valid ONNX model for inference (bad bytes, inputs or outputs)."""


class UnsupportedModelError(ModelError):
    """The model uses operators or patterns that the compiler cannot lower."""


class CircuitError(HEInferenceError):
    """A circuit file is malformed or does not fit the operation asked for."""


class FormatVersionError(CircuitError):
    """A file was written by an incompatible format version."""


class LevelExhaustedError(CircuitError):
    """An operation needs a multiplicative level that the modulus chain does not have."""


class WireError(HEInferenceError):
    """A wire envelope or a serialised object is rejected."""


class MalformedPayloadError(WireError):
    """Bytes are truncated, altered, oversized or cannot be parsed."""


class ParameterMismatchError(WireError):
    """A payload was made for other parameters, another backend or another model."""


class KeyError_(HEInferenceError):  # noqa: N801 - trailing underscore avoids the builtin
    """Evaluation keys are missing, invalid or refused."""


class UnknownKeyError(KeyError_):
    """No evaluation keys are stored under the given key id."""


class SecretKeyLeakError(KeyError_):
    """An upload holds a secret key, which must never leave the client."""


class InputError(HEInferenceError):
    """A query does not match the model's manifest (shape, dtype, values, range)."""


class ServiceError(HEInferenceError):
    """The server refused or failed a request."""

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(message)
        self.status_code = status_code


class OverloadedError(ServiceError):
    """The evaluation queue is full; the request may be retried later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, status_code=503)
        self.retry_after_s = retry_after_s


class StorageError(HEInferenceError):
    """The key store or the model folder cannot be written or read."""
