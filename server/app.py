"""The FastAPI app: models, evaluation keys and encrypted inference over wire envelopes.

Endpoints::

    GET    /v1/models                        the served models, one line each
    GET    /v1/models/{name}                 the public manifest (plus the server's backend)
    POST   /v1/models/{name}/keys            an evaluation-key envelope -> {"key_id": ...}
    DELETE /v1/models/{name}/keys/{key_id}   forget uploaded keys
    POST   /v1/models/{name}/infer           X-Key-Id + a ciphertext envelope -> envelope
    GET    /healthz, /readyz, /metrics

Bodies are binary envelopes (``he_inference/wire.py``), not base64 in JSON: a query is a
few hundred KB to a few MB and keys are tens of MB, and base64 would add a third. Parsing,
key loading and evaluation are CPU-bound and run in worker threads under
:class:`~server.limiter.EvaluationLimiter`; the event loop only moves bytes. Untrusted bytes
reach a C++ parser in the server only after a limited worker process parsed them
(``server/parsing.py``, ``server/query_worker.py``). The server never holds a secret key:
every context is made from the model's own parameters, and an upload that carries a secret
key, or lets the context decrypt, is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from he_inference import wire
from he_inference.errors import InputError, ServiceError
from he_inference.evaluate import NodeTiming
from server import parsing
from server.auth import TokenAuthMiddleware, TokenGuard
from server.contexts import ContextCache, load_context
from server.errors import install_error_handlers
from server.keystore import KeyStore
from server.limiter import EvaluationLimiter
from server.metrics import Metrics
from server.middleware import RequestLogMiddleware
from server.query_worker import QueryParseWorker
from server.registry import ModelRegistry, ServedModel
from server.settings import Settings

logger = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
# Response headers stay well under common proxy limits (8 KiB); the per-node sources are
# dropped first when a deep circuit would exceed this.
MAX_TIMINGS_HEADER = 6000


class Service:
    """The state one app serves from: models, key store, loaded contexts, limiter, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings.backend)
        self.registry.load_dir(settings.models_dir)
        self.store = KeyStore(
            settings.key_store_dir, settings.key_store_cap_bytes, settings.key_ttl_s
        )
        self.contexts = ContextCache(self.store, settings.max_loaded_contexts)
        self.limiter = EvaluationLimiter(
            settings.max_concurrency, settings.max_queue, settings.retry_after_s, self.metrics
        )
        self.metrics.watch(lambda: self.store.total_bytes, lambda: len(self.contexts))
        self.query_worker: QueryParseWorker | None = None
        if parsing.isolates_queries(settings):
            contexts = {
                m.circuit.params.fingerprint(): (m.template.name, m.circuit.params)
                for m in self.registry.models.values()
            }
            self.query_worker = QueryParseWorker(
                contexts.values(),
                parsing.worker_memory_bytes(
                    settings.max_body_bytes, settings.key_parse_memory_factor
                ),
                settings.query_parse_timeout_s,
            )

    # -- work done in worker threads -------------------------------------------------------

    def upload_keys(self, model: ServedModel, data: bytes, key_id: str) -> bool:
        """Check, load and store an evaluation-key envelope; False when already stored."""
        if self.store.contains(model.name, key_id):
            return False
        keys = parsing.decode_evaluation_keys(model, data, self.settings)
        loaded = load_context(model, keys)  # proves the keys load before they are kept
        self.store.put(model.name, key_id, data)
        self.contexts.put(model.name, key_id, loaded)
        return True

    def infer(
        self, model: ServedModel, key_id: str, data: bytes
    ) -> tuple[bytes, list[NodeTiming], float]:
        """Evaluate one query envelope with the stored keys; returns the result envelope."""
        loaded = self.contexts.get(model, key_id)
        cts = parsing.decode_query(
            model, loaded.backend, data, self.settings.max_ciphertexts, self.query_worker
        )
        levels = sorted({loaded.backend.level(ct) for ct in cts})
        if levels != [0]:
            raise InputError(
                f"query ciphertexts are at levels {levels}: send freshly encrypted ones "
                f"(level 0), the circuit needs all {model.circuit.depth} levels"
            )
        start = time.perf_counter()
        outputs, timings = loaded.evaluator.run(cts)
        seconds = time.perf_counter() - start
        return wire.encode_ciphertexts(loaded.backend, outputs, model=model.name), timings, seconds


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app for these settings (models are loaded and the key store opened now)."""
    service = Service(settings)
    guard = TokenGuard.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if service.query_worker is not None:
            service.query_worker.start()  # builds its contexts while the server starts
        try:
            yield
        finally:
            if service.query_worker is not None:
                service.query_worker.close()
            if guard is not None:
                guard.close()

    app = FastAPI(
        title="he-inference", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.service = service
    install_error_handlers(app)
    if guard is not None:  # inside the log middleware, so refusals get a request id and a line
        app.add_middleware(TokenAuthMiddleware, guard=guard)
    app.state.token_guard = guard
    app.add_middleware(RequestLogMiddleware, metrics=service.metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        count = len(service.registry.models)
        if count == 0:
            return JSONResponse({"status": "not ready", "detail": "no model is loaded"}, 503)
        return JSONResponse({"status": "ready", "models": count})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"backend": settings.backend, "models": service.registry.summaries()}

    @app.get("/v1/models/{name}")
    async def get_manifest(name: str, request: Request) -> dict[str, Any]:
        return _model(request, service, name).manifest

    @app.post("/v1/models/{name}/keys")
    async def upload_keys(name: str, request: Request) -> JSONResponse:
        model = _model(request, service, name)
        data = await _read_body(request, settings.max_key_bytes, "evaluation-key upload")
        key_id = wire.key_id(data)
        request.scope["he_log"]["key_id"] = key_id
        created = await service.limiter.run(service.upload_keys, model, data, key_id)
        return JSONResponse({"key_id": key_id}, status_code=201 if created else 200)

    @app.delete("/v1/models/{name}/keys/{key_id}")
    async def delete_keys(name: str, key_id: str, request: Request) -> dict[str, str]:
        model = _model(request, service, name)
        request.scope["he_log"]["key_id"] = key_id
        service.store.delete(model.name, key_id)
        return {"deleted": key_id}

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        model = _model(request, service, name)
        key_id = request.headers.get("x-key-id", "").strip().lower()
        if not key_id:
            raise InputError(
                "the X-Key-Id header is missing: upload keys first and send "
                "the key id they returned"
            )
        request.scope["he_log"]["key_id"] = key_id
        data = await _read_body(request, settings.max_body_bytes, "query")
        body, timings, seconds = await service.limiter.run(service.infer, model, key_id, data)
        service.metrics.eval_seconds.labels(model.name).observe(seconds)
        headers = {"X-HE-Timings": _timings_header(timings), "X-HE-Eval-Seconds": f"{seconds:.6f}"}
        return Response(body, media_type=OCTET_STREAM, headers=headers)

    return app


def _model(request: Request, service: Service, name: str) -> ServedModel:
    model = service.registry.get(name)
    request.scope["he_log"]["model"] = model.name
    return model


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError(f"Content-Length {declared[:40]!r} is not a byte count")
        if int(declared) > limit:
            raise ServiceError(f"the {what} of {declared} bytes exceeds the limit of {limit}", 413)
    parts = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServiceError(f"the {what} exceeds the limit of {limit} bytes", 413)
        parts.append(chunk)
    if not total:
        raise InputError(f"the {what} body is empty: send a wire envelope")
    return b"".join(parts)


def _timings_header(timings: list[NodeTiming]) -> str:
    rows = [
        {
            "name": t.name,
            "kind": t.kind,
            "sources": t.sources,
            "level_in": t.level_in,
            "level_out": t.level_out,
            "seconds": round(t.seconds, 6),
        }
        for t in timings
    ]
    text = json.dumps(rows, separators=(",", ":"))
    if len(text) > MAX_TIMINGS_HEADER:
        for row in rows:
            row.pop("sources")
        text = json.dumps(rows, separators=(",", ":"))
    return text
