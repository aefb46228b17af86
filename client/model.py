"""A handle on one served model: keys, encryption, the query round trip and decryption.

Everything the handle knows about the model comes from its public manifest: the CKKS
parameters, the slot layouts, the rotation steps to make Galois keys for, the calibrated
input range and the post-processing. The backend is the one the server names, because a
ciphertext only loads into the library that wrote it; it must be installed here too. The
parameters of an OpenFHE circuit also carry its noise-flooding estimate, and the client's
context is built from them, so its decryption floods with exactly the server's settings.

A query moves as: check -> pack per the input layout -> encrypt (symmetric, seeded where
the backend can, which halves the upload) -> envelope -> POST -> envelope -> decrypt ->
unpack per the output layout -> post-process. Up to ``layout.batch`` queries share one
ciphertext set, so a batch of ``n`` costs ``ceil(n / batch)`` round trips.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from client.inputs import check_output, check_queries, postprocess
from client.keys import SECRET_FILES, KeyFolder, KeyRecord
from he_inference import wire
from he_inference.backends import Backend, make_backend
from he_inference.circuit import Layout
from he_inference.errors import HEInferenceError, InputError, ServiceError, UnknownKeyError
from he_inference.params import CkksParameters

if TYPE_CHECKING:
    from client.client import Client

logger = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
# Show the spinner only when key generation is still running after this long.
SPINNER_DELAY_S = 1.0


class PartialResultError(ServiceError):
    """Some round trips of a :meth:`Model.predict` were answered before one failed.

    Attributes:
        completed: the post-processed results of the first ``answered`` queries, shaped
            as :meth:`Model.predict` would have returned them for those queries.
        answered: how many queries have results.
        total: how many queries were asked for.
        cause: the error that stopped the rest (also ``__cause__``).
    """

    def __init__(
        self, cause: HEInferenceError, completed: np.ndarray, answered: int, total: int
    ) -> None:
        status = cause.status_code if isinstance(cause, ServiceError) else 500
        super().__init__(
            f"{cause} (only the first {answered} of {total} queries were answered)",
            status_code=status,
        )
        self.cause, self.completed, self.answered, self.total = cause, completed, answered, total


@dataclass
class KeyInfo:
    """How the handle got its keys."""

    key_id: str
    generated: bool
    seconds: float
    evaluation_key_bytes: int


@dataclass
class QueryStats:
    """Sizes and times of one round trip (one ciphertext set, up to ``batch`` queries)."""

    queries: int
    request_bytes: int
    response_bytes: int
    latency_s: float
    eval_seconds: float
    timings: list[dict[str, Any]] = field(default_factory=list)


class Model:
    """One model of a server, as its manifest describes it."""

    def __init__(self, client: Client, manifest: dict[str, Any]) -> None:
        self.client = client
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.backend_name: str = manifest["backend"]
        self.params = CkksParameters.from_dict(manifest["params"])
        self.input_layout = Layout.from_dict(manifest["input"]["layout"])
        self.output_layout = Layout.from_dict(manifest["output"]["layout"])
        self.rotation_steps = tuple(int(s) for s in manifest["rotation_steps"])
        self.postprocess: list[dict[str, Any]] = list(manifest.get("postprocess") or [])
        rng = manifest.get("input_range")
        self.input_range = (float(rng[0]), float(rng[1])) if rng else None
        self.folder = KeyFolder(client.key_dir, self.name, self.params.fingerprint())
        self.last_stats: list[QueryStats] = []
        self._backend: Backend | None = None
        self._envelope: bytes | None = None
        self._record: KeyRecord | None = None
        if self.backend_name == "openfhe" and not self.noise_flooding:
            logger.warning(
                "model %s decrypts without noise flooding (compiled with it off, or before "
                "it existed): do not share its decrypted outputs at full precision",
                self.name,
            )

    @property
    def noise_flooding(self) -> bool:
        """Whether results of this model decrypt with noise flooding (OpenFHE circuits)."""
        return self.params.noise_flooding is not None

    @property
    def key_id(self) -> str | None:
        """The id of this handle's evaluation keys, once they exist."""
        return self._record.key_id if self._record else None

    # -- keys -------------------------------------------------------------------------

    def generate_keys(self, force: bool = False) -> KeyInfo:
        """Make keys for this model, or load the ones saved for its parameters.

        The secret key is saved owner-only in the key folder and never sent. Saved keys
        are reused unless ``force``, or unless they were made for another backend or
        other rotation steps.

        Raises:
            BackendUnavailableError: the server's backend library is not installed here.
            StorageError: the key folder cannot be read or written.
        """
        start = time.perf_counter()
        if not force and self.folder.exists():
            secret, envelope, record = self.folder.load()
            if record.backend == self.backend_name and record.rotation_steps == list(
                self.rotation_steps
            ):
                backend = make_backend(self.backend_name, self.params)
                backend.load_keys(secret)
                self._backend, self._envelope, self._record = backend, envelope, record
                return KeyInfo(record.key_id, False, time.perf_counter() - start, len(envelope))
            logger.info(
                "saved keys in %s are for other steps or backend: new keys", self.folder.path
            )

        backend = make_backend(self.backend_name, self.params)
        with self._spinner():
            backend.generate_keys(self.rotation_steps)
            envelope = wire.encode_evaluation_keys(backend)
            secret = backend.serialize_keys(SECRET_FILES)
        record = KeyRecord(self.backend_name, list(self.rotation_steps), wire.key_id(envelope))
        self.folder.save(secret, envelope, record)
        seconds = time.perf_counter() - start
        logger.info(
            "generated keys %s for %s in %.2f s: %d evaluation-key bytes",
            record.key_id[:12],
            self.name,
            seconds,
            len(envelope),
        )
        self._backend, self._envelope, self._record = backend, envelope, record
        return KeyInfo(record.key_id, True, seconds, len(envelope))

    def upload_keys(self, force: bool = False) -> str:
        """Send the evaluation keys (once per server unless ``force``); returns the key id.

        Raises:
            ServiceError: the server computed another key id for the same bytes.
            HEInferenceError: the server refused the keys (the class it names).
        """
        _, envelope, record = self._keys()
        if not force and self.client.url in record.uploaded_to:
            return record.key_id
        response = self.client.request(
            "POST",
            f"/v1/models/{self.name}/keys",
            content=envelope,
            headers={"content-type": OCTET_STREAM},
        )
        returned = response.json()["key_id"]
        if returned != record.key_id:
            raise ServiceError(
                f"the server stored the keys as {returned[:16]}... and their hash is "
                f"{record.key_id[:16]}...: the upload was altered on the way"
            )
        if self.client.url not in record.uploaded_to:
            record.uploaded_to.append(self.client.url)
            self.folder.save_record(record)
        logger.info(
            "uploaded keys %s for %s: %d bytes", record.key_id[:12], self.name, len(envelope)
        )
        return record.key_id

    def delete_keys(self) -> None:
        """Ask the server to forget this handle's evaluation keys."""
        if self._record is None:
            return
        self.client.request("DELETE", f"/v1/models/{self.name}/keys/{self._record.key_id}")
        if self.client.url in self._record.uploaded_to:
            self._record.uploaded_to.remove(self.client.url)
            self.folder.save_record(self._record)

    # -- queries ----------------------------------------------------------------------

    def predict(
        self, x: Any, output: str = "logits", allow_out_of_range: bool = False
    ) -> np.ndarray:
        """Encrypted inference on one query ``[*shape]`` or a batch ``[n, *shape]``.

        Args:
            x: the queries, checked against the manifest before anything is encrypted.
            output: ``logits`` (decrypted outputs), ``probabilities`` (softmax) or
                ``labels`` (argmax), along the manifest's post-processing axis; ``auto``
                for what the ONNX model itself ended in.
            allow_out_of_range: log a warning instead of refusing values outside the
                calibrated input range.

        Raises:
            InputError: the queries do not fit the manifest, or ``output`` is unknown.
            PartialResultError: a later round trip failed after earlier ones were answered;
                it carries their results (``completed``) and the error (``cause``).
            HEInferenceError: the server refused the first round trip (the class it names).
        """
        check_output(output)
        queries, form = check_queries(
            x, self.input_layout, self.input_range, allow_out_of_range=allow_out_of_range
        )
        self.upload_keys()
        per_set = self.input_layout.batch
        self.last_stats = []
        results: list[np.ndarray] = []
        for start in range(0, len(queries), per_set):
            group = queries[start : start + per_set]
            try:
                results.append(self._round_trip(group)[: len(group)])
            except HEInferenceError as exc:
                if not results:
                    raise
                # A 429 when a token's budget runs out mid-way must not lose the answers
                # already paid for: they come back with the error.
                done = np.concatenate(results)
                completed = postprocess(
                    done, self.output_layout.shape, form, self.postprocess, output
                )
                raise PartialResultError(exc, completed, len(done), len(queries)) from exc
        outputs = np.concatenate(results)
        return postprocess(outputs, self.output_layout.shape, form, self.postprocess, output)

    def predict_proba(self, x: Any, **kwargs: Any) -> np.ndarray:
        """:meth:`predict` with ``output="probabilities"``."""
        return self.predict(x, output="probabilities", **kwargs)

    def predict_label(self, x: Any, **kwargs: Any) -> np.ndarray:
        """:meth:`predict` with ``output="labels"``."""
        return self.predict(x, output="labels", **kwargs)

    def encrypt(self, x: Any, allow_out_of_range: bool = False) -> bytes:
        """The query envelope for up to ``layout.batch`` queries (checked, packed, encrypted).

        Raises:
            InputError: the queries do not fit the manifest, or there are more than one
                ciphertext set holds.
        """
        queries, _ = check_queries(
            x, self.input_layout, self.input_range, allow_out_of_range=allow_out_of_range
        )
        if len(queries) > self.input_layout.batch:
            raise InputError(
                f"{len(queries)} queries and one ciphertext set holds "
                f"{self.input_layout.batch}: use predict, which splits them"
            )
        return self._encrypt_group(queries)

    def decrypt(self, data: bytes) -> np.ndarray:
        """Outputs ``[batch, *shape]`` from a result envelope of this model.

        Only the output layout's slots are decoded. Where the manifest publishes noise
        flooding (OpenFHE circuits), decryption adds the flooding noise sized from the
        manifest's estimate, so every decryption of one ciphertext differs. Without it keep
        the values to yourself: a decrypted result at full precision, together with the
        ciphertext it came from (which the server has), reveals the secret key (see the
        README's Security section).

        Raises:
            WireError: the envelope is malformed or for another model or context.
        """
        backend, _, _ = self._keys()
        cts = wire.decode_ciphertexts(backend, data, self.output_layout.chunks, model=self.name)
        decrypted = np.stack([backend.decrypt(ct) for ct in cts])
        return self.output_layout.unpack(decrypted, self.params.slots)

    def _encrypt_group(self, group: np.ndarray) -> bytes:
        backend, _, _ = self._keys()
        vectors = self.input_layout.pack(group, self.params.slots)
        return wire.encode_ciphertexts(
            backend, [backend.encrypt(v) for v in vectors], model=self.name
        )

    def _round_trip(self, group: np.ndarray) -> np.ndarray:
        body = self._encrypt_group(group)
        start = time.perf_counter()
        try:
            response = self._send(body)
        except UnknownKeyError:
            # The server lost the keys (evicted, expired or a fresh key store): send again.
            logger.info("server does not hold keys %s; uploading them again", self.key_id)
            self.upload_keys(force=True)
            response = self._send(body)
        latency = time.perf_counter() - start
        outputs = self.decrypt(response.content)
        self.last_stats.append(
            QueryStats(
                queries=len(group),
                request_bytes=len(body),
                response_bytes=len(response.content),
                latency_s=latency,
                eval_seconds=float(response.headers.get("x-he-eval-seconds", 0)),
                timings=json.loads(response.headers.get("x-he-timings", "[]")),
            )
        )
        return outputs

    def _keys(self) -> tuple[Backend, bytes, KeyRecord]:
        """The context, envelope and record, made or loaded on first use."""
        if self._backend is None or self._envelope is None or self._record is None:
            self.generate_keys()
        if self._backend is None or self._envelope is None or self._record is None:
            raise ServiceError(f"no keys could be made for model {self.name}")
        return self._backend, self._envelope, self._record

    def _send(self, body: bytes) -> Any:
        return self.client.request(
            "POST",
            f"/v1/models/{self.name}/infer",
            content=body,
            headers={"content-type": OCTET_STREAM, "x-key-id": self.key_id or ""},
        )

    def _spinner(self) -> _Spinner:
        text = (
            f"Generating CKKS keys for {self.name} (N={self.params.poly_modulus_degree}, "
            f"{len(self.rotation_steps)} rotation steps)"
        )
        return _Spinner(text, enabled=self.client.progress)


class _Spinner:
    """A rich spinner on stderr that appears only if the work outlasts ``SPINNER_DELAY_S``."""

    def __init__(self, text: str, enabled: bool) -> None:
        self.text = text
        self.enabled = enabled
        self._status: Any = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> _Spinner:
        if self.enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status(self.text)
            self._timer = threading.Timer(SPINNER_DELAY_S, self._status.start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self._status is not None:
            self._status.stop()
