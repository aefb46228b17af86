"""Hostile requests: each is a 4xx with a JSON message, memory stays bounded, the app serves on.

Most cases run in-process on the plain backend, where the wire envelope and the server's
own checks are what stand between the bytes and a parser. The cases that need a real C++
parser run on SEAL (and OpenFHE where installed) over a one-layer circuit at N=8192, and a
crafted OpenFHE key that makes its parser ask for a terabyte is sent to a real uvicorn
process, which must answer 400 and keep serving.
"""

from __future__ import annotations

import random
import resource
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from he_inference import wire
from he_inference.backends import Backend, make_backend
from he_inference.circuit import Circuit, Layout, linear_rotation_steps
from he_inference.evaluate import encrypt_input
from he_inference.params import select_parameters
from tests.conftest import require_backend
from tests.he_inference.circuits import linear_node
from tests.server.apps import MODEL, OTHER, serve, write_models

MiB = 1 << 20
# Peak resident memory may grow this much over a whole hostile run: far less than what the
# bombs below would take if anything inflated them (256 MiB) or believed their sizes.
RSS_GROWTH_BOUND = 200 * MiB


@dataclass
class Target:
    """A served app with valid keys uploaded, and what a client needs to talk to it."""

    http: Any
    circuit: Circuit
    client: Backend
    key_id: str
    keys: bytes
    query: bytes
    other_keys: bytes
    other_query: bytes

    @property
    def infer_url(self) -> str:
        return f"/v1/models/{self.circuit.name}/infer"

    @property
    def keys_url(self) -> str:
        return f"/v1/models/{self.circuit.name}/keys"

    def infer(self, body: bytes, **headers: str) -> Any:
        return self.http.post(
            self.infer_url, content=body, headers={"x-key-id": self.key_id, **headers}
        )


