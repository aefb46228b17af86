"""The digits CNN in Orion (orion-fhe, Lattigo CKKS): a compiled-FHE baseline to beat.

    python -m benchmarks.orion_baseline --model benchmarks/zoo/digits_cnn_square.onnx
        [--count 5] [--json out.json]

Orion needs torch and ships a CPython 3.11 wheel, so this runs in a 3.11 environment
that has torch, not in the project's 3.10 one, for example (torch pinned so that pip never
swaps it for a multi-gigabyte CUDA build):

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/vorion
    /tmp/vorion/bin/pip install torch==2.13.0 onnx onnxruntime numpy
    /tmp/vorion/bin/pip install --no-deps orion-fhe
    /tmp/vorion/bin/pip install PyYAML certifi h5py matplotlib tqdm scipy==1.14.1 torch==2.13.0

Orion 1.0.2 asks for scipy<=1.14.1 and means it: newer scipy rejects the torch index
tensors that its convolution packing passes to scipy.sparse.

Where Orion cannot be imported or run, the script prints why, writes
``{"unavailable": reason}`` and exits 0: a missing baseline is reported, never replaced by
made-up figures.

The network is rebuilt from Orion's own modules and the ONNX initializers are copied in;
Orion then fits its activation ranges on the calibration digits, packs the linear maps
and places levels itself. ReLU becomes Orion's composite minimax sign approximation and
SiLU its Chebyshev fit; the square model uses ``on.Quad``.

Orion imports torchvision only for its MNIST and CIFAR loaders. The torchvision wheel on
PyPI is built against CUDA torch and fails to import beside torch 2.13.0+cpu, so when
torchvision does not import, an empty stand-in module is registered (recorded in the JSON
as ``torchvision_stub``); nothing here uses those loaders.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ZOO = Path(__file__).parent / "zoo"
DEFAULT_DATA = ZOO / "digits.npz"

# CKKS parameters for Orion's Lattigo backend, per activation: standard ring, a dense
# ternary secret (h = N/2) and log(QP) under the HE Standard's 128-bit bound for N (438 bits
# at 2^14, 881 at 2^15). Orion places the levels itself: square uses 6 of the 7, SiLU as
# two degree-15 Chebyshev series 12 of the 16, which no N=2^14 chain holds at scale 2^40.
# ReLU (composite sign, degrees 15, 15, 27) needs more than 16: Orion places two
# bootstraps, whose keys it makes in memory and does not count in rotation_key_bytes.
CKKS_PARAMS: dict[str, dict[str, Any]] = {
    "square": {"LogN": 14, "LogQ": [55, *[40] * 7], "LogP": [61, 61], "LogScale": 40},
    "silu": {"LogN": 15, "LogQ": [55, *[40] * 16], "LogP": [61, 61, 61], "LogScale": 40},
    "relu": {"LogN": 15, "LogQ": [55, *[40] * 16], "LogP": [61, 61, 61], "LogScale": 40},
}
SILU_DEGREE = 15


def _unavailable(reason: str, json_path: Path | None, extra: dict[str, Any] | None = None) -> int:
    report = {"baseline": "orion", "unavailable": reason, **(extra or {})}
    print(f"Orion baseline unavailable: {reason}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _import_orion() -> tuple[Any, Any, Any, str | None]:
    """Import torch and Orion; a stand-in torchvision where the real one fails to import."""
    import torch

    stub_reason = None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # any failure: Orion uses torchvision only for its loaders
        stub_reason = f"torchvision failed to import ({type(exc).__name__}: {exc})"
        stub = types.ModuleType("torchvision")
        stub.datasets = types.ModuleType("torchvision.datasets")  # type: ignore[attr-defined]
        stub.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        sys.modules.update(
            {
                "torchvision": stub,
                "torchvision.datasets": stub.datasets,  # type: ignore[attr-defined]
                "torchvision.transforms": stub.transforms,  # type: ignore[attr-defined]
            }
        )
    import orion
    import orion.nn as on

    return torch, orion, on, stub_reason


def _activation_of(model_path: Path) -> str:
    import onnx

    op_types = {node.op_type for node in onnx.load(str(model_path)).graph.node}
    if "Relu" in op_types:
        return "relu"
    return "silu" if "Sigmoid" in op_types else "square"


def _read_weights(model_path: Path) -> dict[str, np.ndarray]:
    """Conv and Gemm weights by role, found through the nodes' inputs."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    fc1, fc2 = (n for n in graph.node if n.op_type == "Gemm")
    return {
        "conv.weight": arrays[conv.input[1]],
        "conv.bias": arrays[conv.input[2]],
        "fc1.weight": arrays[fc1.input[1]],
        "fc1.bias": arrays[fc1.input[2]],
        "fc2.weight": arrays[fc2.input[1]],
        "fc2.bias": arrays[fc2.input[2]],
    }


