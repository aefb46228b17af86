"""The one place where exceptions become HTTP responses.

Every error body is ``{"error": <class name>, "detail": <message>}``, so the SDK can raise
the same class on the client side. Classes map by the first match in ``STATUS`` (most
specific first); a :class:`~he_inference.errors.ServiceError` carries its own status. Any
other exception is a bug: it is logged with its traceback here and answered with a generic
500 that names the request id, never the traceback or the exception's text.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from he_inference.errors import (
    BackendUnavailableError,
    CircuitError,
    ConfigurationError,
    HEInferenceError,
    InputError,
    KeyError_,
    MalformedPayloadError,
    OverloadedError,
    ParameterMismatchError,
    SecretKeyLeakError,
    ServiceError,
    StorageError,
    UnknownKeyError,
    WireError,
)

logger = logging.getLogger(__name__)

# Most specific first: the first class an exception is an instance of decides its status.
STATUS: tuple[tuple[type[HEInferenceError], int], ...] = (
    (OverloadedError, 503),
    (UnknownKeyError, 404),
    (SecretKeyLeakError, 400),
    (ParameterMismatchError, 409),  # well-formed, but for another model, backend or params
    (MalformedPayloadError, 400),
    (WireError, 400),
    (KeyError_, 400),  # keys that do not load or lack rotation steps
    (InputError, 400),
    (BackendUnavailableError, 500),
    (ConfigurationError, 500),
    (CircuitError, 500),
    # 507 Insufficient Storage: the key store cannot take (or give back) keys. The message
    # names no path, so it is shown; keys already stored keep working.
    (StorageError, 507),
)

_HTTP_NAMES = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception is answered with."""
    if isinstance(exc, ServiceError):
        return exc.status_code
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: BaseException, request_id: str = "-") -> JSONResponse:
    """The JSON response for an exception (the only place that builds error bodies)."""
    status = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if isinstance(exc, StorageError):
        logger.error("request %s: key store failure: %s", request_id, exc)
    if isinstance(exc, HEInferenceError) and (
        status < 500 or isinstance(exc, (OverloadedError, StorageError))
    ):
        body = {"error": type(exc).__name__, "detail": str(exc)}
    else:
        # A server-side fault: paths and internals go to the operator's log, not the client.
        logger.error("request %s failed: %s", request_id, type(exc).__name__, exc_info=exc)
        body = {
            "error": "InternalServerError",
            "detail": f"the server failed on this request (request id {request_id}); "
            f"the operator's log has the cause",
        }
    return JSONResponse(body, status_code=status, headers=headers)


def _request_id(request: Request) -> str:
    log: dict[str, Any] = request.scope.get("he_log", {})
    return str(log.get("request_id", "-"))


async def _on_library_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, _request_id(request))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or ""
    headers = getattr(exc, "headers", None) or {}
    name = _HTTP_NAMES.get(status, "HTTPError")
    return JSONResponse(
        {"error": name, "detail": str(detail)}, status_code=status, headers=dict(headers)
    )


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors
    )
    return JSONResponse(
        {"error": "InputError", "detail": f"invalid request: {where}"}, status_code=400
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the JSON error body."""
    app.add_exception_handler(HEInferenceError, _on_library_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