def client_for(circuit: Circuit, backend_name: str) -> Backend:
    backend = make_backend(backend_name, circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    return backend


def encrypt(circuit: Circuit, backend: Backend, model: str | None = None) -> bytes:
    x = np.random.default_rng(5).uniform(-1, 1, size=circuit.input_layout.shape)
    cts = encrypt_input(circuit, backend, x)
    return wire.encode_ciphertexts(backend, cts, model=model or circuit.name)


def assert_refused(response: Any, statuses: tuple[int, ...] = (400, 404, 409, 413)) -> None:
    """A 4xx among ``statuses`` with the JSON error body, never a 5xx or a traceback."""
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    assert "Traceback" not in response.text


def assert_serves(target: Target) -> None:
    response = target.infer(target.query)
    assert response.status_code == 200, response.text
    assert wire.decode_ciphertexts(target.client, response.content, 8, model=target.circuit.name)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- envelopes built by hand, past the encoder's own checks ---------------------------------


def header_of(envelope: bytes) -> dict[str, Any]:
    length = wire.PREFIX.unpack_from(envelope)[2]
    header: dict[str, Any] = msgpack.unpackb(
        envelope[wire.PREFIX.size : wire.PREFIX.size + length]
    )
    return header


def body_of(envelope: bytes) -> bytes:
    return envelope[wire.PREFIX.size + wire.PREFIX.unpack_from(envelope)[2] :]


def reframe(
    envelope: bytes, body: bytes | None = None, raw_header: bytes | None = None, **fields: Any
) -> bytes:
    """The envelope with header fields replaced (or a raw header), sizes left as given."""
    if raw_header is None:
        raw_header = msgpack.packb({**header_of(envelope), **fields}, use_bin_type=True)
    body = body_of(envelope) if body is None else body
    return wire.PREFIX.pack(wire.MAGIC, wire.FORMAT_VERSION, len(raw_header)) + raw_header + body


def with_blob(envelope: bytes, index: int, blob: bytes) -> bytes:
    """The envelope with one blob replaced and the sizes made consistent again."""
    header = header_of(envelope)
    body, blobs, offset = body_of(envelope), [], 0
    for size in header["sizes"]:
        blobs.append(body[offset : offset + size])
        offset += size
    blobs[index] = blob
    return reframe(envelope, b"".join(blobs), sizes=[len(b) for b in blobs])


def blob_of(envelope: bytes, index: int = 0) -> bytes:
    sizes = header_of(envelope)["sizes"]
    start = sum(sizes[:index])
    return body_of(envelope)[start : start + sizes[index]]


def flip(data: bytes, position: int, mask: int = 0x55) -> bytes:
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


def duplicate_field_header(envelope: bytes, field: str, value: Any) -> bytes:
    """A raw msgpack map that names ``field`` twice (the second one with ``value``)."""
    header = header_of(envelope)
    pairs = [*header.items(), (field, value)]
    out = bytearray(b"\xde" + struct.pack(">H", len(pairs)))  # map16
    for key, item in pairs:
        out += msgpack.packb(key) + msgpack.packb(item, use_bin_type=True)
    return bytes(out)


def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of ``inflated`` zero bytes, built a megabyte at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    parts = [packer.compress(zeros) for _ in range(inflated // MiB)]
    return b"".join([*parts, packer.flush()])


# -- the plain app --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("hostile-plain")
    models = write_models(root / "models")
    circuit, other = models[MODEL][0], models[OTHER][0]
    client, other_client = client_for(circuit, "plain"), client_for(other, "plain")
    keys = wire.encode_evaluation_keys(client)
    with serve(root, max_body_bytes=4 * MiB, max_key_bytes=4 * MiB) as http:
        response = http.post(f"/v1/models/{MODEL}/keys", content=keys)
        assert response.status_code == 201, response.text
        yield Target(
            http,
            circuit,
            client,
            response.json()["key_id"],
            keys,
            encrypt(circuit, client),
            wire.encode_evaluation_keys(other_client),
            encrypt(other, other_client, model=OTHER),
        )


Case = Callable[[Target], Any]


def _long_key_id(t: Target) -> Any:
    return t.http.post(t.infer_url, content=t.query, headers={"x-key-id": "a" * 4000})


CASES: dict[str, Case] = {
    "truncated query": lambda t: t.infer(t.query[: len(t.query) // 2]),
    "truncated prefix": lambda t: t.infer(t.query[:7]),
    "bit-flipped magic": lambda t: t.infer(flip(t.query, 1)),
    "bit-flipped header": lambda t: t.infer(flip(t.query, wire.PREFIX.size + 3)),
    "bit-flipped blob framing": lambda t: t.infer(
        flip(t.query, len(t.query) - len(body_of(t.query)) + 1)
    ),
    "other format version": lambda t: t.infer(wire.PREFIX.pack(wire.MAGIC, 2, 0) + t.query[10:]),
    "header claims 4 GiB": lambda t: t.infer(
        wire.PREFIX.pack(wire.MAGIC, 1, 2**32 - 1) + t.query[10:]
    ),
    "trailing bytes": lambda t: t.infer(t.query + b"\0" * 8),
    "oversized body": lambda t: t.infer(bytes(5 * MiB)),
    "gzip bomb as Content-Encoding": lambda t: t.infer(GZIP_BOMB, **{"content-encoding": "gzip"}),
    "gzip bomb as a key upload": lambda t: t.http.post(
        t.keys_url, content=GZIP_BOMB, headers={"content-encoding": "gzip"}
    ),
    "unknown model": lambda t: t.http.post(
        "/v1/models/nope/infer", content=t.query, headers={"x-key-id": t.key_id}
    ),
    "unknown key id": lambda t: t.infer(t.query, **{"x-key-id": "0" * 64}),
    "missing key id": lambda t: t.http.post(t.infer_url, content=t.query),
    "blank key id": lambda t: t.http.post(
        t.infer_url, content=t.query, headers={"x-key-id": "  "}
    ),
    "very long key id": _long_key_id,
    "key id path traversal": lambda t: t.infer(t.query, **{"x-key-id": "../../../etc/passwd"}),
    "model name path traversal": lambda t: t.http.post(
        "/v1/models/..%2F..%2Fetc/keys", content=t.keys
    ),
    "delete with traversal key id": lambda t: t.http.delete(
        f"/v1/models/{MODEL}/keys/..%2F..%2F{MODEL}"
    ),
    "empty body": lambda t: t.infer(b""),
    "empty key upload": lambda t: t.http.post(t.keys_url, content=b""),
    "JSON where binary expected": lambda t: t.http.post(
        t.infer_url, json={"ciphertexts": ["AAAA"]}, headers={"x-key-id": t.key_id}
    ),
    "form data where binary expected": lambda t: t.http.post(
        t.keys_url, files={"keys": ("keys.bin", t.keys)}
    ),
    "non-numeric Content-Length": lambda t: t.infer(t.query, **{"content-length": "12abc"}),
    "duplicated header field": lambda t: t.infer(
        reframe(t.query, raw_header=duplicate_field_header(t.query, "model", OTHER))
    ),
    "duplicated key name": lambda t: t.http.post(
        t.keys_url,
        content=reframe(t.keys, names=["galois_keys", "galois_keys"]),
    ),
    "huge declared count": lambda t: t.infer(reframe(t.query, count=2**40)),
    "huge declared blob size": lambda t: t.infer(reframe(t.query, sizes=[2**62])),
    "negative blob size": lambda t: t.infer(reframe(t.query, sizes=[-1])),
    "float blob size": lambda t: t.infer(reframe(t.query, sizes=[float(len(body_of(t.query)))])),
    "sizes summing past the body": lambda t: t.infer(
        reframe(t.query, sizes=[len(body_of(t.query)) + 1])
    ),
    "unknown kind": lambda t: t.infer(reframe(t.query, kind="weights")),
    "keys sent as a query": lambda t: t.infer(t.keys),
    "query sent as keys": lambda t: t.http.post(t.keys_url, content=t.query),
    "header with a binary field": lambda t: t.infer(reframe(t.query, library_version=b"\xff" * 8)),
    "header that is a list": lambda t: t.infer(
        reframe(t.query, raw_header=msgpack.packb([1, 2, 3]))
    ),
    "deeply nested header": lambda t: t.infer(
        reframe(t.query, raw_header=b"\x91" * 5000 + b"\xc0")
    ),
    "unknown header field": lambda t: t.infer(
        reframe(t.query, raw_header=msgpack.packb({**header_of(t.query), "x": 1}))
    ),
    "ciphertext for another model": lambda t: t.infer(t.other_query),
    "query naming another model": lambda t: t.infer(reframe(t.query, model=OTHER)),
    "keys for other parameters": lambda t: t.http.post(t.keys_url, content=t.other_keys),
    "secret key in the bundle": lambda t: t.http.post(
        t.keys_url,
        content=with_blob(
            reframe(t.keys, names=["secret_key", "galois_keys"]),
            0,
            t.client.serialize_keys(["secret_key"])["secret_key"],
        ),
    ),
    "public key in the bundle": lambda t: t.http.post(
        t.keys_url, content=reframe(t.keys, names=["public_key", "galois_keys"])
    ),
    "too many ciphertexts": lambda t: t.infer(
        wire.encode_ciphertexts(
            t.client, [t.client.load_ciphertext(blob_of(t.query))] * 65, model=MODEL
        )
    ),
}
GZIP_BOMB = gzip_bomb(256 * MiB)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_is_a_4xx_and_the_app_serves_on(plain: Target, case: str) -> None:
    before = peak_rss()
    assert_refused(CASES[case](plain))
    assert peak_rss() - before < RSS_GROWTH_BOUND
    assert_serves(plain)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random structural mutation: flip, overwrite, cut, insert or splice."""
    choice = rng.randrange(5)
    position = rng.randrange(len(data))
    if choice == 0:
        return flip(data, position, 1 << rng.randrange(8))
    if choice == 1:
        span = rng.randrange(1, 9)
        return (
            data[:position]
            + bytes(rng.randrange(256) for _ in range(span))
            + data[position + span :]
        )
    if choice == 2:
        return data[:position]
    if choice == 3:
        return data[:position] + rng.randbytes(rng.randrange(1, 64)) + data[position:]
    start = rng.randrange(len(data))
    return data[:position] + data[start : start + rng.randrange(1, 256)] + data[position:]


def mutations(data: bytes, seed: int, count: int, header_bias: float = 0.7) -> Iterator[bytes]:
    """Seeded mutations, most of them in the prefix and header, where the structure is."""
    rng = random.Random(seed)
    head = wire.PREFIX.size + wire.PREFIX.unpack_from(data)[2]
    for _ in range(count):
        if rng.random() < header_bias:
            yield mutate(data[:head], rng) + data[head:]
        else:
            yield data[:head] + mutate(data[head:], rng)


def test_random_mutations_of_queries_and_keys_are_never_a_5xx(plain: Target) -> None:
    before = peak_rss()
    statuses: dict[int, int] = {}
    for body in mutations(plain.query, seed=1, count=300):
        response = plain.infer(body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            assert_refused(response)
    for body in mutations(plain.keys, seed=2, count=150):
        response = plain.http.post(plain.keys_url, content=body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code not in (200, 201):
            assert_refused(response)
    assert sum(n for s, n in statuses.items() if s >= 400) > 300, statuses
    assert peak_rss() - before < RSS_GROWTH_BOUND
    assert_serves(plain)


# -- real parsers ---------------------------------------------------------------------------


def small_circuit() -> Circuit:
    """One 4x8 linear map at N=8192: keys of about a megabyte, a query of about 100 kB."""
    A = np.random.default_rng(3).normal(size=(4, 8))
    node = linear_node("y", "x", A, None, 8, baby_steps=2, duplicate=False)
    return Circuit(
        "lin",
        select_parameters(1, 16),
        "x",
        Layout((1, 8), 8, 1, 1),
        "y",
        Layout((1, 4), 8, 1, 1),
        [node],
        tuple(sorted(linear_rotation_steps(node, 8))),
        input_range=(-1.0, 1.0),
    )


def forged_keys(backend_name: str, keys: bytes) -> bytes:
    """A key envelope that passes every envelope check and makes the parser misbehave.

    OpenFHE: the relin key's first cereal length field (offset 61, in the framing before the
    parameters) says 2^40, and the parser tries to allocate that. SEAL bounds its loads by
    the context, so its forgery is a Galois key whose coefficients are overwritten.
    """
    names = header_of(keys)["names"]
    if backend_name == "openfhe":
        index = names.index("relin_keys")
        blob = blob_of(keys, index)
        return with_blob(keys, index, blob[:61] + (1 << 40).to_bytes(8, "little") + blob[69:])
    index = names.index("galois_keys")
    blob = blob_of(keys, index)
    middle = len(blob) // 2
    return with_blob(keys, index, blob[:middle] + bytes(4096) + blob[middle + 4096 :])


@pytest.fixture(scope="module", params=["seal", "openfhe"])
def real(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    require_backend(request.param)
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    (root / "models").mkdir()
    circuit = small_circuit()
    circuit.save(root / "models" / "lin.hec")
    client = client_for(circuit, request.param)
    keys = wire.encode_evaluation_keys(client)
    other = make_backend(request.param, select_parameters(2, 16))
    other.generate_keys([1])
    with serve(root, backend=request.param) as http:
        response = http.post("/v1/models/lin/keys", content=keys)
        assert response.status_code == 201, response.text
        yield Target(
            http,
            circuit,
            client,
            response.json()["key_id"],
            keys,
            encrypt(circuit, client),
            wire.encode_evaluation_keys(other),
            wire.encode_ciphertexts(
                other, [other.encrypt(np.zeros(other.params.slots))], model="lin"
            ),
        )


def test_real_parsers_refuse_altered_ciphertexts(real: Target) -> None:
    blob = blob_of(real.query)
    bodies = {
        "flipped SEAL/cereal header": with_blob(real.query, 0, flip(blob, 2)),
        "flipped body": with_blob(real.query, 0, flip(blob, len(blob) // 2)),
        "zeroed body": with_blob(real.query, 0, blob[:64] + bytes(len(blob) - 64)),
        "truncated blob": with_blob(real.query, 0, blob[: len(blob) - 100]),
        "padded blob": with_blob(real.query, 0, blob + bytes(100)),
        "blob of another context": with_blob(real.query, 0, blob_of(real.other_query)),
        "another context's query": real.other_query,
    }
    for name, body in bodies.items():
        response = real.infer(body)
        if name == "flipped body" and response.status_code == 200:
            continue  # zstd frames may not checksum every byte; a wrong result is the client's
        assert response.status_code in (400, 409), (name, response.text[:300])
        assert_refused(response)
    assert_serves(real)


def test_real_parsers_refuse_altered_keys_in_a_worker(real: Target) -> None:
    other_params = real.http.post(real.keys_url, content=real.other_keys)
    assert_refused(other_params, (409,))
    forged = real.http.post(real.keys_url, content=forged_keys(real.client.name, real.keys))
    assert_refused(forged, (400,))
    assert forged.json()["error"] == "MalformedPayloadError"
    before = peak_rss()
    for body in mutations(real.keys, seed=3, count=6, header_bias=0.0):
        response = real.http.post(real.keys_url, content=body)
        if response.status_code not in (200, 201):
            assert_refused(response)
    assert peak_rss() - before < RSS_GROWTH_BOUND
    assert_serves(real)


def test_random_mutations_of_real_queries_are_never_a_5xx(real: Target) -> None:
    before = peak_rss()
    for body in mutations(real.query, seed=4, count=40, header_bias=0.3):
        response = real.infer(body)
        if response.status_code != 200:
            assert_refused(response)
    assert peak_rss() - before < RSS_GROWTH_BOUND
    assert_serves(real)


# -- a real server process ------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend_name", ["openfhe", "seal"])
def test_uvicorn_survives_a_key_upload_that_breaks_the_parser(
    backend_name: str, tmp_path: Path
) -> None:
    from tests.servers import free_port as _free_port
    from tests.test_end_to_end import server_process

    require_backend(backend_name)
    circuit = small_circuit()
    (tmp_path / "models").mkdir()
    circuit.save(tmp_path / "models" / "lin.hec")
    client = client_for(circuit, backend_name)
    keys = wire.encode_evaluation_keys(client)
    port, log = _free_port(), tmp_path / "server.log"
    process = server_process(tmp_path / "models", tmp_path / "keys", backend_name, port, log)
    with process as url, httpx.Client(base_url=url, timeout=60) as http:
        refused = http.post("/v1/models/lin/keys", content=forged_keys(backend_name, keys))
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "MalformedPayloadError"
        assert http.get("/healthz").status_code == 200
        uploaded = http.post("/v1/models/lin/keys", content=keys)
        assert uploaded.status_code == 201, uploaded.text
        response = http.post(
            "/v1/models/lin/infer",
            content=encrypt(circuit, client),
            headers={"x-key-id": uploaded.json()["key_id"]},
        )
        assert response.status_code == 200, response.text
        assert wire.decode_ciphertexts(client, response.content, 8, model="lin")


def test_a_key_worker_past_its_time_limit_is_killed_and_refused(plain: Target) -> None:
    from he_inference.errors import MalformedPayloadError
    from server.parsing import check_keys_in_worker

    with pytest.raises(MalformedPayloadError, match="did not load within"):
        check_keys_in_worker(
            "plain", plain.circuit.params, plain.keys, memory_bytes=1 << 30, timeout_s=0.01
        )


def test_large_valid_seal_keys_load_in_the_worker_under_the_default_cap() -> None:
    # 32-bit primes compress well: these 9 keys upload as about 107 MB and load to 368 MB.
    # A cap of 4x the upload made SEAL spin until the time limit and refuse valid keys.
    from server.parsing import check_keys_in_worker, loaded_key_bytes, worker_memory_bytes
    from server.settings import Settings

    require_backend("seal")
    params = select_parameters(11, 8192, scale_bits=30, min_ring_degree=16384)
    steps = [1 << i for i in range(8)]
    backend = make_backend("seal", params)
    backend.generate_keys(steps)
    data = wire.encode_evaluation_keys(backend)
    defaults = Settings.model_fields
    memory = worker_memory_bytes(
        len(data),
        defaults["key_parse_memory_factor"].default,
        loaded_key_bytes("seal", params, len(steps) + 1),
    )
    assert memory > 7 * len(data)  # the least that loaded these keys when measured
    check_keys_in_worker(
        "seal",
        params,
        data,
        memory_bytes=memory,
        timeout_s=defaults["key_parse_timeout_s"].default,
    )
