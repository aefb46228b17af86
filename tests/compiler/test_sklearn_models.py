"""skl2onnx output: Scaler, LinearClassifier (with its label and ZipMap tail), LinearRegressor.

The files in ``data/sklearn/`` were written by ``make_sklearn_models.py`` with skl2onnx;
these tests need neither scikit-learn's estimators nor skl2onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.inputs import postprocess
from compiler import compile_model
from he_inference.evaluate import run_plain

DATA = Path(__file__).parent / "data" / "sklearn"
IO = np.load(DATA / "io.npz")


def test_logistic_regression_scores_labels_and_probabilities_match_sklearn() -> None:
    circuit = compile_model(DATA / "logreg_digits.onnx", IO["digits_calib"])

    # Scaler and the classifier's scores fuse into one linear map: one level.
    assert [n.kind for n in circuit.nodes] == ["linear"]
    assert [s["op"] for s in circuit.postprocess] == ["softmax", "argmax"]

    scores = np.stack([run_plain(circuit, x[None]).ravel() for x in IO["digits_x"]])
    np.testing.assert_allclose(scores, IO["digits_scores"], atol=1e-4)
    shape = circuit.output_layout.shape
    labels = postprocess(scores[:, None], shape, "batch", circuit.postprocess, "labels")
    np.testing.assert_array_equal(labels.ravel(), IO["digits_label"])
    proba = postprocess(scores[:, None], shape, "batch", circuit.postprocess, "probabilities")
    np.testing.assert_allclose(proba.reshape(len(scores), -1), IO["digits_proba"], atol=1e-5)


def test_linear_regression_matches_sklearn() -> None:
    circuit = compile_model(DATA / "linreg.onnx", IO["diabetes_calib"])
    assert [n.kind for n in circuit.nodes] == ["linear"]
    predictions = np.array([run_plain(circuit, x[None]).item() for x in IO["diabetes_x"]])
    np.testing.assert_allclose(predictions, IO["diabetes_y"], rtol=1e-5, atol=1e-3)
