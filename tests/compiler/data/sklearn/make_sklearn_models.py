"""Export scikit-learn models with skl2onnx, for the compiler's tests (which need neither).

    python -m venv /tmp/vskl && /tmp/vskl/bin/pip install "onnx==1.22.*" skl2onnx \
        scikit-learn "onnxruntime<1.24"
    /tmp/vskl/bin/python tests/compiler/data/sklearn/make_sklearn_models.py

Writes, next to this script: ``logreg_digits.onnx`` (StandardScaler + LogisticRegression on
the 8x8 digits: Scaler, LinearClassifier, Normalizer-free softmax, ZipMap), ``linreg.onnx``
(StandardScaler + Ridge on the diabetes data: Scaler, LinearRegressor), and ``io.npz`` with
inputs and scikit-learn's own outputs for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).parent


def main() -> None:
    digits = load_digits()
    x_digits = digits.data.astype(np.float32)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    classifier.fit(x_digits[:1500], digits.target[:1500])
    onnx_classifier = to_onnx(classifier, x_digits[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    (HERE / "logreg_digits.onnx").write_bytes(onnx_classifier.SerializeToString())

    diabetes = load_diabetes()
    x_diabetes = diabetes.data.astype(np.float32)
    regressor = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    regressor.fit(x_diabetes[:400], diabetes.target[:400])
    onnx_regressor = to_onnx(regressor, x_diabetes[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    (HERE / "linreg.onnx").write_bytes(onnx_regressor.SerializeToString())

    test_digits = x_digits[1500:1520]
    test_diabetes = x_diabetes[400:420]
    np.savez(
        HERE / "io.npz",
        digits_x=test_digits,
        digits_scores=classifier.decision_function(test_digits),
        digits_proba=classifier.predict_proba(test_digits),
        digits_label=classifier.predict(test_digits),
        digits_calib=x_digits[:200],
        diabetes_x=test_diabetes,
        diabetes_y=regressor.predict(test_diabetes),
        diabetes_calib=x_diabetes[:200],
    )
    print("accuracy", (classifier.predict(x_digits[1500:]) == digits.target[1500:]).mean())


if __name__ == "__main__":
    main()
