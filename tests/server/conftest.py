"""Fixtures of the server tests: a models folder with two small circuits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from he_inference.circuit import Circuit
from tests.server.apps import write_models


@pytest.fixture
def models(tmp_path: Path) -> dict[str, tuple[Circuit, dict[str, np.ndarray]]]:
    """The circuits written to ``tmp_path/models``, with their reference weights."""
    return write_models(tmp_path / "models")
