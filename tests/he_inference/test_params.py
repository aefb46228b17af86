"""CKKS parameter validation, selection against the HE Standard table, and fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from he_inference.errors import ConfigurationError, InsecureParametersError
from he_inference.params import (
    MAX_MODULUS_BITS,
    SECURITY_LEVELS,
    CkksParameters,
    NoiseFlooding,
    chain_bits,
    max_modulus_bits,
    select_flooding_parameters,
    select_parameters,
)

# Worked by hand from the bound table: at this scale and integer part the first and special
# primes have (scale + integer) bits, so a chain of depth d has 2 * (scale + integer) + d *
# scale bits, and "deepest" is the largest d under the bound of the row.
#   (security, ring degree, scale bits, integer bits, deepest depth that fits)
TABLE_ROWS = [
    (128, 4096, 20, 10, 2),  # 60 + 20d <= 109
    (128, 8192, 40, 20, 2),  # 120 + 40d <= 218
    (128, 16384, 40, 20, 7),  # <= 438
    (128, 32768, 40, 20, 19),  # <= 881
    (192, 4096, 20, 10, 0),  # 60 + 20d <= 75
    (192, 8192, 40, 20, 0),  # 120 + 40d <= 152
    (192, 16384, 40, 20, 4),  # <= 305
    (192, 32768, 40, 20, 12),  # <= 611
    (256, 4096, 20, 5, 0),  # 50 + 20d <= 58
    (256, 8192, 30, 10, 1),  # 80 + 30d <= 118
    (256, 16384, 40, 20, 2),  # 120 + 40d <= 237
    (256, 32768, 40, 20, 8),  # <= 476
]


def _row_id(row: tuple[int, int, int, int, int]) -> str:
    return f"{row[0]}-N{row[1]}"


@pytest.mark.parametrize("row", TABLE_ROWS, ids=_row_id)
def test_deepest_chain_of_a_row_selects_that_ring_degree(
    row: tuple[int, int, int, int, int],
) -> None:
    security, degree, scale, integer, deepest = row
    params = select_parameters(
        deepest, degree // 2, scale_bits=scale, integer_bits=integer, security_level=security
    )
    assert params.poly_modulus_degree == degree
    assert params.depth == deepest
    assert params.scale_bits == scale
    assert params.security_level == security
    assert params.total_bits <= MAX_MODULUS_BITS[security][degree]
    assert params.slots == degree // 2


@pytest.mark.parametrize("row", TABLE_ROWS, ids=_row_id)
def test_one_level_more_moves_up_a_ring_degree_or_is_refused(
    row: tuple[int, int, int, int, int],
) -> None:
    security, degree, scale, integer, deepest = row
    if degree == 32768:
        with pytest.raises(InsecureParametersError):
            select_parameters(
                deepest + 1, 1, scale_bits=scale, integer_bits=integer, security_level=security
            )
        return
    params = select_parameters(
        deepest + 1, degree // 2, scale_bits=scale, integer_bits=integer, security_level=security
    )
    assert params.poly_modulus_degree == 2 * degree


def test_slots_decide_the_ring_degree_when_the_depth_is_small() -> None:
    assert select_parameters(1, 4096, scale_bits=40).poly_modulus_degree == 8192
    assert select_parameters(1, 4097, scale_bits=40).poly_modulus_degree == 16384


def test_min_ring_degree_is_respected() -> None:
    params = select_parameters(1, 16, scale_bits=40, min_ring_degree=32768)
    assert params.poly_modulus_degree == 32768


def test_automatic_scale_is_the_largest_that_fits_the_smallest_ring() -> None:
    # Depth 3 at N=8192: 2 * (s + 20) + 3s <= 218 gives s <= 35.
    params = select_parameters(3, 4096)
    assert params.poly_modulus_degree == 8192
    assert params.scale_bits == 35
    assert params.coeff_modulus_bits == (55, 35, 35, 35, 55)


def test_chain_bits_caps_the_first_prime_at_sixty_bits() -> None:
    assert chain_bits(2, 45, 20) == (60, 45, 45, 60)
    assert chain_bits(0, 30, 10) == (40, 40)


@pytest.mark.parametrize("security", SECURITY_LEVELS)
def test_too_deep_a_circuit_is_refused_with_the_numbers(security: int) -> None:
    bound = MAX_MODULUS_BITS[security][32768]
    with pytest.raises(InsecureParametersError) as info:
        select_parameters(40, 1, security_level=security)
    message = str(info.value)
    assert "depth 40" in message
    assert "32768" in message
    assert str(bound) in message
    assert f"{security}-bit" in message


@pytest.mark.parametrize(
    ("degree", "bits", "security"),
    [
        (8192, (60, 40, 40, 40, 60), 128),  # 240 > 218
        (4096, (40, 30, 40), 128),  # 110 > 109
        (16384, (60, 40, 40, 40, 40, 40, 60), 256),  # 320 > 237
        (32768, (60, *([40] * 13), 60), 192),  # 640 > 611
    ],
)
def test_insecure_chain_is_refused_with_the_numbers(
    degree: int, bits: tuple[int, ...], security: int
) -> None:
    with pytest.raises(InsecureParametersError) as info:
        CkksParameters(degree, bits, 40 if bits[0] > 40 else 30, security)
    message = str(info.value)
    assert str(sum(bits)) in message
    assert str(MAX_MODULUS_BITS[security][degree]) in message
    assert str(degree) in message


def test_chain_at_the_bound_is_accepted() -> None:
    params = CkksParameters(8192, (58, 40, 40, 40, 40), 40)
    assert params.total_bits == 218 == max_modulus_bits(8192)


def _configuration_error(*args: object) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        CkksParameters(*args)  # type: ignore[arg-type]
    assert not isinstance(info.value, InsecureParametersError)
    return info.value


def test_primes_above_sixty_bits_are_refused() -> None:
    assert "61" in str(_configuration_error(8192, (61, 40, 60), 40))


def test_primes_below_twenty_bits_are_refused() -> None:
    assert "19" in str(_configuration_error(8192, (60, 19, 60), 19))


def test_scale_must_be_below_the_first_prime() -> None:
    message = str(_configuration_error(8192, (40, 40, 60), 40))
    assert "2^40" in message


def test_chain_needs_a_first_and_a_special_prime() -> None:
    _configuration_error(8192, (60,), 40)


def test_unknown_ring_degree_or_security_level_is_refused() -> None:
    assert "3000" in str(_configuration_error(3000, (60, 40, 60), 40))
    assert "100" in str(_configuration_error(8192, (60, 40, 60), 40, 100))
    with pytest.raises(ConfigurationError):
        select_parameters(1, 1, security_level=100)


def test_negative_depth_or_no_slots_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        select_parameters(-1, 16)
    with pytest.raises(ConfigurationError):
        select_parameters(1, 0)


def test_depth_slots_and_bits_derive_from_the_chain() -> None:
    params = CkksParameters(16384, (60, 40, 40, 40, 60), 40)
    assert params.depth == 3
    assert params.slots == 8192
    assert params.total_bits == 240
    assert params.first_prime_bits == 60
    assert params.special_prime_bits == 60


# -- fingerprints and the manifest form ------------------------------------------------------


def test_fingerprint_is_pinned() -> None:
    # Wire envelopes and key stores carry this value: a change here breaks stored keys and
    # every client of a deployed model, so it must be deliberate.
    assert CkksParameters(8192, (60, 40, 40, 60), 40).fingerprint() == "3ff14ed03b23e488"


def test_fingerprint_is_stable_across_instances_and_round_trips() -> None:
    params = CkksParameters(16384, (60, 40, 40, 60), 40, 128)
    again = CkksParameters(16384, (60, 40, 40, 60), 40, 128, extra={"hint": 1})
    assert params.fingerprint() == again.fingerprint()
    assert params == again
    restored = CkksParameters.from_dict(params.to_dict())
    assert restored == params
    assert restored.fingerprint() == params.fingerprint()


@pytest.mark.parametrize(
    "changed",
    [
        CkksParameters(32768, (60, 40, 40, 60), 40),
        CkksParameters(16384, (60, 40, 60), 40),
        CkksParameters(16384, (60, 39, 40, 60), 40),
        CkksParameters(16384, (60, 40, 40, 60), 39),
        CkksParameters(16384, (60, 40, 40, 60), 40, 192),
    ],
)
def test_fingerprint_changes_with_every_field(changed: CkksParameters) -> None:
    base = CkksParameters(16384, (60, 40, 40, 60), 40)
    assert changed.fingerprint() != base.fingerprint()
    assert len(changed.fingerprint()) == 16


def test_to_dict_is_json_ready_and_leaves_out_extra() -> None:
    data = CkksParameters(8192, (60, 40, 60), 40, extra={"hint": 2}).to_dict()
    assert data == {
        "poly_modulus_degree": 8192,
        "coeff_modulus_bits": [60, 40, 60],
        "scale_bits": 40,
        "security_level": 128,
    }


def test_from_dict_validates_again() -> None:
    data = CkksParameters(8192, (60, 40, 60), 40).to_dict()
    with pytest.raises(InsecureParametersError):
        CkksParameters.from_dict({**data, "coeff_modulus_bits": [60, 40, 40, 40, 60]})
    with pytest.raises(ConfigurationError):
        CkksParameters.from_dict({"poly_modulus_degree": 8192})
    with pytest.raises(ConfigurationError):
        CkksParameters.from_dict({**data, "coeff_modulus_bits": "60,40,60"})
    with pytest.raises(ConfigurationError):
        CkksParameters.from_dict({**data, "scale_bits": "forty"})


# -- noise-flooding decryption ---------------------------------------------------------------


def test_flooding_parameters_round_trip_and_change_the_fingerprint() -> None:
    plain = select_flooding_parameters(3, 512)
    flooded = CkksParameters(
        plain.poly_modulus_degree,
        plain.coeff_modulus_bits,
        plain.scale_bits,
        noise_flooding=NoiseFlooding(7.25, 40, 16),
    )
    data = flooded.to_dict()
    assert data["noise_flooding"] == {
        "noise_bits": 7.25,
        "statistical_security": 40,
        "adversarial_queries": 16,
    }
    assert CkksParameters.from_dict(data) == flooded
    assert flooded.fingerprint() != plain.fingerprint()
    # Without flooding the field is absent (older manifests and fingerprints are unchanged).
    assert "noise_flooding" not in plain.to_dict()
    assert CkksParameters.from_dict(plain.to_dict()).noise_flooding is None


def test_flooding_chain_is_scale_59_with_one_spare_level() -> None:
    # 60 + 59 * (d + 1) + 60, plus a second 60-bit P prime, under 438 bits at N=16384.
    params = select_flooding_parameters(3, 512)
    assert params.coeff_modulus_bits == (60, 59, 59, 59, 59, 60)
    assert (params.poly_modulus_degree, params.scale_bits, params.depth) == (16384, 59, 4)
    assert select_flooding_parameters(4, 512).poly_modulus_degree == 32768  # 475 > 438
    with pytest.raises(InsecureParametersError, match="--no-noise-flooding"):
        select_flooding_parameters(13, 512)


def test_flooding_security_and_queries_go_into_the_estimate() -> None:
    # sigma = sqrt(12 * queries) * 2^(security / 2) * 2^noise; OpenFHE adds the 2^15 * sqrt(12)
    # of security 30 and one query itself.
    flooding = NoiseFlooding(10.0, 40, 16)
    assert flooding.estimate_bits == pytest.approx(10 + 5 + 2)
    assert flooding.flooding_bits == pytest.approx(20 + np.log2(np.sqrt(12 * 16)) + 10)
    assert NoiseFlooding(10.0).flooding_bits == pytest.approx(15 + np.log2(np.sqrt(12)) + 10)


def test_flooding_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="exceeds OpenFHE"):
        NoiseFlooding(40.0)  # 2^56.8 of flooding
    with pytest.raises(ConfigurationError, match="at least 30"):
        NoiseFlooding(5.0, statistical_security=20)
    with pytest.raises(ConfigurationError, match="at least 30"):
        NoiseFlooding(5.0, adversarial_queries=0)
    with pytest.raises(ConfigurationError, match="select_flooding_parameters"):
        CkksParameters(16384, (60, 40, 40, 60), 40, noise_flooding=NoiseFlooding(5.0))
    with pytest.raises(ConfigurationError):
        CkksParameters.from_dict(
            {**select_flooding_parameters(1, 8).to_dict(), "noise_flooding": {"noise_bits": 1}}
        )
