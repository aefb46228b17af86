"""One torch CNN exported every way torch can: each file compiles to the same circuit.

The files in ``data/`` were written by ``data/make_variants.py`` (legacy and dynamo
exporters, four ways to flatten, static and dynamic batch, batch norm folded and kept, old
opsets); these tests need no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from he_inference.circuit import Circuit, LinearNode
from he_inference.evaluate import run_plain

DATA = Path(__file__).parent / "data"
VARIANTS = sorted(DATA.glob("cnn_*.onnx"))
IO = np.load(DATA / "variants_io.npz")
# Every variant's queries: three single inputs and a batch of four.
QUERIES = np.concatenate([IO["cnn_x"].reshape(-1, 1, 8, 8), IO["cnn_batch_x"]])
EXPECTED = np.concatenate([IO["cnn_y"].reshape(-1, 10), IO["cnn_batch_y"]])


def _compile(path: Path) -> Circuit:
    # A fixed degree keeps every variant's polynomial identical, so outputs can be compared
    # across files to float precision rather than to the fit's error.
    return compile_model(path, QUERIES, degree=15)


@pytest.fixture(scope="module")
def reference() -> tuple[Circuit, np.ndarray]:
    circuit = _compile(DATA / "cnn_legacy_flatten_static_bnfolded.onnx")
    outputs = np.stack([run_plain(circuit, x[None]).ravel() for x in QUERIES])
    return circuit, outputs


def test_there_are_variants_of_every_kind() -> None:
    names = " ".join(p.name for p in VARIANTS)
    for part in (
        "legacy",
        "dynamo",
        "flatten",
        "view",
        "reshape",
        "dynamic",
        "static",
        "bnkept",
        "bnfolded",
        "opset9",
        "opset11",
    ):
        assert part in names


@pytest.mark.parametrize("path", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_variant_compiles_to_the_reference_circuit(
    path: Path, reference: tuple[Circuit, np.ndarray]
) -> None:
    ref_circuit, ref_outputs = reference
    circuit = _compile(path)

    # Batch norm, flatten and reshape all fold into the linear maps around the activation.
    assert [n.kind for n in circuit.nodes] == [n.kind for n in ref_circuit.nodes]
    assert circuit.depth == ref_circuit.depth
    assert circuit.params == ref_circuit.params
    linear = [n for n in circuit.nodes if isinstance(n, LinearNode)]
    ref_linear = [n for n in ref_circuit.nodes if isinstance(n, LinearNode)]
    assert [sum(b.offsets.size for b in n.blocks) for n in linear] == [
        sum(b.offsets.size for b in n.blocks) for n in ref_linear
    ]

    outputs = np.stack([run_plain(circuit, x[None]).ravel() for x in QUERIES])
    # Same circuit up to float32 weight rounding in the exporters' constant folding.
    np.testing.assert_allclose(outputs, ref_outputs, atol=1e-4 * np.abs(ref_outputs).max())


def test_reference_circuit_matches_torch(reference: tuple[Circuit, np.ndarray]) -> None:
    circuit, outputs = reference
    relu = next(n for n in circuit.nodes if n.kind == "polynomial")
    # The only approximation is the ReLU polynomial; the last linear map amplifies its error
    # by at most its largest absolute row sum, which these small weights keep below 10.
    assert np.abs(outputs - EXPECTED).max() <= 10 * relu.max_error
    assert np.array_equal(outputs.argmax(1), EXPECTED.argmax(1))
