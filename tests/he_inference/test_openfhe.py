"""What only the OpenFHE backend has: hoisting, Chebyshev series, global key maps, OpenMP.

The contract itself is covered for every backend by ``test_backends.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numpy as np
import pytest
from numpy.polynomial import chebyshev

from he_inference.backends import EVALUATION_KEY_KINDS, Backend, make_backend
from he_inference.errors import (
    ConfigurationError,
    KeyError_,
    LevelExhaustedError,
    ParameterMismatchError,
)
from he_inference.params import CkksParameters, NoiseFlooding, select_flooding_parameters
from tests.conftest import require_backend

pytestmark = pytest.mark.openfhe

PARAMS = CkksParameters(8192, (60, 40, 40, 60), 40)
# Depth 5 for the Chebyshev series (degree 7 takes five levels).
DEEP_PARAMS = CkksParameters(16384, (60, 40, 40, 40, 40, 40, 60), 40)
STEPS = (1, 3, -2, 100)
# 2^-(scale_bits - 20) per operation, as derived in test_backends.tolerance.
TOLERANCE = 4 * 2.0**-20


@pytest.fixture(autouse=True)
def _openfhe() -> None:
    require_backend("openfhe")


@functools.cache
def client(params: CkksParameters = PARAMS, seed: int = 0) -> Backend:
    """A client context with keys for ``STEPS``; ``seed`` tells distinct clients apart."""
    backend = make_backend("openfhe", params)
    backend.generate_keys(STEPS)
    return backend


def server_for(owner: Backend) -> Backend:
    """A fresh context holding only ``owner``'s evaluation keys."""
    server = make_backend("openfhe", owner.params)
    server.load_keys(owner.serialize_keys(EVALUATION_KEY_KINDS))
    return server


def values(
    params: CkksParameters, seed: int = 1, low: float = -1.0, high: float = 1.0
) -> np.ndarray:
    """Uniform slot values on [low, high]."""
    return np.random.default_rng(seed).uniform(low, high, params.slots)


def test_hoisted_rotations_equal_plain_rotations() -> None:
    backend = client()
    plain = make_backend("plain", PARAMS)
    plain.generate_keys(STEPS)
    x = values(PARAMS)
    steps = (*STEPS, 0)

    hoisted = backend.rotate_many(backend.encrypt(x), steps)
    expected = plain.rotate_many(plain.encrypt(x), steps)

    assert set(hoisted) == set(steps)
    for step in steps:
        error = np.max(np.abs(backend.decrypt(hoisted[step]) - plain.decrypt(expected[step])))
        assert error < TOLERANCE, f"step {step}: max error {error:.3g}"
        assert backend.level(hoisted[step]) == 0


def test_hoisted_rotation_without_its_key_names_the_step() -> None:
    backend = client()
    with pytest.raises(KeyError_, match="7"):
        backend.rotate_many(backend.encrypt(values(PARAMS)), [1, 7])


@pytest.mark.parametrize(("degree", "levels"), [(2, 3), (3, 4), (5, 4), (7, 5)])
def test_chebyshev_series_matches_chebval(degree: int, levels: int) -> None:
    backend = client(DEEP_PARAMS)
    lower, upper = -3.0, 5.0
    x = values(DEEP_PARAMS, low=lower, high=upper)
    coefficients = np.random.default_rng(degree).normal(size=degree + 1)

    result = backend.evaluate_chebyshev(backend.encrypt(x), coefficients, lower, upper)

    expected = chebyshev.chebval((2 * x - (lower + upper)) / (upper - lower), coefficients)
    scale = float(np.sum(np.abs(coefficients)))
    assert np.max(np.abs(backend.decrypt(result) - expected)) < 16 * TOLERANCE * scale
    # The depth documented in OpenFheBackend.evaluate_chebyshev.
    assert backend.level(result) == levels


