"""Backend contexts with a client's evaluation keys loaded, cached per (model, key id).

Loading Galois keys costs about as much as a small evaluation (parsing and NTT-form checks
of tens of MB), and an :class:`~he_inference.evaluate.Evaluator` keeps the encoded diagonals
of every linear map, so both are built once per (model, key id) and shared by every request
that names that key. A least-recently-used bound keeps memory in check; an evicted context
is rebuilt from the key store on its next use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from he_inference import wire
from he_inference.backends import Backend, make_backend
from he_inference.errors import KeyError_, SecretKeyLeakError, UnknownKeyError
from he_inference.evaluate import Evaluator
from server.keystore import KeyStore
from server.registry import ServedModel

logger = logging.getLogger(__name__)


@dataclass
class LoadedKeys:
    """A server context holding one client's evaluation keys, and its evaluator."""

    backend: Backend
    evaluator: Evaluator


def load_context(model: ServedModel, keys: dict[str, bytes]) -> LoadedKeys:
    """A fresh context from the model's own parameters, with checked evaluation keys loaded.

    Raises:
        MalformedPayloadError: a key does not parse.
        ParameterMismatchError: a key was made for other parameters.
        SecretKeyLeakError: the context would be able to decrypt.
        KeyError_: the Galois keys lack steps the circuit rotates by.
    """
    backend = make_backend(model.template.name, model.circuit.params)
    backend.load_keys(keys)
    if backend.has_secret_key:
        raise SecretKeyLeakError(
            "the uploaded keys let the server decrypt: send only relin_keys and galois_keys"
        )
    needed = {backend.normalise_step(s) for s in model.circuit.rotation_steps} - {0}
    missing = sorted(needed - set(backend.rotation_steps))
    if missing:
        raise KeyError_(
            f"the Galois keys lack {len(missing)} rotation steps that model {model.name} uses "
            f"(first: {missing[:5]}): generate keys from this model's manifest"
        )
    return LoadedKeys(backend, Evaluator(model.circuit, backend))


class ContextCache:
    """At most ``capacity`` loaded contexts, least recently used dropped first."""

    def __init__(self, store: KeyStore, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._contexts: OrderedDict[tuple[str, str], LoadedKeys] = OrderedDict()
        store.on_remove(self.drop)

    def __len__(self) -> int:
        with self._lock:
            return len(self._contexts)

    def get(self, model: ServedModel, key_id: str) -> LoadedKeys:
        """The loaded context for these keys, built from the store on a miss.

        Raises:
            UnknownKeyError: the store holds no such keys.
            WireError, KeyError_: the stored keys no longer load (for example after the
                model's circuit changed).
        """
        key = (model.name, key_id)
        if not self.store.contains(*key):  # the store decides expiry, even for cached keys
            self.drop(*key)
            raise UnknownKeyError(
                f"no evaluation keys {key_id[:16]}... for model {model.name} (never uploaded, "
                f"evicted or expired): upload the evaluation keys again"
            )
        with self._lock:
            loaded = self._contexts.get(key)
            if loaded is not None:
                self._contexts.move_to_end(key)
                return loaded
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key, however many requests wait on it
            with self._lock:
                loaded = self._contexts.get(key)
            if loaded is not None:
                return loaded
            data = self.store.read(*key)
            start = time.perf_counter()
            loaded = load_context(model, wire.decode_evaluation_keys(model.template, data))
            logger.info(
                "loaded keys %s of model %s in %.2f s",
                key_id[:12],
                model.name,
                time.perf_counter() - start,
            )
            self.put(model.name, key_id, loaded)
        with self._lock:
            self._loading.pop(key, None)
        return loaded

    def put(self, model_name: str, key_id: str, loaded: LoadedKeys) -> None:
        """Keep a loaded context, dropping the least recently used beyond the capacity."""
        with self._lock:
            self._contexts[(model_name, key_id)] = loaded
            self._contexts.move_to_end((model_name, key_id))
            while len(self._contexts) > self.capacity:
                self._contexts.popitem(last=False)

    def drop(self, model_name: str, key_id: str) -> None:
        """Forget a loaded context (its keys were evicted, expired or deleted)."""
        with self._lock:
            self._contexts.pop((model_name, key_id), None)
