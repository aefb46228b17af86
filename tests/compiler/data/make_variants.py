"""Export one small CNN in every form the ONNX importer has to normalise, plus a residual MLP.

Exporters write the same network in different graphs: the legacy TorchScript exporter
and the dynamo (torch.export) exporter pick different ops for a flatten, keep or fold
batch norm depending on constant folding, and write Shape/Gather/Concat chains for a
dynamic batch. The compiler's tests load each file and must get the same circuit, so the
files are committed as data and this script is how they were made. It needs torch, which
the project does not depend on (see ``benchmarks/zoo/train_digits.py`` for the venv):

    /tmp/vtorch/bin/python tests/compiler/data/make_variants.py

It writes the ``.onnx`` files, ``variants_io.npz`` (fixed inputs and torch's outputs) and
the tables in ``README.md`` between the generated markers, and fails if onnxruntime
differs from torch by more than ``TOLERANCE`` on any file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

DATA = Path(__file__).resolve().parent
SEED = 1234
TOLERANCE = 1e-5
BEGIN = "<!-- BEGIN GENERATED: make_variants.py -->"
END = "<!-- END GENERATED -->"

Flatten = Callable[[torch.Tensor], torch.Tensor]
FLATTENS: dict[str, Flatten] = {
    "flatten": lambda x: torch.flatten(x, 1),
    "view": lambda x: x.view(x.size(0), -1),
    "reshape1": lambda x: x.reshape(1, -1),
    "reshapeshape": lambda x: x.reshape(x.shape[0], -1),
}


class SmallCNN(nn.Module):
    """Conv(1->2, 3x3, same) -> BatchNorm -> ReLU -> AvgPool(2) -> flatten -> Linear(32, 10)."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(32, 10)
        self.flatten = FLATTENS[flatten]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.flatten(x))


class ResidualMLP(nn.Module):
    """Linear(16, 16) -> SiLU -> Linear(16, 16), added to its input, -> GELU -> Linear(16, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(nn.functional.silu(self.fc1(x)))
        return self.head(nn.functional.gelu(x))


def make_cnn(flatten: str) -> SmallCNN:
    """The same weights for every flatten form: the seed fixes them, BN stats are set by hand."""
    torch.manual_seed(SEED)
    model = SmallCNN(flatten)
    with torch.no_grad():
        # Non-trivial statistics, so a dropped or misapplied batch norm shows in the output.
        model.bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0]))
        model.bn.weight.copy_(torch.tensor([1.5, 0.7]))
        model.bn.bias.copy_(torch.tensor([-0.1, 0.25]))
    return model.eval()


def make_residual() -> ResidualMLP:
    torch.manual_seed(SEED + 1)
    return ResidualMLP().eval()


@dataclass(frozen=True)
class Variant:
    """One export of the CNN: the file name spells out every choice."""

    exporter: str  # "legacy" or "dynamo"
    flatten: str
    dynamic: bool
    bn_kept: bool
    opset: int

    @property
    def name(self) -> str:
        batch = "dynamic" if self.dynamic else "static"
        bn = "bnkept" if self.bn_kept else "bnfolded"
        opset = "" if self.opset in (17, 18) else f"_opset{self.opset}"
        return f"cnn_{self.exporter}_{self.flatten}_{batch}_{bn}{opset}.onnx"


def variants() -> list[Variant]:
    """Every exporter x flatten x batch x batch-norm combination, plus older legacy opsets."""
    found = []
    for exporter, opset in (("legacy", 17), ("dynamo", 18)):
        for flatten in FLATTENS:
            for dynamic in (False, True):
                # reshape(1, -1) fixes the batch at 1: a dynamic batch would be a lie.
                if dynamic and flatten == "reshape1":
                    continue
                for bn_kept in (False, True):
                    found.append(Variant(exporter, flatten, dynamic, bn_kept, opset))
    found.append(Variant("legacy", "flatten", False, False, 11))
    found.append(Variant("legacy", "view", True, True, 9))
    return found


def example_input(variant: Variant) -> torch.Tensor:
    # A batch of 1 would let torch.export specialise dim 0 to the constant 1.
    return torch.zeros(2 if variant.dynamic else 1, 1, 8, 8)


def export_legacy(model: nn.Module, path: Path, variant: Variant) -> None:
    # The legacy exporter folds BN into the Conv when it constant-folds in eval mode;
    # PRESERVE mode with folding off keeps a BatchNormalization node (with training_mode
    # unset, i.e. inference, since the module itself is in eval mode).
    torch.onnx.export(
        model,
        (example_input(variant),),
        str(path),
        dynamo=False,
        opset_version=variant.opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if variant.dynamic else None,
        do_constant_folding=not variant.bn_kept,
        training=torch.onnx.TrainingMode.PRESERVE
        if variant.bn_kept
        else torch.onnx.TrainingMode.EVAL,
    )


def export_dynamo(model: nn.Module, path: Path, variant: Variant) -> None:
    # The dynamo exporter's graph optimiser (optimize=True, onnxscript's rewriter) fuses
    # BatchNormalization into the Conv before it; without it the node stays.
    dynamic_shapes = (
        {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if variant.dynamic else None
    )
    program = torch.onnx.export(
        model,
        (example_input(variant),),
        dynamo=True,
        opset_version=variant.opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=dynamic_shapes,
        optimize=not variant.bn_kept,
        external_data=False,
    )
    program.save(str(path), external_data=False)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])


def describe(path: Path, exporter: str, difference: float) -> str:
    model = onnx.load(str(path))
    counts = Counter(node.op_type for node in model.graph.node)
    flags = " ".join(
        f"{op}:{'yes' if op in counts else 'no'}"
        for op in ("BatchNormalization", "Flatten", "Reshape", "Shape")
    )
    ops = ", ".join(f"{op}x{n}" if n > 1 else op for op, n in sorted(counts.items()))
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim0.dim_param or str(dim0.dim_value)
    declared = model.opset_import[0].version
    return (
        f"| `{path.name}` | {exporter} | {declared} | {model.ir_version} | {batch} | {flags} | "
        f"{ops} | {path.stat().st_size} | {difference:.1e} |"
    )


def quiet(call: Callable[[], None]) -> str:
    """Run an export with its progress lines and deprecation warnings out of the way."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        call()
    return sink.getvalue()


