"""atheris harnesses for the deserialisers a server runs on strangers' bytes.

Run as ``python tests/fuzz/harness.py TARGET CORPUS_DIR [libFuzzer flags]``; the seeds (one
valid input per target) are written to ``CORPUS_DIR`` first. A harness lets the library's
own refusals (:class:`~he_inference.errors.HEInferenceError`) pass and lets anything else
escape, so that atheris reports it as a crash and exits non-zero.

Targets: ``unpack`` (the envelope alone), ``ciphertexts-plain`` and ``ciphertexts-seal``
(envelope plus backend parser), ``circuit`` (``Circuit.from_bytes``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import msgpack  # noqa: F401 - instrumented with the wire module that uses it

    from he_inference import wire
    from he_inference.circuit import Circuit
    from he_inference.errors import HEInferenceError

from he_inference.backends import make_backend  # the C++ parsers are not instrumented


def _circuit() -> Circuit:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.server.test_hostile import small_circuit

    return small_circuit()


def _target(name: str) -> tuple[Callable[[bytes], object], bytes]:
    """The function to fuzz and one valid input for it."""
    circuit = _circuit()
    if name == "circuit":
        return (lambda data: Circuit.from_bytes(data)), circuit.to_bytes()
    backend_name = "seal" if name == "ciphertexts-seal" else "plain"
    backend = make_backend(backend_name, circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    import numpy as np

    seed = wire.encode_ciphertexts(backend, [backend.encrypt(np.zeros(backend.params.slots))])
    if name == "unpack":

        def unpack(data: bytes) -> object:
            return wire.unpack(
                data,
                kind=wire.KIND_CIPHERTEXTS,
                backend=backend.name,
                params_fingerprint=backend.params.fingerprint(),
                max_count=8,
                max_blob_bytes=backend.max_ciphertext_bytes(),
            )

        return unpack, seed
    return (lambda data: wire.decode_ciphertexts(backend, data, 8)), seed


def main() -> None:
    name, corpus = sys.argv[1], Path(sys.argv[2])
    function, seed = _target(name)
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "seed").write_bytes(seed)

    def test_one_input(data: bytes) -> None:
        with contextlib.suppress(HEInferenceError):
            function(data)

    atheris.Setup([sys.argv[0], str(corpus), *sys.argv[3:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