def test_chebyshev_series_past_the_chain_is_a_level_error() -> None:
    backend = client()
    with pytest.raises(LevelExhaustedError):
        backend.evaluate_chebyshev(backend.encrypt(values(PARAMS)), np.ones(8), -1.0, 1.0)


def test_two_clients_in_one_process_keep_their_own_keys() -> None:
    alice, bob = client(PARAMS, seed=1), client(PARAMS, seed=2)
    alice_server, bob_server = server_for(alice), server_for(bob)
    x, y = values(PARAMS, 3), values(PARAMS, 4)

    for owner, server, data in ((alice, alice_server, x), (bob, bob_server, y)):
        ct = server.load_ciphertext(owner.serialize_ciphertext(owner.encrypt(data)))
        out = server.rescale(server.multiply(server.rotate(ct, 3), ct))
        answer = owner.load_ciphertext(server.serialize_ciphertext(out))
        assert np.max(np.abs(owner.decrypt(answer) - np.roll(data, -3) * data)) < 2 * TOLERANCE

    # Each server refuses the other client's ciphertexts and keys (the key tags differ).
    with pytest.raises(ParameterMismatchError):
        alice_server.load_ciphertext(bob.serialize_ciphertext(bob.encrypt(y)))
    with pytest.raises(ParameterMismatchError):
        alice_server.load_keys(bob.serialize_keys(["relin_keys"]))


def test_a_server_in_the_clients_process_shares_its_key_entry() -> None:
    owner = client()
    server = server_for(owner)
    assert server.rotation_steps == owner.rotation_steps
    assert not server.has_secret_key
    # Loading the same keys again is a no-op, not a clash with the client's entry.
    server.load_keys(owner.serialize_keys(EVALUATION_KEY_KINDS))
    assert server.rotation_steps == owner.rotation_steps


def test_keys_filed_under_a_tag_in_use_are_refused() -> None:
    owner, other = client(PARAMS, seed=5), client(PARAMS, seed=6)
    forged = bytearray(other.serialize_keys(["relin_keys"])["relin_keys"])
    tag = owner.serialize_keys(["relin_keys"])["relin_keys"][17:49]
    forged[17:49] = tag
    with pytest.raises(ParameterMismatchError):
        make_backend("openfhe", PARAMS).load_keys({"relin_keys": bytes(forged)})


def test_thread_count_is_applied_in_each_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from he_inference.backends.openfhe import THREADS_ENV, openmp_max_threads

    monkeypatch.setenv(THREADS_ENV, "3")
    backend = make_backend("openfhe", PARAMS)
    assert backend.threads == 3  # type: ignore[attr-defined]

    seen: list[int | None] = []

    def work() -> None:
        backend.encode(1.0)
        backend.rescale(backend.multiply_plain(client().encrypt(np.ones(4)), backend.encode(2.0)))
        seen.append(openmp_max_threads())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == [3]

    two = make_backend("openfhe", PARAMS, threads=2)
    two.encode(1.0)
    two.rescale(two.multiply_plain(client().encrypt(np.ones(4)), two.encode(1.0)))
    assert openmp_max_threads() == 2


@pytest.mark.parametrize("setting", ["0", "many"])
def test_bad_thread_setting_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    from he_inference.backends.openfhe import THREADS_ENV

    monkeypatch.setenv(THREADS_ENV, setting)
    with pytest.raises(ConfigurationError):
        make_backend("openfhe", PARAMS)


def test_key_switching_fits_the_same_ring_degree() -> None:
    # (60, 40, 40, 60) leaves no room for OpenFHE's two 60-bit P primes at N=8192: the first
    # prime is shortened so one P prime suffices. N=4096 fits only BV.
    assert "HYBRID" in client().key_switching  # type: ignore[attr-defined]
    small = make_backend("openfhe", CkksParameters(4096, (40, 30, 39), 30))
    assert small.key_switching.startswith("BV")  # type: ignore[attr-defined]


# -- noise-flooding decryption ------------------------------------------------------------

