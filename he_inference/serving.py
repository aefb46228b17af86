"""The checks ``he-infer serve`` makes before it announces anything.

A server that starts and serves nothing, or that prints its address and then dies on a port
in use, looks healthy to whoever started it; so the folder, the models loaded from it and the
port are checked before the address is announced, and the socket bound here is the one
uvicorn then serves on (no other process can take the port in between).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from he_inference.errors import ConfigurationError, HEInferenceError


def circuit_files(models: Path) -> list[Path]:
    """The folder's circuit files, refused when there are none to serve.

    Raises:
        ConfigurationError: the folder is missing, not a folder, or holds no ``*.hec`` file.
    """
    folder = models.expanduser()
    if not folder.exists():
        raise ConfigurationError(
            f"--models {models} does not exist: pass the folder that holds your .hec files "
            f"(he-infer compile MODEL.onnx -o {models}/MODEL.hec writes one there)"
        )
    if not folder.is_dir():
        raise ConfigurationError(
            f"--models {models} is a file: pass the folder that holds it ({folder.parent})"
        )
    files = sorted(folder.glob("*.hec"))
    if not files:
        raise ConfigurationError(
            f"--models {models} holds no .hec circuit files: compile one into it with "
            f"he-infer compile MODEL.onnx -o {models}/MODEL.hec"
        )
    return files


def no_models_message(models: Path, files: list[Path], backend: str) -> str:
    """Why no circuit of the folder loaded, and what to pass instead."""
    from he_inference.circuit import Circuit

    compiled_for: dict[str, int] = {}
    for path in files:
        try:
            other = Circuit.load(path).metadata.get("backend")
        except HEInferenceError:
            continue
        if other and other != backend:
            compiled_for[str(other)] = compiled_for.get(str(other), 0) + 1
    if compiled_for:
        theirs = max(compiled_for, key=compiled_for.__getitem__)
        return (
            f"no model to serve: the circuits in {models} were compiled for "
            f"{', '.join(sorted(compiled_for))}, not {backend}: serve them with "
            f"'he-infer serve --backend {theirs}', or recompile them with "
            f"'he-infer compile --backend {backend}'"
        )
    return (
        f"no model to serve: none of the {len(files)} circuit files in {models} loaded "
        f"(the warnings above say why): recompile them with he-infer compile"
    )


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to the address, so a port in use is said before serving is announced.

    Raises:
        ConfigurationError: the address is in use or cannot be bound here.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"port {port} on {host} is already in use (another he-infer serve?): stop "
                f"that process or pass --port with a free port"
            ) from None
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --host "
            f"or --port"
        ) from None
    return listener
