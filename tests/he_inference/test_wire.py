"""Wire envelopes: round trips, and every way a hostile or damaged payload is refused.

The plain backend covers the exhaustive cases (every truncation, every header bit) because
it is exact and fast; SEAL and OpenFHE get round trips and sampled body damage.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from he_inference import wire
from he_inference.backends import make_backend
from he_inference.backends.plain import PlainBackend
from he_inference.errors import (
    HEInferenceError,
    MalformedPayloadError,
    ParameterMismatchError,
    SecretKeyLeakError,
    WireError,
)
from he_inference.params import CkksParameters, select_parameters

PARAMS = CkksParameters(8192, (60, 40, 40, 60), 40)
OTHER_PARAMS = CkksParameters(8192, (60, 40, 60), 40)


@pytest.fixture(scope="module")
def plain() -> PlainBackend:
    backend = PlainBackend(PARAMS)
    backend.generate_keys([1, 2, -1])
    return backend


@pytest.fixture(scope="module")
def query(plain: PlainBackend) -> bytes:
    cts = [plain.encrypt(np.arange(8.0) + i) for i in range(3)]
    return wire.encode_ciphertexts(plain, cts, model="mnist")


def _header(context: PlainBackend, /, **overrides: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "version": wire.FORMAT_VERSION,
        "kind": wire.KIND_CIPHERTEXTS,
        "backend": context.name,
        "library_version": context.library_version,
        "params": context.params.fingerprint(),
        "model": None,
        "count": 1,
        "sizes": [0],
        "names": None,
    }
    header.update(overrides)
    return header


def _raw(header: object, body: bytes = b"", *, version: int = wire.FORMAT_VERSION) -> bytes:
    """An envelope built by hand, bypassing :func:`wire.pack` and its checks."""
    encoded = msgpack.packb(header, use_bin_type=True)
    return wire.PREFIX.pack(wire.MAGIC, version, len(encoded)) + encoded + body


def _body_start(data: bytes) -> int:
    return wire.PREFIX.size + struct.unpack_from(">I", data, 6)[0]


# -- round trips ------------------------------------------------------------------------------


def test_ciphertexts_round_trip(plain: PlainBackend, query: bytes) -> None:
    cts = wire.decode_ciphertexts(plain, query, max_count=3, model="mnist")

    assert len(cts) == 3
    for i, ct in enumerate(cts):
        np.testing.assert_array_equal(plain.decrypt(ct)[:8], np.arange(8.0) + i)
    assert query[:4] == b"HEIW"


def test_ciphertexts_accept_any_model_when_none_is_expected(
    plain: PlainBackend, query: bytes
) -> None:
    assert len(wire.decode_ciphertexts(plain, query, max_count=3)) == 3


def test_evaluation_keys_round_trip(plain: PlainBackend) -> None:
    data = wire.encode_evaluation_keys(plain)
    keys = wire.decode_evaluation_keys(plain, data)

    assert keys == plain.serialize_keys()
    server = PlainBackend(PARAMS)
    server.load_keys(keys)
    assert server.rotation_steps == plain.rotation_steps
    assert not server.has_secret_key


def test_pack_unpack_keep_every_field() -> None:
    envelope = wire.Envelope(
        kind=wire.KIND_CIPHERTEXTS,
        backend="seal",
        library_version="4.1",
        params_fingerprint="abc",
        blobs=(b"one", b"", b"three"),
        model="m",
    )
    data = wire.pack(envelope)
    got = wire.unpack(
        data,
        kind="ciphertexts",
        backend="seal",
        params_fingerprint="abc",
        max_count=3,
        max_blob_bytes=5,
        model="m",
    )
    assert got == envelope


def test_key_id_is_the_sha256_of_the_envelope(plain: PlainBackend) -> None:
    data = wire.encode_evaluation_keys(plain)
    other = PlainBackend(PARAMS)
    other.generate_keys([3])

    assert wire.key_id(data) == hashlib.sha256(data).hexdigest()
    assert wire.key_id(data) == wire.key_id(wire.encode_evaluation_keys(plain))
    assert wire.key_id(data) != wire.key_id(wire.encode_evaluation_keys(other))


def test_real_backend_round_trip(real_backend_name: str) -> None:
    params = select_parameters(depth=1, slots=8)
    client = make_backend(real_backend_name, params)
    client.generate_keys([1])
    values = np.linspace(-1.0, 1.0, 8)

    query = wire.encode_ciphertexts(client, [client.encrypt(values)] * 2, model="m")
    cts = wire.decode_ciphertexts(client, query, max_count=2, model="m")
    for ct in cts:
        np.testing.assert_allclose(client.decrypt(ct)[:8], values, atol=1e-4)

    bundle = wire.encode_evaluation_keys(client)
    server = make_backend(real_backend_name, params)
    keys = wire.decode_evaluation_keys(server, bundle)
    assert set(keys) == {"relin_keys", "galois_keys"}
    server.load_keys(keys)
    assert not server.has_secret_key


# -- truncation and damage --------------------------------------------------------------------


def test_every_truncation_of_prefix_and_header_is_refused(
    plain: PlainBackend, query: bytes
) -> None:
    for end in range(_body_start(query) + 1):
        with pytest.raises(MalformedPayloadError):
            wire.decode_ciphertexts(plain, query[:end], max_count=3)


def test_truncations_and_extensions_of_the_body_are_refused(
    plain: PlainBackend, query: bytes
) -> None:
    start = _body_start(query)
    for end in (start + 1, start + 11, start + 12, len(query) // 2, len(query) - 1):
        with pytest.raises(MalformedPayloadError, match="truncated or altered"):
            wire.decode_ciphertexts(plain, query[:end], max_count=3)
    with pytest.raises(MalformedPayloadError, match="truncated or altered"):
        wire.decode_ciphertexts(plain, query + b"\0", max_count=3)


def test_every_header_bit_flip_raises_or_touches_only_the_library_version(
    plain: PlainBackend, query: bytes
) -> None:
    # The library version is carried for diagnosis and never compared, so a flip inside it
    # decodes; every other bit of the prefix and header is checked.
    version = plain.library_version.encode()
    lv_start = query.index(version)
    lv_range = range(lv_start, lv_start + len(version))
    for position in range(_body_start(query)):
        for bit in range(8):
            damaged = bytearray(query)
            damaged[position] ^= 1 << bit
            try:
                wire.decode_ciphertexts(plain, bytes(damaged), max_count=3, model="mnist")
            except HEInferenceError:
                continue
            assert position in lv_range, f"flip of bit {bit} at byte {position} went unseen"


def test_body_bit_flips_in_the_plain_backend(plain: PlainBackend, query: bytes) -> None:
    # The plain ciphertext has a 12-byte preamble (magic, level, slot count) and then raw
    # float64 values. Flips in the magic or slot count raise; a flip in the level either
    # raises or lands on another valid level; flips in the values cannot be detected (the
    # plain backend has no integrity check, like CKKS itself) and decode to other values.
    start = _body_start(query)
    for offset in (0, 3, 8, 9):
        damaged = bytearray(query)
        damaged[start + offset] ^= 0x01
        with pytest.raises(WireError):
            wire.decode_ciphertexts(plain, bytes(damaged), max_count=3)
    damaged = bytearray(query)
    damaged[start + 4] ^= 0x80  # level 0 -> 128, past the chain
    with pytest.raises(MalformedPayloadError, match="ciphertext 0 of 3"):
        wire.decode_ciphertexts(plain, bytes(damaged), max_count=3)
    damaged = bytearray(query)
    damaged[start + 12 + 8 + 7] ^= 0x40  # the exponent of slot 1
    cts = wire.decode_ciphertexts(plain, bytes(damaged), max_count=3)
    assert plain.decrypt(cts[0])[1] != 1.0


def test_body_bit_flips_in_real_backends(real_backend_name: str) -> None:
    # SEAL compresses and checks its serialisation, so most flips raise; OpenFHE's binary
    # format has no checksum and a flip in coefficient data loads as another ciphertext.
    # Either way only the error tree may come out.
    backend = make_backend(real_backend_name, select_parameters(depth=1, slots=8))
    backend.generate_keys([])
    data = wire.encode_ciphertexts(backend, [backend.encrypt(np.ones(8))])
    start = _body_start(data)
    rng = np.random.default_rng(7)
    positions = [start, start + 1, start + 8, start + 16, *rng.integers(start, len(data), 20)]
    for position in positions:
        damaged = bytearray(data)
        damaged[int(position)] ^= 1 << int(rng.integers(8))
        try:
            cts = wire.decode_ciphertexts(backend, bytes(damaged), max_count=1)
        except HEInferenceError:
            continue
        assert len(cts) == 1


def test_bad_magic_version_and_type(plain: PlainBackend, query: bytes) -> None:
    with pytest.raises(MalformedPayloadError, match="not a he-inference envelope"):
        wire.decode_ciphertexts(plain, b"XXXX" + query[4:], max_count=3)
    future = query[:4] + struct.pack(">H", 2) + query[6:]
    with pytest.raises(MalformedPayloadError, match="format version 2"):
        wire.decode_ciphertexts(plain, future, max_count=3)
    with pytest.raises(MalformedPayloadError, match="says version 2"):
        wire.decode_ciphertexts(plain, _raw(_header(plain, version=2)), max_count=3)
    with pytest.raises(MalformedPayloadError, match="bytes, not str"):
        wire.decode_ciphertexts(plain, "HEIW", max_count=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"count": 2}, "not one size each"),
        ({"count": 0, "sizes": []}, "not a positive integer"),
        ({"count": True}, "not a positive integer"),
        ({"sizes": [-1]}, "non-negative"),
        ({"sizes": ["1"]}, "non-negative"),
        ({"sizes": 5}, "not one size each"),
        ({"names": ["a", "b"]}, "not one name each"),
        ({"kind": "circuit"}, "unknown payload kind"),
        ({"backend": 7}, "field backend"),
        ({"model": "m" * 300}, "field model"),
        ({"extra": 1}, "exceeds max_map_len"),
    ],
)
def test_header_schema_is_enforced(
    plain: PlainBackend, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedPayloadError, match=message):
        wire.decode_ciphertexts(plain, _raw(_header(plain, **overrides)), max_count=3)


def test_header_that_is_not_a_map_or_has_trailing_bytes(plain: PlainBackend) -> None:
    with pytest.raises(MalformedPayloadError, match="not a map"):
        wire.decode_ciphertexts(plain, _raw([1, 2, 3]), max_count=3)
    encoded = msgpack.packb(_header(plain)) + b"\xc0"
    data = wire.PREFIX.pack(wire.MAGIC, 1, len(encoded)) + encoded
    with pytest.raises(MalformedPayloadError, match="does not parse"):
        wire.decode_ciphertexts(plain, data, max_count=3)


def test_missing_header_field(plain: PlainBackend) -> None:
    header = _header(plain)
    del header["names"]
    with pytest.raises(MalformedPayloadError, match=r"missing fields \['names'\]"):
        wire.decode_ciphertexts(plain, _raw(header), max_count=3)
    header["extra"] = None
    with pytest.raises(MalformedPayloadError, match=r"unknown fields \['extra'\]"):
        wire.decode_ciphertexts(plain, _raw(header), max_count=3)


# -- bounds -----------------------------------------------------------------------------------


def test_more_ciphertexts_than_allowed(plain: PlainBackend, query: bytes) -> None:
    with pytest.raises(MalformedPayloadError, match="holds 3 blobs and at most 2"):
        wire.decode_ciphertexts(plain, query, max_count=2)


def test_blob_larger_than_a_ciphertext_can_be(plain: PlainBackend) -> None:
    size = plain.max_ciphertext_bytes() + 1
    data = _raw(_header(plain, sizes=[size]), b"\0" * size)
    with pytest.raises(MalformedPayloadError, match="exceeds the limit"):
        wire.decode_ciphertexts(plain, data, max_count=1)


def test_blob_that_does_not_load_names_its_index(plain: PlainBackend, query: bytes) -> None:
    blob = b"PLN1" + b"\0" * 8
    data = _raw(_header(plain, count=2, sizes=[len(blob), 4]), blob + b"junk")
    with pytest.raises(WireError, match="ciphertext 0 of 2"):
        wire.decode_ciphertexts(plain, data, max_count=2)


_HUGE_CLAIMS = {
    # Each claims far more than the bytes that carry it: the decoder must notice from the
    # declared length alone, before it allocates or copies anything of that size.
    "blob of 8 GiB": None,
    "header of 4 GiB": wire.PREFIX.pack(wire.MAGIC, 1, 0xFFFFFFFF) + b"\x80",
    "array of 2^31": wire.PREFIX.pack(wire.MAGIC, 1, 5) + b"\xdd\x7f\xff\xff\xff",
    "string of 2 GiB": wire.PREFIX.pack(wire.MAGIC, 1, 5) + b"\xdb\x7f\xff\xff\xff",
    "map of 2^31": wire.PREFIX.pack(wire.MAGIC, 1, 5) + b"\xdf\x7f\xff\xff\xff",
}


@pytest.mark.parametrize("claim", sorted(_HUGE_CLAIMS))
def test_huge_claims_allocate_nothing(plain: PlainBackend, claim: str) -> None:
    data = _HUGE_CLAIMS[claim] or _raw(_header(plain, sizes=[1 << 33]), b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedPayloadError):
            wire.decode_ciphertexts(plain, data, max_count=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"decoding a small hostile payload peaked at {peak} bytes"


def test_huge_blob_claim_with_a_generous_blob_bound(plain: PlainBackend) -> None:
    data = _raw(_header(plain, sizes=[1 << 33]), b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedPayloadError, match="declares 8589934592 bytes"):
            wire.unpack(
                data,
                kind="ciphertexts",
                backend="plain",
                params_fingerprint=PARAMS.fingerprint(),
                max_count=1,
                max_blob_bytes=1 << 40,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_header_over_its_bound(plain: PlainBackend, query: bytes) -> None:
    with pytest.raises(MalformedPayloadError, match="limit is 16"):
        wire.unpack(
            query,
            kind="ciphertexts",
            backend="plain",
            params_fingerprint=PARAMS.fingerprint(),
            max_count=3,
            max_blob_bytes=1 << 20,
            max_header_bytes=16,
        )


def test_key_envelope_over_max_bytes(plain: PlainBackend) -> None:
    data = wire.encode_evaluation_keys(plain)
    with pytest.raises(MalformedPayloadError, match="limit is 10"):
        wire.decode_evaluation_keys(plain, data, max_bytes=10)


# -- the wrong context ------------------------------------------------------------------------


def test_wrong_backend_names_both_sides(plain: PlainBackend) -> None:
    data = wire.pack(wire.Envelope("ciphertexts", "seal", "4.1", "3f2a", (b"x",)))
    with pytest.raises(ParameterMismatchError) as info:
        wire.decode_ciphertexts(plain, data, max_count=1)
    assert str(info.value) == (
        f"envelope is for backend seal, params 3f2a, this context expects plain, "
        f"params {PARAMS.fingerprint()}"
    )


def test_wrong_params(plain: PlainBackend, query: bytes) -> None:
    other = PlainBackend(OTHER_PARAMS)
    with pytest.raises(ParameterMismatchError, match=OTHER_PARAMS.fingerprint()):
        wire.decode_ciphertexts(other, query, max_count=3)
    with pytest.raises(ParameterMismatchError, match=PARAMS.fingerprint()):
        wire.decode_evaluation_keys(other, wire.encode_evaluation_keys(plain))


def test_wrong_kind(plain: PlainBackend, query: bytes) -> None:
    keys = wire.encode_evaluation_keys(plain)
    with pytest.raises(ParameterMismatchError, match="holds evaluation_keys"):
        wire.decode_ciphertexts(plain, keys, max_count=3)
    with pytest.raises(MalformedPayloadError, match="at most 2"):
        wire.decode_evaluation_keys(plain, query)
    single = wire.encode_ciphertexts(plain, [plain.encrypt(np.ones(2))])
    with pytest.raises(ParameterMismatchError, match="holds ciphertexts"):
        wire.decode_evaluation_keys(plain, single)
    unnamed = _raw(_header(plain, kind="evaluation_keys", sizes=[2]), b"PL")
    with pytest.raises(MalformedPayloadError, match="must name the kind"):
        wire.decode_evaluation_keys(plain, unnamed)


def test_wrong_model(plain: PlainBackend, query: bytes) -> None:
    with pytest.raises(ParameterMismatchError, match=r"model 'mnist'.*expects 'cifar'"):
        wire.decode_ciphertexts(plain, query, max_count=3, model="cifar")
    anonymous = wire.encode_ciphertexts(plain, [plain.encrypt(np.ones(2))])
    with pytest.raises(ParameterMismatchError, match="model None"):
        wire.decode_ciphertexts(plain, anonymous, max_count=1, model="mnist")


# -- key bundles ------------------------------------------------------------------------------


def _key_envelope(plain: PlainBackend, names: list[str]) -> bytes:
    blobs = [b"PLN1" + name.encode() for name in names]
    header = _header(
        plain,
        kind="evaluation_keys",
        count=len(names),
        sizes=[len(b) for b in blobs],
        names=names,
    )
    return _raw(header, b"".join(blobs))


def test_secret_key_is_refused_on_both_ends(plain: PlainBackend) -> None:
    keys = plain.serialize_keys(["relin_keys", "secret_key"])
    envelope = wire.Envelope(
        "evaluation_keys",
        "plain",
        "x",
        PARAMS.fingerprint(),
        tuple(keys.values()),
        names=tuple(keys),
    )
    with pytest.raises(SecretKeyLeakError):
        wire.pack(envelope)
    with pytest.raises(SecretKeyLeakError, match="must never leave the client"):
        wire.decode_evaluation_keys(plain, _key_envelope(plain, ["relin_keys", "secret_key"]))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["public_key"], "not an evaluation key"),
        (["relin_keys", "rotation"], "unknown key kind"),
        (["galois_keys", "galois_keys"], "names a kind twice"),
        (["relin_keys", "galois_keys", "relin_keys"], "at most 2"),
    ],
)
def test_key_bundle_kinds_are_restricted(
    plain: PlainBackend, names: list[str], message: str
) -> None:
    with pytest.raises(MalformedPayloadError, match=message):
        wire.decode_evaluation_keys(plain, _key_envelope(plain, names))


def test_relin_keys_alone_are_a_bundle(plain: PlainBackend) -> None:
    keys = wire.decode_evaluation_keys(plain, _key_envelope(plain, ["relin_keys"]))
    assert keys == {"relin_keys": b"PLN1relin_keys"}


# -- fuzz -------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PLAIN = PlainBackend(PARAMS)
_PLAIN.generate_keys([1])
_QUERY = wire.encode_ciphertexts(_PLAIN, [_PLAIN.encrypt(np.ones(4))] * 2, model="m")


def _decode_both(data: bytes) -> None:
    for decode in (
        lambda: wire.decode_ciphertexts(_PLAIN, data, max_count=4),
        lambda: wire.decode_evaluation_keys(_PLAIN, data),
    ):
        with contextlib.suppress(HEInferenceError):
            decode()


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_both(data)


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_behind_a_valid_prefix(header: bytes) -> None:
    _decode_both(wire.PREFIX.pack(wire.MAGIC, wire.FORMAT_VERSION, len(header)) + header)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@_FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(wire._HEADER_FIELDS)), _VALUES), st.binary(max_size=64)
)
def test_fuzz_structured_headers(fields: dict[str, Any], body: bytes) -> None:
    header = _header(_PLAIN)
    header.update(fields)
    _decode_both(_raw(header, body))


@_FUZZ
@given(st.integers(0, len(_QUERY) - 1), st.binary(min_size=1, max_size=16))
def test_fuzz_splices_into_a_valid_query(position: int, patch: bytes) -> None:
    _decode_both(_QUERY[:position] + patch + _QUERY[position + len(patch) :])
