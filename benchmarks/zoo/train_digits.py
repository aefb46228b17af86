"""Train the digits CNNs that the zoo ships and export them to ONNX.

The shipped ``.onnx`` files and ``digits.npz`` are committed as data, so that the tests
and the demo never need torch; this script is how they were made. It needs torch, which
the project does not depend on: run it from a separate environment, e.g.

    python -m venv /tmp/vtorch
    /tmp/vtorch/bin/pip install torch==2.13.0 onnx==1.22.0 onnxscript scikit-learn \
        onnxruntime numpy
    /tmp/vtorch/bin/python benchmarks/zoo/train_digits.py

The network is deliberately narrow (4 channels, 32 hidden units): under CKKS the cost of
each linear map grows with the number of its non-zero diagonals, and so with its width,
and every activation costs multiplicative depth. The data are scikit-learn's bundled 8x8
digits (no download). ``HELD_OUT`` digits, drawn once by a seeded permutation, are never
trained on. A random slice, not the last 360: sklearn's digits are ordered by writer, so
the last 360 come from writers the training set never saw, and on them even a tuned RBF
SVM reaches only 95% and this 4-channel CNN about 91%; a random slice measures the
model, not the writer shift (about 98% here).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

ZOO = Path(__file__).resolve().parent
SEED = 0
HELD_OUT = 360
CALIBRATION = 200
OPSET = 17
ACTIVATIONS = ("relu", "silu", "square", "gelu", "tanh", "sigmoid")
SHIPPED = ("relu", "silu", "square")


class Square(nn.Module):
    """x * x: the activation that CKKS evaluates exactly, at one level."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of ``ACTIVATIONS``)."""
    factories = {
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "square": Square,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    return factories[name]()


class DigitsCNN(nn.Module):
    """Conv(1->4, 3x3, same) -> act -> AvgPool(2) -> Linear(64, 32) -> act -> Linear(32, 10)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = make_activation(activation)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.act2 = make_activation(activation)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.conv(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.act2(self.fc1(x)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test, test_index); x in [0, 1], shaped [n, 1, 8, 8]."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    train_index, test_index = np.sort(order[:-HELD_OUT]), np.sort(order[-HELD_OUT:])
    return x[train_index], y[train_index], x[test_index], y[test_index], test_index


def train(activation: str, x: np.ndarray, y: np.ndarray, epochs: int) -> DigitsCNN:
    """Train one model with a fixed seed; the same arguments give the same weights."""
    torch.manual_seed(SEED)
    model = DigitsCNN(activation)
    # Square grows without bound, so it trains with a smaller step and clipped gradients.
    lr = 3e-3 if activation == "square" else 1e-2
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)

    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        scheduler.step()
    return model.eval()


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def export(model: nn.Module, path: Path) -> None:
    """Legacy TorchScript export: opset 17, static batch 1, input "input", output "logits"."""
    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def onnx_check(model: nn.Module, path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Run the exported file one sample at a time; return (accuracy, max |logit difference|)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [session.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(len(x))]
    )
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    return float((logits.argmax(axis=1) == y).mean()), float(np.abs(logits - reference).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        action="append",
        help=f"activation to train (repeatable; default: {', '.join(SHIPPED)})",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ZOO, help="output directory")
    args = parser.parse_args()

    # One thread: on a shared 2-core machine a second one spins and runs 10x slower.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test, test_index = load_split()
    np.savez_compressed(
        args.out / "digits.npz",
        x_test=x_test,
        y_test=y_test,
        test_index=test_index,
        x_calib=x_train[:CALIBRATION],
    )
    print(f"train {len(x_train)}, held out {len(x_test)}, calibration {CALIBRATION}")

    for activation in args.activation or SHIPPED:
        started = time.perf_counter()
        model = train(activation, x_train, y_train, args.epochs)
        seconds = time.perf_counter() - started
        path = args.out / f"digits_cnn_{activation}.onnx"
        export(model, path)
        torch_acc = torch_accuracy(model, x_test, y_test)
        onnx_acc, difference = onnx_check(model, path, x_test, y_test)
        print(
            f"{activation:8s} trained in {seconds:5.1f} s  held-out accuracy:"
            f" torch {torch_acc:.4f}"
            f"  onnxruntime {onnx_acc:.4f}  max |logit diff| {difference:.2e}"
            f"  {path.name} {path.stat().st_size} bytes"
        )
        if torch_acc != onnx_acc:
            raise SystemExit(f"{path.name}: onnxruntime disagrees with torch")


if __name__ == "__main__":
    main()
