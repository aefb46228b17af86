"""Shared fixtures: backends by name, skipped where a library is missing, except in CI.

Set ``HE_INFERENCE_REQUIRE_BACKENDS=seal,openfhe`` (``.ci/run`` does) to turn a missing
backend into a failure, so that CI never passes with the OpenFHE tests silently skipped.
"""

from __future__ import annotations

import os

import pytest

from he_inference.backends import backend_class
from he_inference.errors import BackendUnavailableError

ALL_BACKENDS = ("plain", "seal", "openfhe")
REAL_BACKENDS = ("seal", "openfhe")


def _required() -> set[str]:
    value = os.environ.get("HE_INFERENCE_REQUIRE_BACKENDS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def require_backend(name: str) -> None:
    """Skip the calling test when the backend's library is missing (fail where required)."""
    try:
        backend_class(name)
    except BackendUnavailableError as exc:
        if name in _required():
            pytest.fail(f"backend {name} is required here and unavailable: {exc}")
        pytest.skip(str(exc))


def _params(names: tuple[str, ...]) -> list[object]:
    return [
        pytest.param(name, marks=getattr(pytest.mark, name), id=name)
        if name != "plain"
        else pytest.param(name, id=name)
        for name in names
    ]


@pytest.fixture(params=_params(ALL_BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend name in turn, skipped where its library is missing."""
    require_backend(request.param)
    return str(request.param)


@pytest.fixture(params=_params(REAL_BACKENDS))
def real_backend_name(request: pytest.FixtureRequest) -> str:
    """Each encrypting backend in turn, skipped where its library is missing."""
    require_backend(request.param)
    return str(request.param)
