"""The server's settings: one pydantic model, validated once when the app is made.

Every limit has a default that suits a small machine (two cores): one evaluation at a time,
four waiting, and bodies bounded well above what one query at N=32768 needs. Evaluation keys
are the large upload (tens to hundreds of MB of Galois keys), so they have their own bound.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MiB = 1 << 20


def _default_concurrency() -> int:
    # CKKS evaluation is CPU-bound and single-threaded per request in SEAL: more concurrent
    # evaluations than cores only adds memory (one set of intermediates each).
    return max(1, (os.cpu_count() or 2) // 2)


class Settings(BaseModel):
    """Configuration of one server process.

    Attributes:
        models_dir: folder whose ``*.hec`` circuit files are served.
        key_store_dir: folder of the evaluation-key store (created when missing).
        backend: the CKKS library evaluations run on; ``plain`` is for tests only.
        max_body_bytes: the largest query body accepted (413 beyond it).
        max_key_bytes: the largest evaluation-key upload accepted (413 beyond it).
        max_ciphertexts: the most ciphertexts one query may carry (400 beyond it).
        max_concurrency: evaluations running at once.
        max_queue: evaluations waiting for a slot; one more answers 503 with Retry-After.
        retry_after_s: the Retry-After a 503 advertises.
        key_store_cap_bytes: total bytes of stored keys; least recently used go first.
        key_ttl_s: seconds since its last use after which a stored key expires.
        max_loaded_contexts: backend contexts with keys loaded kept in memory.
        isolate_key_parsing: trial-load each evaluation-key upload in a memory- and
            time-limited worker process before the server parses it (``server/parsing.py``).
        key_parse_memory_factor: that worker may grow its address space by this many times
            the upload's size, or by three times what the model's keys occupy once loaded
            if that is more (plus a fixed headroom), before its allocations fail.
        key_parse_timeout_s: seconds that worker may take before it is killed (400 then).
        isolate_query_parsing: trial-parse each query in a persistent memory- and
            time-limited worker before the server parses it (``server/query_worker.py``):
            ``auto`` for the backends whose parser believes lengths inside a ciphertext
            (OpenFHE), ``always`` or ``never``.
        query_parse_timeout_s: seconds one query's trial parse may take before the worker
            is killed (400 then). Its memory is bounded as the key worker's, with
            ``max_body_bytes`` for the upload's size.
        api_tokens: API token -> client name; when this or ``api_tokens_file`` names any
            token, every endpoint but the probes needs one (see ``server/auth.py``).
        api_tokens_file: a JSON file of more token -> name pairs.
        max_queries_per_token: answered queries each token may have (429 beyond).
        token_rate_per_s: queries per second each token may send (429 with Retry-After).
        token_burst: queries a token may send at once before its rate limit applies.
        token_usage_file: the SQLite file of each token's answered queries, which survives
            restarts (default: ``token-usage.sqlite3`` in ``key_store_dir``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    models_dir: Path
    key_store_dir: Path
    backend: Literal["seal", "openfhe", "plain"] = "seal"
    max_body_bytes: int = Field(default=64 * MiB, gt=0)
    max_key_bytes: int = Field(default=1024 * MiB, gt=0)
    max_ciphertexts: int = Field(default=64, gt=0)
    max_concurrency: int = Field(default_factory=_default_concurrency, gt=0)
    max_queue: int = Field(default=4, ge=0)
    retry_after_s: int = Field(default=2, gt=0)
    key_store_cap_bytes: int = Field(default=4096 * MiB, gt=0)
    key_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_loaded_contexts: int = Field(default=4, gt=0)
    isolate_key_parsing: bool = True
    key_parse_memory_factor: float = Field(default=4.0, gt=0)
    key_parse_timeout_s: float = Field(default=120.0, gt=0)
    isolate_query_parsing: Literal["auto", "always", "never"] = "auto"
    query_parse_timeout_s: float = Field(default=30.0, gt=0)
    api_tokens: dict[str, str] = Field(default_factory=dict, repr=False)
    api_tokens_file: Path | None = None
    max_queries_per_token: int | None = Field(default=None, gt=0)
    token_rate_per_s: float | None = Field(default=None, gt=0)
    token_burst: int = Field(default=10, gt=0)
    token_usage_file: Path | None = None

    @field_validator("models_dir", "key_store_dir", "token_usage_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(value).expanduser()

    @property
    def token_usage_path(self) -> Path:
        """Where the answered-query count of each token is kept."""
        return self.token_usage_file or self.key_store_dir / "token-usage.sqlite3"
