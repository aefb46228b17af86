"""Parsing untrusted uploads so that a hostile payload cannot exhaust or crash the server.

The wire envelope (``he_inference/wire.py``) is checked first, in-process and cheaply: its
prefix, a header parsed under length limits, the count and size of each blob against the
caller's bounds, and the kind, backend, parameters and model. What passes is handed to a
C++ parser (SEAL or OpenFHE), and those parsers trust more of their input than a server
should. OpenFHE's binary (cereal) format carries lengths and type ids that it believes, so
a forged body behind a valid header can ask for terabytes or crash the process.

Evaluation keys are the large, rare upload (megabytes to hundreds of megabytes, once per
client), so they are first loaded in a child process that cannot hurt the server:

- it is a fresh interpreter, one per upload (never ``fork``: the server runs threads, and
  OpenMP deadlocks in a child forked from a threaded parent; and never ``multiprocessing``,
  whose children re-import the server's ``__main__``), which imports only ``he_inference``;
- its address space is capped with ``RLIMIT_AS`` at its footprint at start plus the
  larger of ``key_parse_memory_factor`` times the upload's size and what this model's
  keys occupy once loaded (:func:`loaded_key_bytes`, three times over), plus
  :data:`HEADROOM_BYTES`, so an allocation beyond it fails there (``MemoryError``, a crash,
  or SEAL spinning until the time limit), not in the server;
- it is killed after ``key_parse_timeout_s`` seconds.

The child loads the keys into a fresh context made from the model's own parameters and
reports the verdict. A library error comes back with its class and message; a crash, a
signal or a timeout becomes :class:`~he_inference.errors.MalformedPayloadError`. Only bytes
that loaded there are loaded again in the server (the parsers are deterministic), which
costs one extra parse and about 0.3 to 0.6 s of interpreter start per upload: small beside the
upload itself. Keys read back from the key store were checked this way when uploaded and
are loaded in-process.

Query ciphertexts are small and frequent, so they go to one persistent worker of the same
kind instead (``server/query_worker.py``, where its cost is measured: a few milliseconds per
query), after the checks that bound what a parser may be handed: the body against
``max_body_bytes``, the count against the model's input layout, and each blob against the
backend's ``max_ciphertext_bytes`` with the declared sizes summing exactly to the body. That
worker runs for the backends in :data:`UNBOUNDED_QUERY_PARSERS` (OpenFHE, whose parser
believes the lengths inside a ciphertext; ``isolate_query_parsing`` overrides the choice).
SEAL checks a ciphertext's sizes against the context before it allocates, but inflates a
compressed (zstd) ciphertext without bounding its output, so ``SealBackend.load_ciphertext``
first inflates it in bounded steps and refuses one that grows past the context's largest
ciphertext (an 8 kB zstd bomb claiming 256 MiB cost 2.5 s and 1.2 GiB before that check).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from he_inference import errors, wire
from he_inference.backends import Backend, make_backend
from he_inference.backends.base import Ciphertext
from he_inference.errors import HEInferenceError, InputError, MalformedPayloadError
from he_inference.params import CkksParameters

if TYPE_CHECKING:  # the worker loads this file without the server package (see BOOTSTRAP)
    from server.query_worker import QueryParseWorker
    from server.registry import ServedModel
    from server.settings import Settings

logger = logging.getLogger(__name__)

# Interpreter, numpy and the backend library are mapped before the limit is set; this covers
# what loading allocates beyond the keys themselves (a context, pools, OpenMP stacks).
HEADROOM_BYTES = 512 << 20
# Backends whose ciphertext parser believes the lengths inside a ciphertext. SEAL checks each
# ciphertext's sizes against the context before it allocates, and its zstd inflation is
# bounded by ``SealBackend.load_ciphertext``; the plain backend reads numpy arrays by size.
UNBOUNDED_QUERY_PARSERS = frozenset({"openfhe"})


def decode_evaluation_keys(
    model: ServedModel, data: bytes, settings: Settings
) -> dict[str, bytes]:
    """Check an evaluation-key envelope for a model and, when isolated, trial-load its keys.

    Raises:
        MalformedPayloadError: the envelope does not parse, or its keys crash, exhaust the
            memory limit or the time limit of the worker that loads them.
        SecretKeyLeakError: the bundle holds a secret key.
        ParameterMismatchError: the keys are for another backend or parameter set.
        KeyError_: the keys do not load as evaluation keys.
    """
    keys = wire.decode_evaluation_keys(model.template, data, settings.max_key_bytes)
    if settings.isolate_key_parsing:
        check_keys_in_worker(
            model.template.name,
            model.circuit.params,
            data,
            memory_bytes=worker_memory_bytes(
                len(data),
                settings.key_parse_memory_factor,
                loaded_key_bytes(
                    model.template.name,
                    model.circuit.params,
                    len(model.circuit.rotation_steps) + 1,  # Galois keys and the relin key
                ),
            ),
            timeout_s=settings.key_parse_timeout_s,
        )
    return keys


def decode_query(
    model: ServedModel,
    backend: Backend,
    data: bytes,
    max_count: int,
    worker: QueryParseWorker | None = None,
) -> list[Ciphertext]:
    """Check a query envelope's count and sizes, trial-parse it in ``worker``, then parse it.

    The count is bounded by the model's input layout before any ciphertext is parsed, so a
    query makes the parser run at most as often as the model needs.

    Raises:
        MalformedPayloadError: the envelope or a ciphertext does not parse, is oversized,
            holds more ciphertexts than the model takes, or crashes or exhausts the worker.
        ParameterMismatchError: the envelope is for another context or model.
        InputError: the query holds fewer ciphertexts than the model takes.
        ServiceError: (503) the worker cannot be started.
    """
    chunks = model.circuit.input_layout.chunks
    if worker is not None:
        worker.check(
            backend.name, backend.params, data, model=model.name, max_count=min(max_count, chunks)
        )
    cts = wire.decode_ciphertexts(backend, data, min(max_count, chunks), model=model.name)
    if len(cts) != chunks:
        raise InputError(
            f"model {model.name} takes {chunks} input ciphertexts and the query holds "
            f"{len(cts)}: encrypt with the manifest's input layout"
        )
    return cts


def isolates_queries(settings: Settings) -> bool:
    """Whether queries are trial-parsed in a :class:`~server.query_worker.QueryParseWorker`."""
    if settings.isolate_query_parsing == "auto":
        return settings.backend in UNBOUNDED_QUERY_PARSERS
    return settings.isolate_query_parsing == "always"


def worker_memory_bytes(upload_bytes: int, factor: float, loaded_bytes: int = 0) -> int:
    """The address space a key-parsing worker may add to its footprint at start.

    The larger of ``factor`` times the upload and the upload plus three times
    ``loaded_bytes``, what legitimate keys occupy once loaded (:func:`loaded_key_bytes`).
    """
    allowance = max(factor * upload_bytes, upload_bytes + 3 * loaded_bytes)
    return int(allowance) + HEADROOM_BYTES


def loaded_key_bytes(backend_name: str, params: CkksParameters, keys: int) -> int:
    """The most that ``keys`` SEAL key-switching keys for ``params`` hold in memory.

    A compressed, seeded SEAL upload is much smaller than its keys once loaded: each seeded
    half is expanded and every residue takes a 64-bit word, so a chain of 32-bit primes
    loads to 3.4 times its upload (107 MB of keys for the ReLU digits CNN at N=16384 hold
    368 MB: one pair of polynomials over every prime per data prime and key), and loading
    takes about twice that. Below it SEAL does not fail but spins until the time limit
    (measured: 7x the upload loads in 3 s, 6x never). OpenFHE's uploads are uncompressed
    64-bit words already, so ``key_parse_memory_factor`` times the upload covers them (0).
    """
    if backend_name != "seal":
        return 0
    primes = len(params.coeff_modulus_bits)
    return keys * (primes - 1) * 2 * params.poly_modulus_degree * primes * 8


def check_keys_in_worker(
    backend_name: str,
    params: CkksParameters,
    data: bytes,
    *,
    memory_bytes: int,
    timeout_s: float,
) -> None:
    """Load a key envelope into a fresh context in a memory- and time-limited process.

    Raises:
        MalformedPayloadError: the worker crashed, ran out of memory or time, or the keys
            do not parse.
        HEInferenceError: the class the keys were refused with in the worker.
    """
    order = {"backend": backend_name, "params": params.to_dict(), "memory_bytes": memory_bytes}
    start = time.perf_counter()
    worker = subprocess.Popen(
        worker_command("worker_main"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=worker_environment(),
        close_fds=True,
    )
    try:
        output = _exchange(worker, json.dumps(order).encode() + b"\n" + data, timeout_s)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    verdict = _verdict(output, worker.returncode, timeout_s)
    logger.info(
        "key worker checked %d B of %s keys in %.2f s: %s",
        len(data),
        backend_name,
        time.perf_counter() - start,
        "ok" if verdict is None else type(verdict).__name__,
    )
    if verdict is not None:
        raise verdict


def worker_command(entry_point: str) -> list[str]:
    """The command line of a fresh interpreter that runs one function of this file."""
    return [sys.executable, "-c", BOOTSTRAP, __file__, entry_point]


def worker_environment() -> dict[str, str]:
    """The environment of a parsing worker: this one's, with threads and arenas bounded."""
    return {
        **os.environ,
        # The worker imports he_inference from wherever this process did.
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)),
        # Each OpenMP thread maps a stack and a malloc arena (64 MiB of address space),
        # which would count against the limit and buys nothing for one parse.
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }


