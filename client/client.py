"""The HTTP side of the SDK: one httpx client, and server errors raised as library errors.

The server answers every error as ``{"error": <class name>, "detail": <message>}``; the
client raises the same class from ``he_inference.errors`` with the server's message, so a
caller handles an :class:`~he_inference.errors.UnknownKeyError` the same way whether it
came from the local key folder or from the server. A 503 is retried after its Retry-After
a few times before :class:`~he_inference.errors.OverloadedError` reaches the caller.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from client.keys import DEFAULT_KEY_DIR
from client.model import Model
from he_inference import errors
from he_inference.errors import HEInferenceError, OverloadedError, ServiceError

logger = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
#: Seconds to wait for a response by default: an evaluation at N=32768 can take minutes.
DEFAULT_TIMEOUT_S = 300.0
#: Seconds to wait for a connection: a live server accepts at once, however busy it is.
CONNECT_TIMEOUT_S = 10.0


class Client:
    """A connection to one he-inference server.

    Args:
        url: the server's base URL, for example ``http://127.0.0.1:8000``.
        key_dir: where secret keys are kept; ``~/.he-inference/keys`` by default.
        timeout: seconds to wait for each response (an evaluation can take minutes);
            connecting waits at most ``CONNECT_TIMEOUT_S`` (10 s) of it.
        progress: show a spinner while keys are generated.
        retries: how often a 503 (server busy) is retried after its Retry-After.
        http: an httpx client to send with instead of a new one (tests pass one bound to
            an in-process app; its base URL is then used as it is).
        token: the API token, sent as ``Authorization: Bearer <token>`` on every request,
            where the server requires one.
    """

    def __init__(
        self,
        url: str,
        key_dir: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        progress: bool = True,
        retries: int = 3,
        http: httpx.Client | None = None,
        token: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.key_dir = Path(key_dir).expanduser() if key_dir else DEFAULT_KEY_DIR.expanduser()
        self.progress = progress
        self.retries = retries
        self.timeout = timeout
        self._owns_http = http is None
        limits = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
        self.http = http or httpx.Client(base_url=self.url, timeout=limits)
        self._auth = {"authorization": f"Bearer {token}"} if token else {}

    # -- public -----------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The server's models, one short summary each."""
        data: dict[str, Any] = self.request("GET", "/v1/models").json()
        return list(data["models"])

    def model(self, name: str) -> Model:
        """A handle on one model, built from its public manifest."""
        manifest = self.request("GET", f"/v1/models/{name}").json()
        return Model(self, manifest)

    def close(self) -> None:
        """Close the connection pool (when this client made it)."""
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; an error answer is raised as the server's exception class.

        Raises:
            ServiceError: the server cannot be reached, did not answer in time (504), or
                answered an unexpected error.
            HEInferenceError: the server refused the request (the class it names).
        """
        if self._auth:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **self._auth}
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.ConnectTimeout as exc:
                raise ServiceError(
                    f"cannot reach the server at {self.url}: no connection within "
                    f"{min(self.timeout, CONNECT_TIMEOUT_S):g} s; check the URL and that the "
                    f"server runs",
                    status_code=504,
                ) from exc
            except httpx.TimeoutException as exc:
                raise ServiceError(
                    f"the server at {self.url} accepted the connection but did not answer "
                    f"{method} {path} within {self.timeout:g} s: it may be stuck or busy "
                    f"with a slow evaluation; retry with a larger --timeout (timeout= in "
                    f"Client)",
                    status_code=504,
                ) from exc
            except httpx.HTTPError as exc:
                raise ServiceError(f"cannot reach the server at {self.url}: {exc}") from exc
            if response.status_code != 503 or attempt == self.retries:
                break
            wait = _retry_after(response)
            logger.info("server busy (503); retrying in %.1f s", wait)
            time.sleep(wait)
        if response.is_success:
            return response
        raise error_from_response(response)


def error_from_response(response: httpx.Response) -> HEInferenceError:
    """The library exception that an error answer names, with the server's message."""
    status = response.status_code
    try:
        body = response.json()
        name, detail = str(body["error"]), str(body["detail"])
    except (ValueError, KeyError, TypeError):
        name, detail = "ServiceError", response.text[:500] or response.reason_phrase
    detail = f"{detail} (HTTP {status})"
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, OverloadedError):
        return cls(detail, retry_after_s=_retry_after(response))
    if isinstance(cls, type) and issubclass(cls, ServiceError):
        return cls(detail, status_code=status)
    if isinstance(cls, type) and issubclass(cls, HEInferenceError):
        return cls(detail)
    return ServiceError(f"{name}: {detail}", status_code=status)


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.1, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0
