"""Real ``he-infer serve`` processes on 127.0.0.1 for the tests that talk HTTP to one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_process(
    arguments: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 90,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``he-infer serve ARGUMENTS --port PORT``, yielded once /readyz answers 200.

    The process is terminated (then killed) on exit unless the test already stopped it.
    """
    command = [sys.executable, "-m", "he_inference.cli", "serve", *arguments, "--port", str(port)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not become ready: {log.read_text()}")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
