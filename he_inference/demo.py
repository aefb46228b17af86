"""The ``he-infer demo``: the digits CNN compiled, served locally and queried encrypted.

One command plays every part of the product on one machine, so it reaches into all of
them: the compiler, the server (uvicorn on a free local port) and the client SDK, with
onnxruntime for the plaintext reference. Like the command line it belongs to, it imports
them inside the functions that use them; none of those packages imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from he_inference.errors import ConfigurationError
from he_inference.report import format_mb


def run_demo(backend: str, count: int, activation: str, work_dir: Path, console: Console) -> None:
    """Compile, serve on a free local port, query ``count`` digits encrypted, print a table.

    Raises:
        ConfigurationError: the count is not positive, or the activation has no model in
            the zoo.
    """
    import tempfile
    import time

    import benchmarks

    if count < 1:
        raise ConfigurationError(f"--count {count}: send at least one digit")

    zoo = Path(benchmarks.__file__).parent / "zoo"
    onnx_path = zoo / f"digits_cnn_{activation}.onnx"
    if not onnx_path.is_file():
        choices = sorted(p.stem.removeprefix("digits_cnn_") for p in zoo.glob("digits_cnn_*.onnx"))
        raise ConfigurationError(
            f"no demo model for activation {activation!r}: choose one of {', '.join(choices)}"
        )
    data = np.load(zoo / "digits.npz", allow_pickle=False)
    x_test, y_test = data["x_test"][:count], data["y_test"][:count]
    if count > len(x_test):
        console.print(f"the test set holds {len(x_test)} digits: sending all of them")

    with console.status("compiling the model"):
        circuit_path = _compiled_circuit(onnx_path, data["x_calib"], work_dir, backend)
    plain = _onnx_logits(onnx_path, x_test)

    with (
        tempfile.TemporaryDirectory(prefix="he-demo-") as tmp,
        _local_server(Path(tmp), circuit_path, backend) as url,
    ):
        from client import Client

        with Client(url, key_dir=Path(tmp) / "client-keys") as connection:
            model = connection.model(circuit_path.stem)
            info = model.generate_keys()
            start = time.perf_counter()
            model.upload_keys()
            upload_s = time.perf_counter() - start
            rows = []
            for i in range(len(x_test)):
                logits = model.predict(x_test[i : i + 1])
                rows.append((logits[0], model.last_stats[0]))
    _print_demo(console, backend, activation, info, upload_s, rows, plain, y_test)


def _compiled_circuit(
    onnx_path: Path, calibration: np.ndarray, work_dir: Path, backend: str
) -> Path:
    """Compile the demo model for the backend; it takes a fraction of a second, so the
    circuit is always rebuilt and never goes stale against the compiler."""
    from compiler import compile_model

    folder = work_dir / backend
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{onnx_path.stem}.hec"
    compile_model(onnx_path, calibration, name=onnx_path.stem, backend=backend).save(path)
    return path


def _onnx_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [session.run(None, {name: x[i : i + 1].astype(np.float32)})[0] for i in range(len(x))]
    logits: np.ndarray = np.concatenate(rows).reshape(len(x), -1).astype(np.float64)
    return logits


class _local_server:  # noqa: N801 - used as a context manager, named like one
    """uvicorn on a free 127.0.0.1 port in a daemon thread, over one circuit file.

    ``settings`` override the server's (the tests set token budgets through them).
    """

    def __init__(self, root: Path, circuit_path: Path, backend: str, **settings: Any) -> None:
        self.root, self.circuit_path, self.backend = root, circuit_path, backend
        self.settings = settings

    def __enter__(self) -> str:
        import shutil
        import socket
        import threading
        import time

        import uvicorn

        from server import Settings, create_app

        models = self.root / "models"
        models.mkdir(parents=True)
        shutil.copy(self.circuit_path, models / self.circuit_path.name)
        settings = Settings.model_validate(
            {
                "models_dir": models,
                "key_store_dir": self.root / "server-keys",
                "backend": self.backend,
                **self.settings,
            }
        )
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))  # bound here, so no other process takes the port
        port = self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError("the demo server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def _print_demo(
    console: Console,
    backend: str,
    activation: str,
    info: Any,
    upload_s: float,
    rows: list[tuple[np.ndarray, Any]],
    plain: np.ndarray,
    labels: np.ndarray,
) -> None:
    table = Table(
        title=f"encrypted digits CNN ({activation}) on {backend}",
        caption=(
            "encrypted: the class decrypted from the server's answer; plaintext: onnxruntime on "
            "the same digit; true: the dataset's label; latency: encrypt + HTTP + evaluate + "
            "decrypt; eval: the server's evaluation alone (the first query also encodes the "
            "weights); max |dlogit|: largest difference between encrypted and plaintext logits"
        ),
    )
    for column in ("#", "encrypted", "plaintext", "true", "latency s", "eval s", "max |dlogit|"):
        table.add_column(column, justify="right")
    encrypted = np.array([logits for logits, _ in rows])
    diffs = np.abs(encrypted - plain).max(axis=1)
    for i, (logits, stats) in enumerate(rows):
        ok = "green" if logits.argmax() == plain[i].argmax() else "red"
        table.add_row(
            str(i),
            f"[{ok}]{logits.argmax()}[/]",
            str(plain[i].argmax()),
            str(labels[i]),
            f"{stats.latency_s:.2f}",
            f"{stats.eval_seconds:.2f}",
            f"{diffs[i]:.2e}",
        )
    console.print(table)
    stats = [s for _, s in rows]
    agree = float(np.mean(encrypted.argmax(1) == plain.argmax(1)))
    console.print(
        f"key generation {info.seconds:.1f} s; evaluation keys "
        f"{format_mb(info.evaluation_key_bytes)} (upload and server load {upload_s:.1f} s)\n"
        f"query {format_mb(stats[0].request_bytes)}, result "
        f"{format_mb(stats[0].response_bytes)}; "
        f"mean latency {np.mean([s.latency_s for s in stats]):.2f} s\n"
        f"agreement encrypted vs plaintext {agree:.0%}, max |logit difference| "
        f"{diffs.max():.2e}\n"
        f"accuracy encrypted {np.mean(encrypted.argmax(1) == labels):.0%}, plaintext "
        f"{np.mean(plain.argmax(1) == labels):.0%}"
    )