def _build_network(torch: Any, on: Any, activation: str, weights: dict[str, np.ndarray]) -> Any:
    def make_activation() -> Any:
        if activation == "square":
            return on.Quad()
        if activation == "silu":
            return on.SiLU(degree=SILU_DEGREE)
        return on.ReLU()

    class DigitsCNN(on.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv = on.Conv2d(1, 4, kernel_size=3, padding=1)
            self.act1 = make_activation()
            self.pool = on.AvgPool2d(2)
            self.flatten = on.Flatten()
            self.fc1 = on.Linear(64, 32)
            self.act2 = make_activation()
            self.fc2 = on.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            x = self.flatten(self.pool(self.act1(self.conv(x))))
            return self.fc2(self.act2(self.fc1(x)))

    net = DigitsCNN()
    with torch.no_grad():
        for name, value in weights.items():
            layer, field = name.split(".")
            getattr(getattr(net, layer), field).copy_(torch.from_numpy(np.array(value)))
    return net


def run(model_path: Path, data_path: Path, count: int) -> dict[str, Any]:
    """Fit, compile, then encrypt, evaluate and decrypt `count` digits in Orion."""
    torch, orion, on, stub_reason = _import_orion()
    import onnxruntime as ort

    activation = _activation_of(model_path)
    data = np.load(data_path)
    images = data["x_test"][:count].astype(np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"input": x[None]})[0] for x in images])

    keys_path = Path(tempfile.mkdtemp(prefix="orion-keys-")) / "keys.h5"
    ckks = dict(CKKS_PARAMS[activation])
    config = {
        "ckks_params": {**ckks, "H": 2 ** (ckks["LogN"] - 1), "RingType": "standard"},
        "orion": {
            "margin": 2,
            "embedding_method": "hybrid",
            "backend": "lattigo",
            "fuse_modules": True,
            "debug": False,
            "io_mode": "save",
            "keys_path": str(keys_path),
            "diags_path": str(keys_path.with_name("d.h5")),
        },
    }
    net = _build_network(torch, on, activation, _read_weights(model_path))
    net.eval()
    with torch.no_grad():
        plain = net(torch.from_numpy(images)).numpy()

    start = time.perf_counter()
    orion.init_scheme(config)
    keygen_s = time.perf_counter() - start
    # A loader with batch size 1: Orion packs for the batch shape that fit() last saw, and
    # one query per ciphertext is the latency setting that the TenSEAL baseline measures.
    calib = torch.utils.data.TensorDataset(torch.from_numpy(data["x_calib"].astype(np.float32)))
    orion.fit(net, torch.utils.data.DataLoader(calib, batch_size=1))
    start = time.perf_counter()
    input_level = orion.compile(net)
    compile_s = time.perf_counter() - start

    # Orion's io_mode "save" writes each rotation key it generates to keys_path: their
    # total is the Galois-key upload (the secret key is stored there too and left out).
    import h5py

    with h5py.File(keys_path, "r") as f:
        rotation_keys = [name for name in f if name != "sk"]
        rotation_key_bytes = sum(int(f[name].nbytes) for name in rotation_keys)

    net.he()
    latencies, logits = [], []
    for image in images:
        ciphertext = orion.encrypt(orion.encode(torch.from_numpy(image[None]), input_level))
        start = time.perf_counter()
        out = net(ciphertext)
        latencies.append(time.perf_counter() - start)
        logits.append(np.asarray(out.decrypt().decode()).reshape(-1)[:10])

    decrypted = np.array(logits)
    return {
        "baseline": "orion",
        "orion_version": orion.__version__,
        "torch_version": torch.__version__,
        "torchvision_stub": stub_reason,
        "model": str(model_path),
        "activation": activation,
        "count": len(images),
        "ckks_params": config["ckks_params"],
        "input_level": input_level,
        "keygen_s": keygen_s,
        "compile_s": compile_s,
        "rotation_keys": len(rotation_keys),
        "rotation_key_bytes": rotation_key_bytes,
        "rotation_key_bytes_note": "linear-transform rotation keys only, no relin/bootstrap keys",
        "latency_median_s": statistics.median(latencies),
        "plain_orion_vs_onnxruntime_max_diff": float(np.abs(plain - reference).max()),
        "top1_agreement": float(np.mean(decrypted.argmax(1) == reference.argmax(1))),
        "top1_accuracy": float(np.mean(decrypted.argmax(1) == data["y_test"][:count])),
        "max_abs_logit_diff": float(np.abs(decrypted - reference).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ZOO / "digits_cnn_square.onnx")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    try:
        report = run(args.model, args.data, args.count)
    except ImportError as exc:
        reason = (
            f"{type(exc).__name__}: {exc} (Orion needs CPython 3.9-3.12 with torch and "
            "orion-fhe; see this module's docstring)"
        )
        return _unavailable(reason, args.json, {"python": sys.version.split()[0]})
    except Exception as exc:  # report any failure to run Orion, then stop
        reason = f"{type(exc).__name__}: {exc}"
        return _unavailable(reason, args.json, {"python": sys.version.split()[0]})

    print(f"Orion {report['orion_version']}, {report['activation']}, {report['ckks_params']}")
    print(f"  keygen {report['keygen_s']:.2f} s, compile {report['compile_s']:.2f} s")
    print(
        f"  rotation keys {report['rotation_keys']}, "
        f"{report['rotation_key_bytes'] / 2**20:.1f} MiB"
    )
    print(f"  latency per query (median) {report['latency_median_s']:.2f} s")
    print(
        f"  top-1 agreement {report['top1_agreement']:.3f} over {report['count']}, "
        f"max |logit diff| {report['max_abs_logit_diff']:.4f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