def _exchange(worker: subprocess.Popen[bytes], payload: bytes, timeout_s: float) -> bytes | None:
    """Send the payload and collect the worker's answer; ``None`` when it ran out of time."""
    try:
        output, _ = worker.communicate(payload, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        return None
    return output


def _verdict(output: bytes | None, returncode: int, timeout_s: float) -> HEInferenceError | None:
    """``None`` when the keys loaded, else the error that the upload is refused with."""
    if output is None:
        return MalformedPayloadError(
            f"the evaluation keys did not load within {timeout_s:g} s: they are malformed, "
            f"far larger than this model's keys, or beyond the key worker's memory cap "
            f"(the server's key_parse_memory_factor); generate them from this model's "
            f"manifest, or ask the operator to raise the cap"
        )
    try:
        answer = json.loads(output.decode("utf-8").strip().splitlines()[-1])
    except (UnicodeDecodeError, ValueError, IndexError):
        answer = None
    if returncode == 0 and isinstance(answer, dict):
        if answer.get("ok") is True:
            return None
        if isinstance(answer.get("error"), str):
            return rebuild_error(answer["error"], str(answer.get("detail", "")))
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
    return MalformedPayloadError(
        f"the evaluation keys crashed their parser ({how}) or exceeded its memory limit: "
        f"they are malformed; generate them from this model's manifest"
    )


def rebuild_error(class_name: str, message: str) -> HEInferenceError:
    """The worker's error as the same class here (MalformedPayloadError when unknown)."""
    cls = getattr(errors, class_name, None)
    # ServiceError and its subclasses take a status as well; no key load raises them.
    known = isinstance(cls, type) and issubclass(cls, HEInferenceError)
    if known and not issubclass(cls, errors.ServiceError):  # type: ignore[arg-type]
        return cls(message)  # type: ignore[misc, no-any-return]
    return MalformedPayloadError(message)


# -- in the worker process ----------------------------------------------------------------

# Loads this file by path, as a module of its own name, so that the worker never imports the
# ``server`` package (FastAPI and the app would add half a second to every upload).
BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('he_inference_key_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "getattr(module, sys.argv[2])()\n"
)


def worker_main() -> None:
    """The worker's body: read the order, cap memory, read the envelope, load, answer."""
    order = json.loads(sys.stdin.buffer.readline())
    limit_address_space(int(order["memory_bytes"]))
    backend_name = str(order["backend"])

    def load() -> None:
        backend = make_backend(backend_name, CkksParameters.from_dict(order["params"]))
        backend.load_keys(wire.decode_evaluation_keys(backend, sys.stdin.buffer.read()))

    answer = trial_parse(
        load,
        what="the evaluation keys",
        backend_name=backend_name,
        fix="they are malformed; generate them from this model's manifest",
    )
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def query_worker_main() -> None:
    """The persistent query worker: build each context, cap memory, then check queries.

    Its first line in is ``{"contexts": [...], "memory_bytes": n}``; it answers
    ``{"ready": true}`` once every context is built and the limit is set, so the limit bounds
    what one query's parse may allocate and not the contexts. Each query is then an order
    line ``{"backend", "params", "model", "max_count", "size"}`` followed by ``size`` bytes,
    answered with one line as the key worker answers. It exits when its input closes (the
    server stopped or died).
    """
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the answers
    backends: dict[str, Backend] = {}

    def context(spec: dict[str, object]) -> Backend:
        params = CkksParameters.from_dict(spec["params"])  # type: ignore[arg-type]
        key = f"{spec['backend']}:{params.fingerprint()}"
        if key not in backends:
            backends[key] = make_backend(str(spec["backend"]), params)
            # Loading an empty ciphertext is refused, after the backend has built what a load
            # checks against (OpenFHE: a reference ciphertext, which takes a key generation).
            with contextlib.suppress(Exception):
                backends[key].load_ciphertext(b"")
        return backends[key]

    start = json.loads(sys.stdin.buffer.readline())
    for spec in start["contexts"]:
        context(spec)
    limit_address_space(int(start["memory_bytes"]))
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    while line := sys.stdin.buffer.readline():
        order = json.loads(line)
        data = sys.stdin.buffer.read(int(order["size"]))
        answer = trial_parse(
            _decode_query,
            context,
            order,
            data,
            what="the query",
            backend_name=str(order["backend"]),
            fix="it is malformed; encrypt with this model's manifest",
        )
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def _decode_query(
    context: Callable[[dict[str, Any]], Backend], order: dict[str, Any], data: bytes
) -> None:
    wire.decode_ciphertexts(
        context(order), data, int(order["max_count"]), model=str(order["model"])
    )


def trial_parse(
    load: Callable[..., object], *args: object, what: str, backend_name: str, fix: str
) -> dict[str, object]:
    """A worker's one-line answer for ``load(*args)``: ok, or the error the upload gets.

    The library's own errors keep their class; running out of the capped memory and the
    C++ parsers' own exception types become ``MalformedPayloadError``.
    """
    try:
        load(*args)
    except HEInferenceError as exc:
        return {"error": type(exc).__name__, "detail": str(exc)}
    except MemoryError:
        return {
            "error": "MalformedPayloadError",
            "detail": f"{what} asked the parser for more memory than this size needs: {fix}",
        }
    except Exception as exc:  # the C++ parsers signal bad bytes with their own types
        return {
            "error": "MalformedPayloadError",
            "detail": f"{what} did not load on the {backend_name} backend "
            f"({type(exc).__name__}: {str(exc)[:200]})",
        }
    return {"ok": True}


def limit_address_space(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``extra_bytes``."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        current = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
