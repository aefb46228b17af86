"""The evaluator on hand-built circuits: exact on plain, within CKKS noise on real backends."""

from __future__ import annotations

import numpy as np
import pytest

from he_inference.backends import make_backend
from he_inference.evaluate import Evaluator, decrypt_output, encrypt_input, run_local, run_plain
from tests.he_inference.circuits import linear_node, mlp_circuit, mlp_reference


def test_mlp_on_plain_matches_numpy_exactly() -> None:
    circuit, weights = mlp_circuit(np.random.default_rng(1))
    x = np.random.default_rng(2).uniform(-1, 1, size=(1, 1, 12))
    out = run_plain(circuit, x[0])
    np.testing.assert_allclose(out.reshape(1, -1), mlp_reference(weights, x), rtol=1e-9, atol=1e-9)


def test_linear_spanning_several_chunks_on_plain() -> None:
    rng = np.random.default_rng(3)
    period = 16
    A = rng.normal(size=(37, 45))
    b = rng.normal(size=37)
    node = linear_node("y", "x", A, b, period, baby_steps=4, duplicate=False)
    circuit, _ = mlp_circuit(rng, period=period)
    from he_inference.circuit import Layout, linear_rotation_steps

    circuit.nodes = [node]
    circuit.input_layout = Layout((45,), period, 3)
    circuit.output_layout = Layout((37,), period, 3)
    circuit.rotation_steps = tuple(sorted(linear_rotation_steps(node, period)))
    x = rng.normal(size=45)
    np.testing.assert_allclose(run_plain(circuit, x)[0], A @ x + b, rtol=1e-9, atol=1e-9)


def test_throughput_batch_answers_each_query_and_leaves_unused_slots_zero() -> None:
    circuit, weights = mlp_circuit(np.random.default_rng(4), batch=3)
    x = np.random.default_rng(5).uniform(-1, 1, size=(3, 1, 12))
    backend = make_backend("plain", circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    outputs, timings = Evaluator(circuit, backend).run(encrypt_input(circuit, backend, x))
    got = decrypt_output(circuit, backend, outputs)
    np.testing.assert_allclose(got.reshape(3, -1), mlp_reference(weights, x), atol=1e-9)

    # Every slot that is not a first copy of an output element must be exactly zero.
    slots = backend.decrypt(outputs[0])
    used = circuit.output_layout.slot_indices(circuit.params.slots).ravel()
    mask = np.ones(slots.size, bool)
    mask[used] = False
    assert np.all(slots[mask] == 0.0)
    assert [t.name for t in timings] == [n.name for n in circuit.nodes]


def test_missing_rotation_key_is_reported() -> None:
    from he_inference.errors import KeyError_

    circuit, _ = mlp_circuit(np.random.default_rng(6))
    backend = make_backend("plain", circuit.params)
    backend.generate_keys(circuit.rotation_steps[1:])
    with pytest.raises(KeyError_, match="rotation step"):
        Evaluator(circuit, backend).run(encrypt_input(circuit, backend, np.zeros((1, 12))))


def test_mlp_on_real_backend_within_ckks_noise(real_backend_name: str) -> None:
    circuit, weights = mlp_circuit(np.random.default_rng(7), period=16, degree=5)
    x = np.random.default_rng(8).uniform(-1, 1, size=(1, 1, 12))
    out = run_local(circuit, x[0], real_backend_name)
    expected = mlp_reference(weights, x)
    # At scale 2^s each rescale leaves an error near sqrt(N) * 2^-s relative to the values;
    # over a handful of levels and values of order 1 that stays far below 1e-3.
    tolerance = 1e-3 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(out.reshape(1, -1), expected, atol=tolerance)
