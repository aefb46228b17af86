"""The request middleware: request ids, byte counts, one log line and the metrics per request.

It is plain ASGI rather than ``BaseHTTPMiddleware`` so that bodies stream through without
being buffered twice, and it is the last line of defence: an exception that no handler took
is answered here through ``server/errors.py``, so a client never sees a traceback.

The log line holds sizes, durations and ids only: never key bytes, ciphertexts or values.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.metrics import Metrics

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestLogMiddleware:
    """Counts bytes, times the request, logs one INFO line and updates the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        log: dict[str, Any] = {"request_id": request_id, "model": None, "key_id": None}
        scope["he_log"] = log
        state = {"status": 500, "in": 0, "out": 0, "started": False}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        except Exception as exc:
            if state["started"]:
                raise
            await error_response(exc, request_id)(scope, receive, counting_send)
        finally:
            self._record(scope, log, state, time.perf_counter() - start)

    def _record(
        self, scope: Scope, log: dict[str, Any], state: dict[str, Any], seconds: float
    ) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "-")
        status = int(state["status"])
        self.metrics.requests.labels(endpoint, method, str(status)).inc()
        self.metrics.request_bytes.labels(endpoint).inc(state["in"])
        self.metrics.response_bytes.labels(endpoint).inc(state["out"])
        key_id = log.get("key_id")
        logger.info(
            "request id=%s method=%s path=%s model=%s key=%s status=%d in_bytes=%d "
            "out_bytes=%d ms=%.1f",
            log["request_id"],
            method,
            scope.get("path", "-"),
            log.get("model") or "-",
            key_id[:12] if key_id else "-",
            status,
            state["in"],
            state["out"],
            seconds * 1e3,
        )
