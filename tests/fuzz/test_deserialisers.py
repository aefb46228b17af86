"""Bounded atheris runs over each deserialiser, in a subprocess so that a crash fails here.

Each run is capped by ``-runs`` and ``-max_total_time``; a harness lets the library's own
refusals pass, so a non-zero exit is an escaped exception, a crash or a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_backend

pytest.importorskip(
    "atheris", reason="atheris is not installed: pip install 'he-inference[dev]' (CPython <3.12)"
)

HARNESS = Path(__file__).with_name("harness.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", ["unpack", "ciphertexts-plain", "ciphertexts-seal", "circuit"])
def test_fuzzing_finds_no_crash(target: str, tmp_path: Path) -> None:
    if target.endswith("seal"):
        require_backend("seal")
    command = [
        sys.executable,
        str(HARNESS),
        target,
        str(tmp_path / "corpus"),
        "-runs=3000",
        "-max_total_time=5",
        "-timeout=10",
        "-rss_limit_mb=3072",
        f"-artifact_prefix={tmp_path}/",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr, result.stderr[-2000:]
