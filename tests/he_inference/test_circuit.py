"""Circuit files and layouts: round trips, tampering, versions, and packing."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from he_inference.circuit import Circuit, Layout
from he_inference.errors import CircuitError, FormatVersionError, InputError
from tests.he_inference.circuits import mlp_circuit


def _rewrite_manifest(data: bytes, change: dict[str, object]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        weights = zf.read("weights.npz")
    manifest.update(change)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        zf.writestr("weights.npz", weights)
    return out.getvalue()


def test_circuit_file_round_trip_keeps_everything(tmp_path: Path) -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(0))
    path = circuit.save(tmp_path / "mlp.hec")
    loaded = Circuit.load(path)
    assert loaded.manifest() == circuit.manifest()
    assert loaded.content_hash() == circuit.content_hash()
    assert not list(tmp_path.glob(".*.tmp"))


def test_manifest_holds_no_weights() -> None:
    circuit, weights = mlp_circuit(np.random.default_rng(0))
    text = json.dumps(circuit.manifest())
    for value in weights["A1"].ravel()[:10]:
        assert repr(float(value)) not in text


def test_altered_manifest_fails_the_content_hash() -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(0))
    with pytest.raises(CircuitError, match="content hash"):
        Circuit.from_bytes(_rewrite_manifest(circuit.to_bytes(), {"name": "other"}))


def test_other_format_version_is_refused_with_advice() -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(0))
    with pytest.raises(FormatVersionError, match="recompile"):
        Circuit.from_bytes(_rewrite_manifest(circuit.to_bytes(), {"format_version": 99}))


@pytest.mark.parametrize("data", [b"", b"not a zip", b"PK\x03\x04" + b"\0" * 30])
def test_garbage_is_not_a_circuit(data: bytes) -> None:
    with pytest.raises(CircuitError, match="not a he-inference circuit"):
        Circuit.from_bytes(data)


def test_layout_pack_duplicates_each_block_and_unpack_inverts() -> None:
    layout = Layout((2, 3), period=4, chunks=2, batch=2)
    x = np.arange(12, dtype=float).reshape(2, 2, 3)
    vectors = layout.pack(x, slots=16)
    assert vectors.shape == (2, 16)
    np.testing.assert_array_equal(vectors[0, :8], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(vectors[0, 8:16], [6, 7, 8, 9, 6, 7, 8, 9])
    np.testing.assert_array_equal(layout.unpack(vectors, 16), x)


def test_layout_refuses_the_wrong_shape() -> None:
    with pytest.raises(InputError, match="does not match"):
        Layout((3,), 4, 1).pack(np.zeros(4), slots=16)


def test_circuit_compiled_for_one_backend_refuses_another() -> None:
    from he_inference.errors import ConfigurationError

    circuit, _ = mlp_circuit(np.random.default_rng(0))
    circuit.metadata["backend"] = "seal"
    circuit.check_backend("seal")
    circuit.check_backend("plain")
    with pytest.raises(ConfigurationError, match="--backend openfhe"):
        circuit.check_backend("openfhe")


def test_save_creates_the_output_folder(tmp_path: Path) -> None:
    circuit, _ = mlp_circuit(np.random.default_rng(0))
    path = circuit.save(tmp_path / "new" / "folder" / "m.hec")
    assert Circuit.load(path).name == circuit.name
