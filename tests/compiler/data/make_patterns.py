"""Export small torch models whose ONNX graphs need the compiler's pattern rewrites.

``make_variants.py`` covers how one network's plumbing is exported; these files cover
operators that reach the compiler in a form no circuit node computes directly: GELU's tanh
form written as arithmetic (``x * x * x`` from the legacy exporter, ``Pow(x, 3)`` from the
dynamo one), a per-channel ``PRelu``, and ``Concat`` and ``Sub`` of two branches that end
in different activations. Like the variants, the files are committed and the tests need
no torch:

    /tmp/vtorch/bin/python tests/compiler/data/make_patterns.py

It writes the ``.onnx`` files, ``patterns_io.npz`` (fixed inputs and torch's outputs) and
the table in ``README.md`` between its generated markers, and fails if onnxruntime differs
from torch by more than ``TOLERANCE`` on any file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from make_variants import TOLERANCE, describe, quiet, run_onnx
from torch import nn

DATA = Path(__file__).resolve().parent
SEED = 4321
BEGIN = "<!-- BEGIN GENERATED: make_patterns.py -->"
END = "<!-- END GENERATED: make_patterns.py -->"


class GeluTanhMLP(nn.Module):
    """Linear(8, 8) -> GELU(approximate='tanh') -> Linear(8, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class Branches(nn.Module):
    """Conv -> PReLU(3) and Sigmoid branches, joined by cat and by a difference, -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.prelu = nn.PReLU(3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 3 * 3 + 3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        p, s = self.prelu(h), torch.sigmoid(h)
        joined = torch.cat([self.pool(torch.cat([p, s], dim=1)), self.pool(p - s)], dim=1)
        return self.fc(torch.flatten(joined, 1))


def make_gelu() -> GeluTanhMLP:
    torch.manual_seed(SEED)
    return GeluTanhMLP().eval()


def make_branches() -> Branches:
    torch.manual_seed(SEED + 1)
    model = Branches()
    with torch.no_grad():
        # Distinct slopes per channel, so a shared slope would show in the output.
        model.prelu.weight.copy_(torch.tensor([0.1, -0.2, 0.4]))
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    if dynamo:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
            external_data=False,
        )
        program.save(str(path), external_data=False)
    else:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
        )


def main() -> None:
    torch.set_num_threads(1)
    generator = np.random.default_rng(SEED)
    gelu_x = generator.normal(0.0, 1.0, size=(1, 8)).astype(np.float32)
    branches_x = generator.uniform(-1.0, 1.0, size=(1, 1, 6, 6)).astype(np.float32)
    cases: list[tuple[str, nn.Module, np.ndarray, bool]] = [
        ("gelu_tanh_legacy.onnx", make_gelu(), gelu_x, False),
        ("gelu_tanh_dynamo.onnx", make_gelu(), gelu_x, True),
        ("branches_legacy.onnx", make_branches(), branches_x, False),
    ]
    rows, outputs = [], {}
    for name, model, x, dynamo in cases:
        path = DATA / name
        quiet(lambda: export(model, torch.zeros(x.shape), path, dynamo))  # noqa: B023
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        difference = float(np.abs(run_onnx(path, x) - expected).max())
        if difference > TOLERANCE:
            raise SystemExit(f"{name}: onnxruntime differs from torch by {difference:.2e}")
        outputs[path.stem] = expected
        rows.append(describe(path, "dynamo" if dynamo else "legacy", difference))
        print(rows[-1])
    np.savez(
        DATA / "patterns_io.npz",
        gelu_x=gelu_x,
        gelu_tanh_legacy_y=outputs["gelu_tanh_legacy"],
        gelu_tanh_dynamo_y=outputs["gelu_tanh_dynamo"],
        branches_x=branches_x,
        branches_legacy_y=outputs["branches_legacy"],
    )
    write_readme(rows)


def write_readme(rows: list[str]) -> None:
    header = (
        "| file | exporter | opset | IR | input dim 0 | BN / Flatten / Reshape / Shape | "
        "op types (count) | bytes | max abs diff vs torch |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    generated = "\n".join([BEGIN, "", header, *rows, "", END])
    readme = DATA / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        text = f"{text.rstrip()}\n\n{BEGIN}\n{END}\n"
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    readme.write_text(before + generated + after)


if __name__ == "__main__":
    main()
