"""A persistent, memory-limited process that trial-parses each query before the server does.

OpenFHE's ciphertext parser believes the lengths inside a ciphertext: a 263 kB query at
N=8192 whose first coefficient vector claims 2^28 words makes it zero-fill 2 GiB and take
4 s before it notices that the bytes are missing, a larger claim can bring the OOM killer,
and a forged type id near the end makes it crash the process (SIGSEGV). The envelope's
checks cannot see this (the sizes, header and key tag are all valid), so every query is
first parsed here, in a process that may allocate only what the largest accepted body needs:

- one fresh interpreter (``server/parsing.py``'s bootstrap, never ``fork``) that builds a
  context for every served model, then caps its address space with ``RLIMIT_AS`` at that
  footprint plus ``key_parse_memory_factor`` times ``max_body_bytes`` plus
  :data:`~server.parsing.HEADROOM_BYTES`, so that the cap bounds a query's parse and not
  the contexts;
- it stays up between queries (a process per query would cost 0.5 s or more of start and
  key generation, more than a small circuit's evaluation), answers one line per query, and
  a parse past ``query_parse_timeout_s`` kills it;
- when it dies (a crash, a signal, the kill) the query it was parsing is refused with 400
  and a new worker starts at once, in the background of the next query.

A query the worker accepts is then parsed again in the server: the parsers are
deterministic, so those bytes ask for what they asked for in the worker. Queries are parsed
one at a time here; the parse takes milliseconds beside an evaluation of seconds.

Measured on the shared two-core development machine (OpenFHE, one ciphertext per query,
median of 20): at N=8192 with 2 towers (a 263 kB query) the in-process parse takes 2.4 ms
and the trial parse adds 2.7 ms; at N=16384 with 7 towers (1.8 MB) it is 9.4 ms and adds
12.3 ms. Starting a worker takes 0.3 to 0.6 s, at server start and after a crash. A forged
length is refused in 2 to 9 ms with the server's memory untouched (in-process the same
bytes cost 2 GiB and 4 s, 32 s under load), and a forged type id that crashes the parser
(SIGSEGV) in 11 ms, after which the next query waits about 0.2 s for the new worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Iterable

from he_inference.errors import HEInferenceError, MalformedPayloadError, ServiceError
from he_inference.params import CkksParameters
from server.parsing import rebuild_error, worker_command, worker_environment

logger = logging.getLogger(__name__)

# Python, numpy, the backend library and one context per served model at N=32768 start in
# well under this on the CI machine; a worker that is not ready by then is a server fault.
START_TIMEOUT_S = 120.0
_CHUNK = 1 << 20


class QueryParseWorker:
    """One worker process that trial-parses query envelopes; thread-safe, one parse at a time.

    Args:
        contexts: the (backend name, parameters) of every served model, built at start.
        memory_bytes: what a parse may allocate beyond the worker's footprint after start.
        timeout_s: seconds one parse may take before the worker is killed.
    """

    def __init__(
        self,
        contexts: Iterable[tuple[str, CkksParameters]],
        memory_bytes: int,
        timeout_s: float,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self._contexts = [
            {"backend": name, "params": params.to_dict()} for name, params in contexts
        ]
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.starts = 0
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = False

    @property
    def pid(self) -> int | None:
        """The worker's process id, or ``None`` while none runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the worker unless one runs; returns at once (it gets ready meanwhile)."""
        with self._lock:
            self._spawn()

    def close(self) -> None:
        """Stop the worker (it also exits on its own when this process dies)."""
        with self._lock:
            self._stop()

    def check(
        self,
        backend_name: str,
        params: CkksParameters,
        data: bytes,
        *,
        model: str,
        max_count: int,
    ) -> None:
        """Parse a query envelope in the worker; return when it parsed there.

        Raises:
            MalformedPayloadError: the query crashed the worker, ran out of its memory or
                time, or does not parse.
            HEInferenceError: the class the worker refused the query with (for example
                ParameterMismatchError).
            ServiceError: (503) the worker cannot be started.
        """
        order = {
            "backend": backend_name,
            "params": params.to_dict(),
            "model": model,
            "max_count": max_count,
            "size": len(data),
        }
        with self._lock:
            process = self._ensure_ready()
            start = time.perf_counter()
            line = _talk(
                process,
                json.dumps(order).encode() + b"\n" + data,
                time.monotonic() + self.timeout_s,
            )
            verdict = self._verdict(process, line, len(data))
            logger.debug(
                "query worker parsed %d B in %.1f ms: %s",
                len(data),
                1000 * (time.perf_counter() - start),
                "ok" if verdict is None else type(verdict).__name__,
            )
        if verdict is not None:
            raise verdict

    # -- internals, under the lock ----------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self._process is not None:
            if self._process.poll() is None:
                return self._process
            self._stop()  # died between queries: reap it and close its pipes
        process = subprocess.Popen(
            worker_command("query_worker_main"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=worker_environment(),
            close_fds=True,
            bufsize=0,
        )
        assert process.stdin is not None  # Popen made both pipes
        start = {"contexts": self._contexts, "memory_bytes": self.memory_bytes}
        with contextlib.suppress(BrokenPipeError):  # died at start: _ensure_ready says so
            process.stdin.write(json.dumps(start).encode() + b"\n")
        self._process, self._ready = process, False
        self.starts += 1
        logger.info("query worker %d started (%d contexts)", process.pid, len(self._contexts))
        return process

    def _ensure_ready(self) -> subprocess.Popen[bytes]:
        process = self._spawn()
        if self._ready:
            return process
        line = _talk(process, b"", time.monotonic() + self.start_timeout_s)
        try:
            ready = json.loads(line or b"null") == {"ready": True}
        except ValueError:
            ready = False
        if not ready:
            self._stop()
            logger.error("the query worker did not start: %r", (line or b"")[:200])
            raise ServiceError(
                "the server cannot start its query parser: retry later; the operator's log "
                "has the cause",
                503,
            )
        self._ready = True
        return process

    def _verdict(
        self, process: subprocess.Popen[bytes], line: bytes | None, size: int
    ) -> HEInferenceError | None:
        if line:
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                if answer.get("ok") is True:
                    return None
                if isinstance(answer.get("error"), str):
                    return rebuild_error(answer["error"], str(answer.get("detail", "")))
        self._stop()  # kills and reaps it, which sets its exit status
        if line is None:
            how = f"ran past {self.timeout_s:g} s"
            message = f"the query did not parse within {self.timeout_s:g} s"
        else:
            how = f"died (exit status {process.returncode})"
            message = "the query crashed its parser or exceeded its memory limit"
        logger.warning("query worker %d %s on a %d B query: restarting", process.pid, how, size)
        self._spawn()  # the next query finds it built, or nearly
        return MalformedPayloadError(
            f"{message}: it is malformed; encrypt with this model's manifest"
        )

    def _stop(self) -> None:
        process, self._process, self._ready = self._process, None, False
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _talk(process: subprocess.Popen[bytes], payload: bytes, deadline: float) -> bytes | None:
    """Send ``payload`` and read one answer line: ``b""`` when the worker died, ``None`` late.

    Writing and reading share one deadline and never block past it, whatever the worker does.
    """
    assert process.stdin is not None and process.stdout is not None  # Popen made both pipes
    out, into = process.stdin.fileno(), process.stdout.fileno()
    os.set_blocking(out, False)
    view = memoryview(payload)
    received = b""
    with selectors.DefaultSelector() as selector:
        selector.register(into, selectors.EVENT_READ)
        if view:
            selector.register(out, selectors.EVENT_WRITE)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for key, _ in selector.select(remaining):
                if key.fd == out:
                    try:
                        view = view[os.write(out, view[:_CHUNK]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        selector.unregister(out)
                    continue
                chunk = os.read(into, 65536)
                if not chunk:
                    return b""
                received += chunk
                if b"\n" in received:
                    return received.split(b"\n", 1)[0]
