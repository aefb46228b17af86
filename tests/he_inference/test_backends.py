"""The backend contract, run against every backend (plain, seal, openfhe).

These tests are written against ``backends/base.py``, not against one library: a backend
passes when it keeps the slot semantics of the plain reference within CKKS noise, refuses
what the contract says it refuses, and rejects bad payloads with a ``WireError`` and never
with a crash.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import pytest

from he_inference.backends import EVALUATION_KEY_KINDS, KEY_KINDS, Backend, make_backend
from he_inference.errors import (
    CircuitError,
    InputError,
    InsecureParametersError,
    KeyError_,
    LevelExhaustedError,
    MalformedPayloadError,
    ParameterMismatchError,
    WireError,
)
from he_inference.params import CkksParameters

# N=8192 with two levels (200 of the 218 bits allowed): small enough that keygen takes a
# fraction of a second, deep enough for a product of products.
PARAMS = CkksParameters(8192, (60, 40, 40, 60), 40)
# Same ring degree and another chain; another ring degree altogether.
OTHER_PARAMS = (
    CkksParameters(8192, (60, 40, 60), 40),
    CkksParameters(4096, (40, 30, 39), 30),
)
STEPS = (1, 2, 5, -1)
SLOTS = PARAMS.slots


def tolerance(params: CkksParameters, levels: int = 0, magnitude: float = 1.0) -> float:
    """The absolute error allowed on values of ``magnitude`` after ``levels`` rescales.

    A CKKS slot carries ``v * 2^scale_bits`` plus noise. Fresh encryption noise decodes to
    about ``6 * 3.2 * sqrt(N)`` before division by the scale, under 2^11 for N <= 32768,
    and each rescale adds rounding noise of the same order plus, where a backend pins the
    scale to exactly 2^scale_bits, a gain error ``|q_i / 2^scale_bits - 1|`` that stays below
    2^-20 for 40-bit primes at N=8192. So 2^-(scale_bits - 20) bounds one step with room
    for the product of two values of this magnitude, a factor 4 is headroom, and the
    errors of successive rescales add.
    """
    return 4.0 * (levels + 1) * 2.0 ** -(params.scale_bits - 20) * max(magnitude, 1.0)


def assert_close(actual: np.ndarray, expected: np.ndarray, levels: int = 0) -> None:
    """Compare decrypted slots with the exact result at the tolerance for ``levels``."""
    expected = np.asarray(expected, dtype=np.float64)
    tol = tolerance(PARAMS, levels, float(np.max(np.abs(expected), initial=1.0)))
    error = float(np.max(np.abs(actual - expected)))
    assert error <= tol, f"max error {error:.3g} exceeds {tol:.3g} after {levels} rescales"


@functools.cache
def keyed_backend(name: str, params: CkksParameters = PARAMS) -> Backend:
    """A client context with keys for ``STEPS``, shared by the tests that do not mutate it."""
    backend = make_backend(name, params)
    backend.generate_keys(STEPS)
    return backend


def server_backend(client: Backend) -> Backend:
    """A fresh context holding only the client's evaluation keys, like the server's."""
    server = make_backend(client.name, client.params)
    server.load_keys(client.serialize_keys(EVALUATION_KEY_KINDS))
    return server


@pytest.fixture
def backend(backend_name: str) -> Backend:
    return keyed_backend(backend_name)


@pytest.fixture
def values() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.uniform(-1.0, 1.0, SLOTS)


@pytest.fixture
def other_values() -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.uniform(-1.0, 1.0, SLOTS)


# -- encryption and arithmetic ----------------------------------------------------------------


def test_encrypt_decrypt_round_trip(backend: Backend, values: np.ndarray) -> None:
    ct = backend.encrypt(values)
    assert backend.level(ct) == 0
    decrypted = backend.decrypt(ct)
    assert decrypted.dtype == np.float64
    assert decrypted.shape == (SLOTS,)
    assert_close(decrypted, values)


def test_encrypt_zero_pads_short_inputs(backend: Backend) -> None:
    decrypted = backend.decrypt(backend.encrypt(np.array([1.5, -2.0, 3.25])))
    expected = np.zeros(SLOTS)
    expected[:3] = [1.5, -2.0, 3.25]
    assert_close(decrypted, expected)


def test_encrypt_refuses_more_values_than_slots(backend: Backend) -> None:
    with pytest.raises(InputError):
        backend.encrypt(np.zeros(SLOTS + 1))


def test_add_sub_negate(backend: Backend, values: np.ndarray, other_values: np.ndarray) -> None:
    a, b = backend.encrypt(values), backend.encrypt(other_values)
    assert_close(backend.decrypt(backend.add(a, b)), values + other_values)
    assert_close(backend.decrypt(backend.sub(a, b)), values - other_values)
    assert_close(backend.decrypt(backend.negate(a)), -values)


def test_add_plain_vector_and_scalar(backend: Backend, values: np.ndarray) -> None:
    ct = backend.encrypt(values)
    offsets = np.linspace(-3.0, 3.0, SLOTS)
    assert_close(backend.decrypt(backend.add_plain(ct, backend.encode(offsets))), values + offsets)
    assert_close(backend.decrypt(backend.add_plain(ct, backend.encode(0.5))), values + 0.5)


def test_multiply_plain_then_rescale_drops_one_level(backend: Backend, values: np.ndarray) -> None:
    weights = np.linspace(-2.0, 2.0, SLOTS)
    product = backend.multiply_plain(backend.encrypt(values), backend.encode(weights))
    assert backend.level(product) == 0
    result = backend.rescale(product)
    assert backend.level(result) == 1
    assert_close(backend.decrypt(result), values * weights, levels=1)


def test_multiply_plain_by_scalar_and_by_zero(backend: Backend, values: np.ndarray) -> None:
    ct = backend.encrypt(values)
    scaled = backend.rescale(backend.multiply_plain(ct, backend.encode(-1.5)))
    assert_close(backend.decrypt(scaled), -1.5 * values, levels=1)
    zero = backend.rescale(backend.multiply_plain(ct, backend.encode(0.0)))
    assert backend.level(zero) == 1
    assert_close(backend.decrypt(zero), np.zeros(SLOTS), levels=1)


def test_multiply_relinearises_and_rescale_drops_one_level(
    backend: Backend, values: np.ndarray, other_values: np.ndarray
) -> None:
    product = backend.multiply(backend.encrypt(values), backend.encrypt(other_values))
    result = backend.rescale(product)
    assert backend.level(result) == 1
    assert_close(backend.decrypt(result), values * other_values, levels=1)
    # Products at the same level add before their shared rescale.
    total = backend.add(product, product)
    assert_close(backend.decrypt(backend.rescale(total)), 2 * values * other_values, levels=1)


def test_encode_at_a_lower_level_matches_a_rescaled_ciphertext(
    backend: Backend, values: np.ndarray
) -> None:
    ct = backend.rescale(backend.multiply_plain(backend.encrypt(values), backend.encode(2.0)))
    shifted = backend.add_plain(ct, backend.encode(1.0, level=1))
    assert_close(backend.decrypt(shifted), 2 * values + 1, levels=1)


@pytest.mark.parametrize("step", [1, 2, 5, -1, SLOTS + 1, -(SLOTS - 1)])
def test_rotate_is_a_left_rotation(backend: Backend, values: np.ndarray, step: int) -> None:
    rotated = backend.rotate(backend.encrypt(values), step)
    assert_close(backend.decrypt(rotated), np.roll(values, -step))


def test_rotate_by_zero_is_the_identity(backend: Backend, values: np.ndarray) -> None:
    assert_close(backend.decrypt(backend.rotate(backend.encrypt(values), 0)), values)


def test_rotation_steps_are_normalised(backend: Backend) -> None:
    assert backend.rotation_steps == (1, 2, 5, SLOTS - 1)


def test_rotate_without_galois_key_names_the_step(backend: Backend, values: np.ndarray) -> None:
    ct = backend.encrypt(values)
    with pytest.raises(KeyError_, match="3"):
        backend.rotate(ct, 3)


def test_rotate_many_returns_every_step(backend: Backend, values: np.ndarray) -> None:
    rotated = backend.rotate_many(backend.encrypt(values), [0, 1, -1])
    for step, ct in rotated.items():
        assert_close(backend.decrypt(ct), np.roll(values, -step))


def test_drop_to_level_keeps_the_value(backend: Backend, values: np.ndarray) -> None:
    dropped = backend.drop_to_level(backend.encrypt(values), 2)
    assert backend.level(dropped) == 2
    assert_close(backend.decrypt(dropped), values)


def test_drop_to_level_refuses_to_go_up_or_past_the_chain(
    backend: Backend, values: np.ndarray
) -> None:
    low = backend.drop_to_level(backend.encrypt(values), 1)
    with pytest.raises(CircuitError):
        backend.drop_to_level(low, 0)
    with pytest.raises(LevelExhaustedError):
        backend.drop_to_level(low, PARAMS.depth + 1)


def test_operands_at_different_levels_are_refused(backend: Backend, values: np.ndarray) -> None:
    top = backend.encrypt(values)
    low = backend.drop_to_level(backend.encrypt(values), 1)
    with pytest.raises(CircuitError):
        backend.add(top, low)
    with pytest.raises(CircuitError):
        backend.multiply(top, low)
    with pytest.raises(CircuitError):
        backend.multiply_plain(low, backend.encode(2.0, level=0))


def test_multiplications_reach_the_last_level_then_exhaust_the_chain(backend: Backend) -> None:
    x = np.linspace(-1.0, 1.0, SLOTS)
    ct, expected = backend.encrypt(x), x
    for level in range(1, PARAMS.depth + 1):
        ct = backend.rescale(backend.multiply(ct, ct))
        expected = expected * expected
        assert backend.level(ct) == level
        assert_close(backend.decrypt(ct), expected, levels=level)
    with pytest.raises(LevelExhaustedError):
        backend.rescale(backend.multiply(ct, ct))


def test_concurrent_evaluation_on_one_context(backend: Backend, values: np.ndarray) -> None:
    server = server_backend(backend)
    ct = server.load_ciphertext(backend.serialize_ciphertext(backend.encrypt(values)))
    results: dict[int, bytes] = {}

    def work(index: int) -> None:
        rotated = server.rotate(ct, 1)
        results[index] = server.serialize_ciphertext(server.rescale(server.multiply(rotated, ct)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for data in results.values():
        decrypted = backend.decrypt(backend.load_ciphertext(data))
        assert_close(decrypted, np.roll(values, -1) * values, levels=1)


# -- serialisation ----------------------------------------------------------------------------


def test_ciphertext_round_trip_keeps_value_and_level(backend: Backend, values: np.ndarray) -> None:
    fresh = backend.encrypt(values)
    deep = backend.rescale(backend.multiply(fresh, fresh))
    for ct, level, expected in ((fresh, 0, values), (deep, 1, values * values)):
        data = backend.serialize_ciphertext(ct)
        assert isinstance(data, bytes)
        assert len(data) <= backend.max_ciphertext_bytes()
        loaded = backend.load_ciphertext(data)
        assert backend.level(loaded) == level
        assert_close(backend.decrypt(loaded), expected, levels=level)


def test_server_evaluates_and_only_the_client_decrypts(
    backend: Backend, values: np.ndarray
) -> None:
    server = server_backend(backend)
    assert not server.has_secret_key
    assert server.rotation_steps == backend.rotation_steps

    query = server.load_ciphertext(backend.serialize_ciphertext(backend.encrypt(values)))
    result = server.rescale(server.multiply(server.rotate(query, 2), query))
    with pytest.raises(KeyError_):
        server.decrypt(result)

    answer = backend.load_ciphertext(server.serialize_ciphertext(result))
    assert_close(backend.decrypt(answer), np.roll(values, -2) * values, levels=1)


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_each_key_kind_round_trips(backend_name: str, kind: str, values: np.ndarray) -> None:
    client = keyed_backend(backend_name)
    data = client.serialize_keys([kind])
    assert set(data) == {kind}
    assert data[kind]

    fresh = make_backend(backend_name, PARAMS)
    fresh.load_keys(data)
    assert fresh.has_secret_key == (kind == "secret_key")
    if kind == "secret_key":
        assert_close(fresh.decrypt(fresh.encrypt(values)), values)
        ct = fresh.load_ciphertext(client.serialize_ciphertext(client.encrypt(values)))
        assert_close(fresh.decrypt(ct), values)
    elif kind == "public_key":
        ct = client.load_ciphertext(fresh.serialize_ciphertext(fresh.encrypt(values)))
        assert_close(client.decrypt(ct), values)
    elif kind == "relin_keys":
        ct = fresh.load_ciphertext(client.serialize_ciphertext(client.encrypt(values)))
        product = fresh.rescale(fresh.multiply(ct, ct))
        answer = client.load_ciphertext(fresh.serialize_ciphertext(product))
        assert_close(client.decrypt(answer), values * values, levels=1)
    else:
        assert fresh.rotation_steps == client.rotation_steps
        ct = fresh.load_ciphertext(client.serialize_ciphertext(client.encrypt(values)))
        answer = client.load_ciphertext(fresh.serialize_ciphertext(fresh.rotate(ct, -1)))
        assert_close(client.decrypt(answer), np.roll(values, 1))


def test_serialize_keys_defaults_to_the_evaluation_keys(backend: Backend) -> None:
    assert set(backend.serialize_keys()) == set(EVALUATION_KEY_KINDS)


def test_a_context_without_keys_refuses_to_serialise_or_encrypt(backend_name: str) -> None:
    empty = make_backend(backend_name, PARAMS)
    assert not empty.has_secret_key
    with pytest.raises(KeyError_):
        empty.serialize_keys(["secret_key"])


def test_evaluation_keys_alone_cannot_decrypt(backend: Backend, values: np.ndarray) -> None:
    server = server_backend(backend)
    assert not server.has_secret_key
    ct = server.load_ciphertext(backend.serialize_ciphertext(backend.encrypt(values)))
    with pytest.raises(KeyError_):
        server.decrypt(ct)
    with pytest.raises(KeyError_):
        server.serialize_keys(["secret_key"])


# -- rejected payloads ------------------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _truncations(data: bytes) -> list[bytes]:
    cuts = {0, 1, 8, 16, len(data) // 2, len(data) - 1}
    return [data[:cut] for cut in sorted(cuts) if cut < len(data)]


def _paddings(data: bytes) -> list[bytes]:
    return [data + b"\x00", data + data[:64], data + data]


def test_truncated_or_padded_ciphertexts_are_rejected(
    backend: Backend, values: np.ndarray
) -> None:
    data = backend.serialize_ciphertext(backend.encrypt(values))
    for bad in _truncations(data) + _paddings(data):
        with pytest.raises(WireError):
            backend.load_ciphertext(bad)


def test_oversized_ciphertext_is_rejected(backend: Backend) -> None:
    with pytest.raises(MalformedPayloadError):
        backend.load_ciphertext(b"\x00" * (backend.max_ciphertext_bytes() + 1))


def test_garbage_is_not_a_ciphertext(backend: Backend) -> None:
    rng = np.random.default_rng(3)
    for size in (4, 100, 10_000):
        with pytest.raises(WireError):
            backend.load_ciphertext(rng.bytes(size))


def test_flipped_header_bits_are_rejected(backend: Backend, values: np.ndarray) -> None:
    data = backend.serialize_ciphertext(backend.encrypt(values))
    for bit in range(32):
        with pytest.raises(WireError):
            backend.load_ciphertext(_flip(data, bit))


def test_flipped_body_bits_never_crash(backend: Backend, values: np.ndarray) -> None:
    # Without a MAC a flip in the coefficients can still be a valid ciphertext (the wire
    # envelope carries the hash that catches it); what the backend owes is no crash and no
    # exception outside the WireError tree.
    data = backend.serialize_ciphertext(backend.encrypt(values))
    for position in (40, 100, len(data) // 3, len(data) // 2, len(data) - 9):
        with contextlib.suppress(WireError):
            backend.load_ciphertext(_flip(data, 8 * position + 3))


def test_keys_are_not_ciphertexts(backend: Backend) -> None:
    for data in backend.serialize_keys().values():
        with pytest.raises(WireError):
            backend.load_ciphertext(data)


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_truncated_padded_or_flipped_keys_are_rejected(backend_name: str, kind: str) -> None:
    data = keyed_backend(backend_name).serialize_keys([kind])[kind]
    bad_payloads = _truncations(data) + _paddings(data) + [_flip(data, bit) for bit in range(32)]
    fresh = make_backend(backend_name, PARAMS)
    for bad in bad_payloads:
        with pytest.raises(WireError):
            fresh.load_keys({kind: bad})
        assert not fresh.has_secret_key


@pytest.mark.parametrize("other", OTHER_PARAMS, ids=lambda p: f"N{p.poly_modulus_degree}")
def test_ciphertexts_of_other_parameters_are_rejected(
    real_backend_name: str, other: CkksParameters
) -> None:
    foreign = keyed_backend(real_backend_name, other)
    data = foreign.serialize_ciphertext(foreign.encrypt(np.ones(4)))
    with pytest.raises((MalformedPayloadError, ParameterMismatchError)):
        keyed_backend(real_backend_name).load_ciphertext(data)


@pytest.mark.parametrize("other", OTHER_PARAMS, ids=lambda p: f"N{p.poly_modulus_degree}")
@pytest.mark.parametrize("kind", KEY_KINDS)
def test_keys_of_other_parameters_are_rejected(
    real_backend_name: str, other: CkksParameters, kind: str
) -> None:
    data = keyed_backend(real_backend_name, other).serialize_keys([kind])
    fresh = make_backend(real_backend_name, PARAMS)
    with pytest.raises((MalformedPayloadError, ParameterMismatchError)):
        fresh.load_keys(data)


def test_max_ciphertext_bytes_bounds_public_key_encryption(
    backend: Backend, values: np.ndarray
) -> None:
    encryptor = make_backend(backend.name, PARAMS)
    encryptor.load_keys(backend.serialize_keys(["public_key"]))
    data = encryptor.serialize_ciphertext(encryptor.encrypt(values))
    assert len(data) <= backend.max_ciphertext_bytes()


# -- SEAL specifics ---------------------------------------------------------------------------


@pytest.mark.seal
def test_seal_seeded_encryption_halves_the_ciphertext(values: np.ndarray) -> None:
    from tests.conftest import require_backend

    require_backend("seal")
    client = keyed_backend("seal")
    encryptor = make_backend("seal", PARAMS)
    encryptor.load_keys(client.serialize_keys(["public_key"]))
    seeded = len(client.serialize_ciphertext(client.encrypt(values)))
    full = len(encryptor.serialize_ciphertext(encryptor.encrypt(values)))
    assert 0.4 < seeded / full < 0.6


@pytest.mark.seal
def test_seal_names_other_parameters_as_a_mismatch() -> None:
    from tests.conftest import require_backend

    require_backend("seal")
    pytest.importorskip("zstandard", reason="SEAL payloads are zstd frames; without it, malformed")
    foreign = keyed_backend("seal", OTHER_PARAMS[0])
    with pytest.raises(ParameterMismatchError):
        keyed_backend("seal").load_ciphertext(foreign.serialize_ciphertext(foreign.encrypt([1.0])))
    with pytest.raises(ParameterMismatchError):
        make_backend("seal", PARAMS).load_keys(foreign.serialize_keys(["relin_keys"]))


def _unchecked(degree: int, bits: tuple[int, ...], scale_bits: int) -> CkksParameters:
    """Parameters that skip ``validate``, to see the library enforce the bound on its own."""
    params = object.__new__(CkksParameters)
    for name, value in (
        ("poly_modulus_degree", degree),
        ("coeff_modulus_bits", bits),
        ("scale_bits", scale_bits),
        ("security_level", 128),
        ("extra", {}),
    ):
        object.__setattr__(params, name, value)
    return params


@pytest.mark.seal
def test_seal_enforces_the_security_bound_itself() -> None:
    from tests.conftest import require_backend

    require_backend("seal")
    make_backend("seal", _unchecked(8192, (58, 40, 40, 40, 40), 40))  # 218 bits: the bound
    with pytest.raises(InsecureParametersError, match="8192"):
        make_backend("seal", _unchecked(8192, (59, 40, 40, 40, 40), 40))  # 219 bits
