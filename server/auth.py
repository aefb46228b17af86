"""Optional API tokens: who may call the service, how many answers each gets, and how fast.

Homomorphic encryption hides a client's query from the server; it does nothing to hide the
model's behaviour from the client. Every answered query is an input/output pair, and with
enough pairs a client can fit a copy of the model (model extraction, Tramèr et al., USENIX
Security 2016), weights the manifest never shows. Answered queries are therefore what an
extraction attacker spends, so each token gets a budget of them (429 once spent) and a token
bucket that paces them (429 with Retry-After). Both bound the attack; neither prevents it.

When no token is configured the service is open, as before. When tokens are configured,
every path except ``/healthz``, ``/readyz`` and ``/metrics`` (probes and scrapers, which
carry no model data) needs ``Authorization: Bearer <token>`` (401 otherwise). Tokens are
kept only as SHA-256 digests and looked up by digest, so the comparison does not leak a
token's prefix through timing, and a token is never logged: its name is.

A budget is reserved when a query is admitted (so concurrent queries cannot overdraw it) and
given back when it is not answered with 200, so a 503 or a refused query costs nothing. The
counts are kept in a SQLite file (``server/ledger.py``) and each reservation is committed
before the query runs, so a restart refills no budget; a crash mid-evaluation keeps the
reservation, which costs the token that query and never gives one away. The buckets stay in
memory: a restart refills at most one burst of each, and the budget still bounds the total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from he_inference.errors import ConfigurationError, HEInferenceError, OverloadedError, ServiceError
from server.errors import error_response
from server.ledger import QueryLedger
from server.settings import Settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_INFER_PATH = re.compile(r"^/v1/models/[^/]+/infer$")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(settings: Settings) -> dict[str, str]:
    """The token -> name mapping of the settings, merged with the tokens file if one is set.

    The file is a JSON object ``{"<token>": "<name>", ...}``.

    Raises:
        ConfigurationError: the file cannot be read, is not such an object, or a token or
            name is empty.
    """
    tokens = dict(settings.api_tokens)
    path = settings.api_tokens_file
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the API tokens file {path}: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ConfigurationError(
                f"the API tokens file {path} must hold one JSON object of token -> name strings"
            )
        tokens.update(data)
    for token, name in tokens.items():
        if not token.strip() or not name.strip():
            raise ConfigurationError(
                f"API token names and tokens must not be empty (name {name!r})"
            )
    return tokens


@dataclass
class TokenBucket:
    """``rate`` refills per second up to ``burst``; one query takes one."""

    rate: float
    burst: float
    level: float
    updated: float

    def take(self, now: float) -> float:
        """Take one; 0 when taken, else the seconds until one is there."""
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class TokenGuard:
    """Token lookup, per-token query budgets and per-token rate limits."""

    def __init__(
        self,
        tokens: Mapping[str, str],
        ledger: QueryLedger,
        max_queries: int | None = None,
        rate_per_s: float | None = None,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._names = {_digest(token): name for token, name in tokens.items()}
        self.ledger = ledger
        self.max_queries = max_queries
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenGuard | None:
        """The guard these settings ask for, or ``None`` when no token is configured.

        Raises:
            ConfigurationError: the tokens file cannot be read or is malformed.
            StorageError: the token usage ledger cannot be opened or is not one.
        """
        tokens = load_tokens(settings)
        if not tokens:
            return None
        logger.info("API tokens required: %d tokens", len(tokens))
        return cls(
            tokens,
            QueryLedger(settings.token_usage_path),
            settings.max_queries_per_token,
            settings.token_rate_per_s,
            settings.token_burst,
        )

    def authenticate(self, authorization: str) -> str:
        """The name of the token in an ``Authorization`` header value.

        Raises:
            ServiceError: (401) no bearer token, or one that is not configured.
        """
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(
                "this server requires an API token: send 'Authorization: Bearer <token>' "
                "(he-infer keygen/predict --token, or Client(url, token=...))",
                401,
            )
        name = self._names.get(_digest(token.strip()))
        if name is None:
            raise ServiceError("the API token is not valid on this server", 401)
        return name

    def admit_query(self, name: str) -> None:
        """Reserve one answered query of ``name``'s budget and take one from its bucket.

        The reservation is committed to the ledger before this returns.

        Raises:
            OverloadedError: (429, with Retry-After) the token's rate limit is reached.
            ServiceError: (429) the token's query budget is spent.
            StorageError: (507) the ledger cannot record the query.
        """
        with self._lock:  # the bucket is taken only when the budget allows, and vice versa
            self.ledger.reserve(name, lambda used: self._check(name, used))

    def _check(self, name: str, used: int) -> None:
        if self.max_queries is not None and used >= self.max_queries:
            raise ServiceError(
                f"the token {name} has used its budget of {self.max_queries} queries: "
                f"ask the model's operator for more",
                429,
            )
        if self.rate_per_s is not None:
            now = self._clock()
            bucket = self._buckets.setdefault(
                name, TokenBucket(self.rate_per_s, float(self.burst), float(self.burst), now)
            )
            wait = bucket.take(now)
            if wait > 0:
                error = OverloadedError(
                    f"the token {name} may send {self.rate_per_s:g} queries per second "
                    f"(bursts of {self.burst}): retry in {wait:.1f} s",
                    retry_after_s=wait,
                )
                error.status_code = 429
                raise error

    def refund_query(self, name: str) -> None:
        """Give back a reserved query that was not answered."""
        self.ledger.refund(name)

    def used(self, name: str) -> int:
        """Answered (or in-flight) queries of one token's budget."""
        return self.ledger.used(name)

    def close(self) -> None:
        """Close the ledger."""
        self.ledger.close()


class TokenAuthMiddleware:
    """Refuses requests without a configured token; budgets and paces ``/infer`` per token."""

    def __init__(self, app: ASGIApp, guard: TokenGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        log: dict[str, Any] = scope.get("he_log", {})
        headers = dict(scope.get("headers") or [])
        is_query = scope.get("method") == "POST" and bool(_INFER_PATH.match(scope["path"]))
        try:
            name = self.guard.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            if is_query:  # a committed write (and perhaps a lock wait): off the event loop
                await anyio.to_thread.run_sync(self.guard.admit_query, name)
        except HEInferenceError as exc:
            response = error_response(exc, str(log.get("request_id", "-")))
            if getattr(exc, "status_code", None) == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="he-inference"'
            await response(scope, receive, send)
            return
        log["token"] = name
        if not is_query:
            await self.app(scope, receive, send)
            return

        answered = False

        async def watching_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = message["status"] == 200
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            if not answered:
                with anyio.CancelScope(shield=True):  # a dropped connection still refunds
                    await anyio.to_thread.run_sync(self.guard.refund_query, name)
