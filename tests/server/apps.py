"""Apps over small hand-built circuits on the plain backend, for the server and SDK tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from he_inference.circuit import Circuit
from server import Settings, create_app
from tests.he_inference.circuits import mlp_circuit

with warnings.catch_warnings():
    # Starlette's TestClient announces a future move to httpx2, which changes nothing here.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

MODEL = "mlp"
OTHER = "other"


def write_models(models_dir: Path) -> dict[str, tuple[Circuit, dict[str, np.ndarray]]]:
    """Two circuits: ``mlp`` and ``other`` (another depth, so other CKKS parameters)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    mlp = mlp_circuit(np.random.default_rng(11))
    other = mlp_circuit(np.random.default_rng(12), degree=3)
    other[0].name = OTHER
    mlp[0].save(models_dir / f"{MODEL}.hec")
    other[0].save(models_dir / f"{OTHER}.hec")
    return {MODEL: mlp, OTHER: other}


def settings(root: Path, **overrides: Any) -> Settings:
    """Plain-backend settings over ``root/models`` and ``root/keys``."""
    values: dict[str, Any] = {
        "models_dir": root / "models",
        "key_store_dir": root / "keys",
        "backend": "plain",
        "max_concurrency": 1,
        "max_queue": 2,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def serve(root: Path, **overrides: Any) -> Iterator[TestClient]:
    """A TestClient over a fresh app (server errors come back as responses, not raises)."""
    app = create_app(settings(root, **overrides))
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http