def main() -> None:
    torch.set_num_threads(1)
    generator = np.random.default_rng(SEED)
    x1 = generator.uniform(0.0, 1.0, size=(3, 1, 1, 8, 8)).astype(np.float32)
    x4 = generator.uniform(0.0, 1.0, size=(4, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        reference = make_cnn("flatten")
        y1 = np.stack([reference(torch.from_numpy(x)).numpy() for x in x1])
        y4 = reference(torch.from_numpy(x4)).numpy()

    rows, failures = [], []
    for variant in variants():
        path = DATA / variant.name
        model = make_cnn(variant.flatten)
        export = export_dynamo if variant.exporter == "dynamo" else export_legacy
        try:
            quiet(lambda: export(model, path, variant))  # noqa: B023
        except Exception as exc:  # an exporter refusing a form is a result to record
            failures.append(
                f"| `{variant.name}` | {type(exc).__name__}: {str(exc).splitlines()[0]} |"
            )
            path.unlink(missing_ok=True)
            continue
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        difference = max(
            float(np.abs(run_onnx(path, x) - y).max()) for x, y in zip(x1, y1, strict=True)
        )
        if variant.dynamic:
            difference = max(difference, float(np.abs(run_onnx(path, x4) - y4).max()))
        if difference > TOLERANCE:
            raise SystemExit(f"{path.name}: onnxruntime differs from torch by {difference:.2e}")
        rows.append(describe(path, variant.exporter, difference))
        print(rows[-1])

    residual = make_residual()
    residual_path = DATA / "mlp_residual.onnx"
    x_residual = generator.normal(0.0, 1.0, size=(1, 16)).astype(np.float32)
    with torch.no_grad():
        y_residual = residual(torch.from_numpy(x_residual)).numpy()
    quiet(
        lambda: torch.onnx.export(
            residual,
            (torch.zeros(1, 16),),
            str(residual_path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            do_constant_folding=True,
        )
    )
    difference = float(np.abs(run_onnx(residual_path, x_residual) - y_residual).max())
    if difference > TOLERANCE:
        raise SystemExit(f"{residual_path.name}: onnxruntime differs by {difference:.2e}")
    rows.append(describe(residual_path, "legacy", difference))
    print(rows[-1])

    np.savez(
        DATA / "variants_io.npz",
        cnn_x=x1,
        cnn_y=y1,
        cnn_batch_x=x4,
        cnn_batch_y=y4,
        residual_x=x_residual,
        residual_y=y_residual,
    )
    write_readme(rows, failures)
    for line in failures:
        print("FAILED", line)


def write_readme(rows: list[str], failures: list[str]) -> None:
    header = (
        "| file | exporter | opset | IR | input dim 0 | BN / Flatten / Reshape / Shape | "
        "op types (count) | bytes | max abs diff vs torch |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    failed = "\n".join(["| variant | why it was not exported |", "|---|---|", *failures])
    generated = "\n".join(
        [BEGIN, "", header, *rows, "", failed if failures else "Every variant exported.", "", END]
    )
    readme = DATA / "README.md"
    text = readme.read_text() if readme.exists() else f"{BEGIN}\n{END}\n"
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    readme.write_text(before + generated + after)


if __name__ == "__main__":
    main()
