"""The overhead proxy counts what the cost model says, and the comparison table reads right."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks import compare, overhead, scaling
from compiler import compile_model
from he_inference.backends import make_backend
from he_inference.circuit import Circuit, node_cost
from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input, run_plain

pytestmark = pytest.mark.plain


@pytest.fixture(scope="module")
def small_circuit() -> Circuit:
    model = scaling.mlp_model(inputs=16, hidden=8, layers=2)
    calibration = np.random.default_rng(0).uniform(-1, 1, (16, 16)).astype(np.float32)
    return compile_model(model, calibration, backend="plain", name="small")


def test_timing_proxy_counts_equal_node_cost_sums_on_plain(small_circuit: Circuit) -> None:
    backend = make_backend("plain", small_circuit.params)
    backend.generate_keys(small_circuit.rotation_steps)
    proxy = overhead.TimingBackend(backend)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16)).astype(np.float32)
    recorder = overhead.NodeRecorder(proxy)

    out, _ = Evaluator(small_circuit, proxy).run(encrypt_input(small_circuit, proxy, x), recorder)

    totals: dict[str, int] = {}
    for row, node in zip(recorder.rows, small_circuit.nodes, strict=True):
        counted = overhead.primitive_counts(row["counts"])
        expected = {k: v for k, v in node_cost(node).to_dict().items() if k in counted}
        assert counted == expected, node.name
        for key, value in counted.items():
            totals[key] = totals.get(key, 0) + value
    assert totals == overhead.expected_counts(small_circuit)
    # The proxy changes nothing: the same logits as the plain backend without it.
    np.testing.assert_allclose(
        decrypt_output(small_circuit, proxy, out), run_plain(small_circuit, x), atol=1e-9
    )


def test_overhead_summary_reports_every_node_and_the_target(small_circuit: Circuit) -> None:
    queries = np.random.default_rng(2).uniform(-1, 1, (2, 16)).astype(np.float32)
    report = overhead.measure_overhead(small_circuit, "plain", queries, repeat=2)

    assert [row["node"] for row in report["nodes"]] == [n.name for n in small_circuit.nodes]
    assert report["counts_as_node_cost"] == report["node_cost_sums"]
    assert report["primitive_sum_s"] > 0
    assert report["target_met"] == (report["proxied_overhead"] <= overhead.TARGET_OVERHEAD)
    assert "Python overhead" in overhead.format_report(report)


def _fake_system(latency: float, key_bytes: int, **extra: Any) -> dict[str, Any]:
    return {
        "poly_modulus_degree": 8192,
        "keygen_s": 1.0,
        "key_bytes": key_bytes,
        "query_bytes": 200_000,
        "result_bytes": 90_000,
        "latency_s": latency,
        "latency_samples_s": [latency] * 3,
        "timed_queries": 3,
        "agreement_queries": 3,
        "top1_agreement": 1.0,
        "max_abs_logit_diff": 3e-3,
        **extra,
    }


def test_compare_table_and_ratios_on_fake_figures() -> None:
    systems = {
        "onnxruntime": _fake_system(2e-5, 0, query_bytes=0, result_bytes=0),
        "he_seal": _fake_system(0.5, 15_000_000),
        "tenseal": _fake_system(7.0, 300_000_000, poly_modulus_degree=16384),
        "orion": {"unavailable": "no interpreter"},
    }
    report = {"systems": systems}

    rows = compare.build_table(report)
    text = compare.format_table(rows)
    ratios = compare.compute_ratios(systems)

    assert rows[0] == compare.COLUMNS
    assert [row[0] for row in rows[1:]] == [
        "onnxruntime (plaintext)",
        "he-inference, SEAL",
        "TenSEAL by hand",
        "Orion (Lattigo)",
    ]
    he_row = rows[2]
    assert he_row[3] == "15.0" and he_row[6] == "500" and he_row[8] == "100% of 3"
    assert rows[1][4] == "-"  # no ciphertexts in plaintext
    assert "unavailable: no interpreter" in text
    assert ratios["tenseal_latency_over_he_seal"]["value"] == pytest.approx(14.0)
    assert ratios["tenseal_latency_over_he_seal"]["paired_median"] == pytest.approx(14.0)
    assert ratios["tenseal_latency_over_he_seal"]["met"] is True
    assert ratios["he_seal_keys_over_tenseal_context"]["value"] == pytest.approx(0.05)
    assert ratios["he_seal_latency_over_plaintext"]["value"] == pytest.approx(25_000)
    assert "orion_latency_over_he_seal" not in ratios
    assert "MISSED" not in compare.format_ratios(ratios)
