"""Backend registry: the crypto libraries are imported here, lazily, and nowhere else."""

from __future__ import annotations

import importlib

from he_inference.backends.base import EVALUATION_KEY_KINDS, KEY_KINDS, Backend
from he_inference.errors import BackendUnavailableError, ConfigurationError
from he_inference.params import CkksParameters

__all__ = [
    "BACKENDS",
    "EVALUATION_KEY_KINDS",
    "KEY_KINDS",
    "Backend",
    "available_backends",
    "backend_class",
    "make_backend",
]

# name -> (module, class, how to install it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "plain": ("he_inference.backends.plain", "PlainBackend", "it needs only numpy"),
    "seal": ("he_inference.backends.seal", "SealBackend", "pip install tenseal"),
    "openfhe": (
        "he_inference.backends.openfhe",
        "OpenFheBackend",
        "pip install 'he-inference[openfhe]' on CPython 3.10 (the only interpreter the "
        "openfhe wheel supports)",
    ),
}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``.

    Raises:
        ConfigurationError: no backend has that name.
        BackendUnavailableError: its library is not installed or does not import here.
    """
    if name not in BACKENDS:
        raise ConfigurationError(
            f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}"
        )
    module_name, class_name, install = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {name} backend is unavailable here ({exc}): {install}"
        ) from exc
    cls: type[Backend] = getattr(module, class_name)
    return cls


def make_backend(name: str, params: CkksParameters, **options: object) -> Backend:
    """A fresh context of the named backend for these parameters."""
    return backend_class(name)(params, **options)


def available_backends() -> list[str]:
    """The names of the backends whose libraries import here."""
    names = []
    for name in BACKENDS:
        try:
            backend_class(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names
