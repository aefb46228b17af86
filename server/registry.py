"""The model registry: every circuit file of the models folder, loaded once at start.

A model's name is the circuit's own name, or the file stem when the circuit has none. Names
become folder names in the key store, so only ``[A-Za-z0-9._-]`` names are served; a file
that fails to load is skipped with a warning, so one bad file does not take the others down.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_inference.backends import Backend, make_backend
from he_inference.circuit import Circuit
from he_inference.errors import HEInferenceError, ServiceError

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ServedModel:
    """One circuit as the server serves it.

    Attributes:
        name: the name clients address it by.
        circuit: the circuit with its weights (never sent).
        manifest: the public manifest, plus the backend the server evaluates on.
        template: a keyless context from the circuit's own parameters, which checks
            uploads (keys, ciphertexts) against them before anything is loaded.
        path: the circuit file.
    """

    name: str
    circuit: Circuit
    manifest: dict[str, Any]
    template: Backend
    path: Path


class ModelRegistry:
    """The models a server serves, by name."""

    def __init__(self, backend_name: str) -> None:
        self.backend_name = backend_name
        self.models: dict[str, ServedModel] = {}

    def load_dir(self, models_dir: Path) -> int:
        """Load every ``*.hec`` file of a folder; returns the number of models loaded."""
        if not models_dir.is_dir():
            logger.warning("models folder %s does not exist: no model is served", models_dir)
            return 0
        for path in sorted(models_dir.glob("*.hec")):
            try:
                self.add(Circuit.load(path), path)
            except HEInferenceError as exc:
                logger.warning("skipping circuit file %s: %s", path, exc)
        return len(self.models)

    def add(self, circuit: Circuit, path: Path) -> ServedModel:
        """Serve one circuit.

        Raises:
            ServiceError: the name is not usable or is already taken by another file.
            ConfigurationError: the circuit was compiled for another backend.
            BackendUnavailableError: the server's backend library is missing.
        """
        name = circuit.name or path.stem
        circuit.check_backend(self.backend_name)
        if not MODEL_NAME.match(name):
            raise ServiceError(
                f"model name {name!r} must be 1-128 characters of letters, digits, '.', '_' "
                f"or '-': rename the circuit or its file"
            )
        if name in self.models:
            raise ServiceError(
                f"model {name!r} of {path} is already served from {self.models[name].path}"
            )
        # The server's contexts come from the circuit's own parameters, never from a client.
        template = make_backend(self.backend_name, circuit.params)
        manifest = circuit.manifest()
        manifest["name"] = name
        manifest["backend"] = self.backend_name
        served = ServedModel(name, circuit, manifest, template, path)
        self.models[name] = served
        logger.info(
            "serving model %s from %s: N=%d, depth %d, %d rotation steps, %d input ciphertexts",
            name,
            path.name,
            circuit.params.poly_modulus_degree,
            circuit.depth,
            len(circuit.rotation_steps),
            circuit.input_layout.chunks,
        )
        return served

    def get(self, name: str) -> ServedModel:
        """The model served under ``name``.

        Raises:
            ServiceError: (404) no model has that name.
        """
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ServiceError(f"unknown model {name!r}; served models: {known}", 404)
        return model

    def summaries(self) -> list[dict[str, Any]]:
        """One short entry per model, for the listing endpoint."""
        return [
            {
                "name": m.name,
                "backend": self.backend_name,
                "params_fingerprint": m.circuit.params.fingerprint(),
                "poly_modulus_degree": m.circuit.params.poly_modulus_degree,
                "depth": m.circuit.depth,
                "input_shape": list(m.circuit.input_layout.shape),
                "output_shape": list(m.circuit.output_layout.shape),
            }
            for m in self.models.values()
        ]