FLOODING_CHAIN = select_flooding_parameters(1, 8)  # N=16384, (60, 59, 59, 60)


def _flooding_product(backend: Backend, ct: object) -> object:
    """A product, a rotation and a plaintext product: two levels of the flooding chain."""
    square = backend.rescale(backend.multiply(ct, ct))
    return backend.rescale(
        backend.multiply_plain(backend.rotate(square, 1), backend.encode(0.5, 1))
    )


@functools.cache
def flooding_params() -> CkksParameters:
    """The flooding chain with the noise the product measures in an estimation context."""
    estimation = make_backend("openfhe", FLOODING_CHAIN, noise_estimation=True)
    estimation.generate_keys(STEPS)
    result = _flooding_product(estimation, estimation.encrypt(values(FLOODING_CHAIN)))
    noise = estimation.noise_bits(result)  # type: ignore[attr-defined]
    return dataclasses.replace(FLOODING_CHAIN, noise_flooding=NoiseFlooding(noise))


def test_flooding_chains_take_hybrid_key_switching() -> None:
    # select_flooding_parameters leaves room for OpenFHE's two 60-bit P primes, so HYBRID fits
    # (OpenFHE's own HEStd check) and BV's several times larger keys are never needed.
    for depth in (1, 3, 4, 10):
        params = select_flooding_parameters(depth, 8)
        flooding = dataclasses.replace(params, noise_flooding=NoiseFlooding(8.0))
        backend = make_backend("openfhe", flooding)
        assert backend.key_switching.startswith("HYBRID"), (depth, backend.key_switching)  # type: ignore[attr-defined]


def test_flooded_decryption_adds_the_published_noise() -> None:
    params = flooding_params()
    owner = client(params)
    server = server_for(owner)
    x = values(params)
    result = _flooding_product(
        server, server.load_ciphertext(owner.serialize_ciphertext(owner.encrypt(x)))
    )
    received = owner.load_ciphertext(server.serialize_ciphertext(result))
    first, second = owner.decrypt(received), owner.decrypt(received)

    flooding = params.noise_flooding
    assert flooding is not None
    noise = flooding.slot_noise(params.poly_modulus_degree)
    # Each decryption draws fresh flooding noise of the predicted size, some 2^17 times the
    # ciphertext's own noise (plain decryption would repeat up to OpenFHE's decoding noise).
    spread = float(np.std(first - second)) / math.sqrt(2)
    assert 0.7 * noise < spread < 1.4 * noise
    own = 2.0 ** (flooding.noise_bits - params.scale_bits) * math.sqrt(params.poly_modulus_degree)
    assert spread > 1000 * own
    expected = 0.5 * np.roll(x * x, -1)
    assert np.max(np.abs(first - expected)) < 8 * noise


def test_flooding_ciphertexts_load_only_into_flooding_contexts() -> None:
    params = flooding_params()
    owner = client(params)
    data = owner.serialize_ciphertext(owner.encrypt(values(params)))
    plain = make_backend("openfhe", dataclasses.replace(params, noise_flooding=None))
    with pytest.raises(ParameterMismatchError):
        plain.load_ciphertext(data)
    assert params.noise_flooding is not None
    louder = NoiseFlooding(params.noise_flooding.noise_bits + 1)
    other = dataclasses.replace(params, noise_flooding=louder)
    with pytest.raises(ParameterMismatchError):
        make_backend("openfhe", other).load_ciphertext(data)


def test_noise_is_measured_only_in_an_estimation_context() -> None:
    owner = client()
    with pytest.raises(ConfigurationError, match="noise_estimation=True"):
        owner.noise_bits(owner.encrypt(values(PARAMS)))  # type: ignore[attr-defined]
    # Off the flooding chain the estimate would be at the wrong scale.
    with pytest.raises(ConfigurationError, match="2\\^59"):
        make_backend("openfhe", PARAMS, noise_estimation=True)
