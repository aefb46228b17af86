"""Versioned binary envelopes for ciphertext batches and evaluation-key bundles.

Everything that crosses the network between the client and the server is one envelope::

    offset 0   magic b"HEIW"                     4 bytes
    offset 4   format version, uint16 big-endian 2 bytes
    offset 6   header length, uint32 big-endian  4 bytes
    offset 10  header: a msgpack map             header-length bytes
    then       the blobs, concatenated           exactly sum(header["sizes"]) bytes

The header names what the blobs are (``ciphertexts`` or ``evaluation_keys``), the backend
and library that wrote them, the fingerprint of the CKKS parameters, an optional model name,
and the exact byte length of each blob. msgpack rather than pickle because a server must
parse it from strangers: msgpack decodes to plain data and never runs code.

Decoding refuses a payload before any blob reaches a backend parser, cheapest check first:
the prefix, a bound on the header length, msgpack with every length limit set from the
header's own size (so a field cannot claim more memory than the bytes that carry it), the
header's schema, the count and each blob's size against the caller's bounds, the sizes
summing exactly to the bytes that remain, and finally the kind, backend, parameters and
model against what the caller expects. Structural faults raise
:class:`~he_inference.errors.MalformedPayloadError`; a well-formed envelope meant for
another context raises :class:`~he_inference.errors.ParameterMismatchError`, naming both
sides. An evaluation-key bundle may hold only ``relin_keys`` and ``galois_keys``: a secret
key is refused on both ends with :class:`~he_inference.errors.SecretKeyLeakError`.

The library version is carried for diagnosis and not compared: SEAL and OpenFHE keep their
serialisation stable across patch releases, and the backend's checked load is what decides.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from he_inference.backends.base import EVALUATION_KEY_KINDS, KEY_KINDS, Backend, Ciphertext
from he_inference.errors import (
    MalformedPayloadError,
    ParameterMismatchError,
    SecretKeyLeakError,
    WireError,
)

logger = logging.getLogger(__name__)

MAGIC = b"HEIW"
FORMAT_VERSION = 1
PREFIX = struct.Struct(">4sHI")

KIND_CIPHERTEXTS = "ciphertexts"
KIND_EVALUATION_KEYS = "evaluation_keys"
PAYLOAD_KINDS = (KIND_CIPHERTEXTS, KIND_EVALUATION_KEYS)

# A header holds a handful of short strings and one size per blob (at most 9 bytes each in
# msgpack), so 64 KiB covers thousands of ciphertexts while keeping a hostile header cheap.
MAX_HEADER_BYTES = 1 << 16
# Backend names, versions, fingerprints and model names are short; longer is an attack.
MAX_FIELD_CHARS = 256

_HEADER_FIELDS = frozenset(
    {"version", "kind", "backend", "library_version", "params", "model", "count", "sizes", "names"}
)


@dataclass(frozen=True)
class Envelope:
    """The decoded content of one wire envelope.

    Attributes:
        kind: ``ciphertexts`` or ``evaluation_keys``.
        backend: name of the backend that wrote the blobs.
        library_version: version of that backend's library, for diagnosis.
        params_fingerprint: :meth:`CkksParameters.fingerprint` of the writer's parameters.
        blobs: the serialised objects, in order.
        names: one name per blob (the key kind for a key bundle), or ``None``.
        model: the model the payload is meant for, or ``None``.
    """

    kind: str
    backend: str
    library_version: str
    params_fingerprint: str
    blobs: tuple[bytes, ...]
    names: tuple[str, ...] | None = None
    model: str | None = None


# -- low level: bytes <-> Envelope ------------------------------------------------------------


def pack(envelope: Envelope) -> bytes:
    """Serialise an envelope to its wire form.

    Raises:
        SecretKeyLeakError: a key bundle names a ``secret_key``.
        MalformedPayloadError: the envelope is inconsistent (kind, names, empty, too long
            a header).
    """
    _check_kind(envelope.kind)
    if not envelope.blobs:
        raise MalformedPayloadError(f"an envelope of {envelope.kind} needs at least one blob")
    if envelope.names is not None and len(envelope.names) != len(envelope.blobs):
        raise MalformedPayloadError(
            f"{len(envelope.names)} names for {len(envelope.blobs)} blobs: give one per blob"
        )
    if envelope.kind == KIND_EVALUATION_KEYS:
        _check_key_names(envelope.names)

    header = {
        "version": FORMAT_VERSION,
        "kind": envelope.kind,
        "backend": envelope.backend,
        "library_version": envelope.library_version,
        "params": envelope.params_fingerprint,
        "model": envelope.model,
        "count": len(envelope.blobs),
        "sizes": [len(blob) for blob in envelope.blobs],
        "names": None if envelope.names is None else list(envelope.names),
    }
    encoded = msgpack.packb(header, use_bin_type=True)
    if len(encoded) > MAX_HEADER_BYTES:
        raise MalformedPayloadError(
            f"the header takes {len(encoded)} bytes and the limit is {MAX_HEADER_BYTES}: "
            f"send the {len(envelope.blobs)} blobs in several envelopes"
        )
    return b"".join([PREFIX.pack(MAGIC, FORMAT_VERSION, len(encoded)), encoded, *envelope.blobs])


def unpack(
    data: bytes,
    *,
    kind: str,
    backend: str,
    params_fingerprint: str,
    max_count: int,
    max_blob_bytes: int,
    model: str | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Envelope:
    """Parse and check an envelope against what the caller expects; blobs are not parsed.

    Args:
        data: the envelope's bytes, as received.
        kind: the payload kind the caller expects.
        backend: the backend name the caller will load the blobs with.
        params_fingerprint: the fingerprint of the caller's parameters.
        max_count: the most blobs accepted.
        max_blob_bytes: the largest single blob accepted.
        model: the model the caller serves; ``None`` accepts any model name.
        max_header_bytes: the largest header accepted.

    Raises:
        MalformedPayloadError: the bytes are truncated, altered, oversized or do not parse.
        SecretKeyLeakError: a key bundle holds a ``secret_key``.
        ParameterMismatchError: the envelope is well formed but for another kind, backend,
            parameter set or model.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedPayloadError(f"an envelope is bytes, not {type(data).__name__}")
    view = memoryview(data).cast("B")
    header = _read_header(view, max_header_bytes)
    body_start = PREFIX.size + _header_length(view)

    sizes = header["sizes"]
    if header["count"] > max_count:
        raise MalformedPayloadError(
            f"the envelope holds {header['count']} blobs and at most {max_count} are accepted"
        )
    largest = max(sizes)
    if largest > max_blob_bytes:
        raise MalformedPayloadError(
            f"a blob of {largest} bytes exceeds the limit of {max_blob_bytes} bytes"
        )
    remaining = len(view) - body_start
    if sum(sizes) != remaining:
        raise MalformedPayloadError(
            f"the header declares {sum(sizes)} bytes of blobs and {remaining} follow: "
            f"the payload is truncated or altered"
        )
    if header["kind"] == KIND_EVALUATION_KEYS:
        _check_key_names(header["names"])
    _check_identity(
        header, kind=kind, backend=backend, params_fingerprint=params_fingerprint, model=model
    )

    blobs = []
    offset = body_start
    for size in sizes:
        blobs.append(bytes(view[offset : offset + size]))
        offset += size
    logger.debug(
        "unpacked %s envelope: %d blobs, %d bytes, backend %s %s",
        header["kind"],
        len(blobs),
        len(view),
        header["backend"],
        header["library_version"],
    )
    names = header["names"]
    return Envelope(
        kind=header["kind"],
        backend=header["backend"],
        library_version=header["library_version"],
        params_fingerprint=header["params"],
        blobs=tuple(blobs),
        names=None if names is None else tuple(names),
        model=header["model"],
    )


def key_id(data: bytes) -> str:
    """The id the server stores an evaluation-key envelope under: its SHA-256 in hex."""
    return hashlib.sha256(data).hexdigest()


# -- high level: Backend <-> bytes ------------------------------------------------------------


def encode_ciphertexts(
    backend: Backend, cts: Sequence[Ciphertext], model: str | None = None
) -> bytes:
    """Serialise a batch of ciphertexts (a query or a result) into one envelope.

    Raises:
        MalformedPayloadError: the batch is empty.
    """
    blobs = tuple(backend.serialize_ciphertext(ct) for ct in cts)
    return pack(
        Envelope(
            kind=KIND_CIPHERTEXTS,
            backend=backend.name,
            library_version=backend.library_version,
            params_fingerprint=backend.params.fingerprint(),
            blobs=blobs,
            model=model,
        )
    )


def decode_ciphertexts(
    backend: Backend, data: bytes, max_count: int, model: str | None = None
) -> list[Ciphertext]:
    """Check an envelope of ciphertexts and load each one into ``backend``.

    Args:
        backend: the context to load into; its name and parameters must match the envelope.
        data: the envelope's bytes.
        max_count: the most ciphertexts accepted.
        model: the model the caller serves; ``None`` accepts any model name.

    Raises:
        MalformedPayloadError: the envelope or one of its ciphertexts does not parse.
        ParameterMismatchError: the envelope or a ciphertext is for another context or model.
    """
    envelope = unpack(
        data,
        kind=KIND_CIPHERTEXTS,
        backend=backend.name,
        params_fingerprint=backend.params.fingerprint(),
        max_count=max_count,
        max_blob_bytes=backend.max_ciphertext_bytes(),
        model=model,
    )
    count = len(envelope.blobs)
    cts = []
    for index, blob in enumerate(envelope.blobs):
        try:
            cts.append(backend.load_ciphertext(blob))
        except WireError as exc:
            raise type(exc)(f"ciphertext {index} of {count}: {exc}") from exc
        except Exception as exc:
            # The parsers are C++ libraries that signal bad input with their own exception
            # types; whatever they raise on altered bytes is a malformed payload here.
            raise MalformedPayloadError(
                f"ciphertext {index} of {count} does not load on the {backend.name} backend "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    return cts


def encode_evaluation_keys(backend: Backend) -> bytes:
    """Serialise the backend's evaluation keys (never the secret key) into one envelope.

    Raises:
        KeyError_: the backend holds no evaluation keys.
    """
    keys = backend.serialize_keys(EVALUATION_KEY_KINDS)
    names = tuple(keys)
    return pack(
        Envelope(
            kind=KIND_EVALUATION_KEYS,
            backend=backend.name,
            library_version=backend.library_version,
            params_fingerprint=backend.params.fingerprint(),
            blobs=tuple(keys[name] for name in names),
            names=names,
        )
    )


def decode_evaluation_keys(
    backend: Backend, data: bytes, max_bytes: int | None = None
) -> dict[str, bytes]:
    """Check an evaluation-key envelope for ``backend``; the keys are returned, not loaded.

    Args:
        backend: the context the keys are for; its name and parameters must match.
        data: the envelope's bytes.
        max_bytes: the largest envelope accepted; ``None`` for no bound beyond ``data``.

    Raises:
        MalformedPayloadError: the envelope does not parse, is too large, or names an
            unknown key kind or one twice.
        SecretKeyLeakError: the bundle holds a ``secret_key``.
        ParameterMismatchError: the keys are for another backend or parameter set.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise MalformedPayloadError(
            f"the key envelope has {len(data)} bytes and the limit is {max_bytes}"
        )
    envelope = unpack(
        data,
        kind=KIND_EVALUATION_KEYS,
        backend=backend.name,
        params_fingerprint=backend.params.fingerprint(),
        max_count=len(EVALUATION_KEY_KINDS),
        max_blob_bytes=len(data),
    )
    if envelope.names is None:  # _check_key_names refuses this already; narrows the type
        raise MalformedPayloadError("the key envelope does not name its keys")
    return dict(zip(envelope.names, envelope.blobs, strict=True))


# -- checks -----------------------------------------------------------------------------------


def _header_length(view: memoryview) -> int:
    length: int = PREFIX.unpack_from(view)[2]
    return length


def _read_header(view: memoryview, max_header_bytes: int) -> dict[str, Any]:
    """Check the prefix, parse the header under strict limits, and validate its schema."""
    if len(view) < PREFIX.size:
        raise MalformedPayloadError(
            f"{len(view)} bytes are too short for an envelope (the prefix alone is {PREFIX.size})"
        )
    magic, version, header_length = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise MalformedPayloadError(
            f"not a he-inference envelope: starts with {bytes(magic)!r}, expected {MAGIC!r}"
        )
    if version != FORMAT_VERSION:
        raise MalformedPayloadError(
            f"envelope format version {version}, this build reads version {FORMAT_VERSION}: "
            f"use the same he-inference release on the client and the server"
        )
    if header_length > max_header_bytes:
        raise MalformedPayloadError(
            f"the header claims {header_length} bytes and the limit is {max_header_bytes}"
        )
    if header_length > len(view) - PREFIX.size:
        raise MalformedPayloadError(
            f"the header claims {header_length} bytes and {len(view) - PREFIX.size} follow "
            f"the prefix: the payload is truncated"
        )

    raw = bytes(view[PREFIX.size : PREFIX.size + header_length])
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=header_length,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=header_length,
            max_map_len=len(_HEADER_FIELDS),
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise MalformedPayloadError(f"the envelope header does not parse: {exc}") from exc
    _check_schema(header, version)
    return header  # type: ignore[no-any-return]


def _check_schema(header: object, version: int) -> None:
    if not isinstance(header, dict):
        raise MalformedPayloadError(f"the header is a {type(header).__name__}, not a map")
    if set(header) != _HEADER_FIELDS:
        missing = sorted(_HEADER_FIELDS - set(header))
        unknown = sorted(set(header) - _HEADER_FIELDS)
        raise MalformedPayloadError(
            f"the header has missing fields {missing} and unknown fields {unknown}"
        )
    if header["version"] != version or type(header["version"]) is not int:
        raise MalformedPayloadError(
            f"the header says version {header['version']!r} and the prefix {version}"
        )
    for field in ("kind", "backend", "library_version", "params"):
        _check_short_str(header, field)
    if header["model"] is not None:
        _check_short_str(header, "model")
    _check_kind(header["kind"])

    count, sizes, names = header["count"], header["sizes"], header["names"]
    if type(count) is not int or count < 1:
        raise MalformedPayloadError(f"the header's count {count!r} is not a positive integer")
    if not isinstance(sizes, list) or len(sizes) != count:
        raise MalformedPayloadError(f"the header declares {count} blobs and not one size each")
    if any(type(size) is not int or size < 0 for size in sizes):
        raise MalformedPayloadError("a blob size in the header is not a non-negative integer")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != count
        or any(not isinstance(name, str) or len(name) > MAX_FIELD_CHARS for name in names)
    ):
        raise MalformedPayloadError(f"the header declares {count} blobs and not one name each")


def _check_short_str(header: dict[str, Any], field: str) -> None:
    value = header[field]
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        raise MalformedPayloadError(
            f"the header field {field} is not a string of at most {MAX_FIELD_CHARS} characters"
        )


def _check_kind(kind: object) -> None:
    if kind not in PAYLOAD_KINDS:
        raise MalformedPayloadError(
            f"unknown payload kind {kind!r}: expected one of {', '.join(PAYLOAD_KINDS)}"
        )


def _check_key_names(names: Sequence[str] | None) -> None:
    """Allow each evaluation-key kind at most once; refuse a secret key loudly."""
    if names is None:
        raise MalformedPayloadError("a key bundle must name the kind of each key")
    if "secret_key" in names:
        raise SecretKeyLeakError(
            "the key bundle holds a secret_key, which must never leave the client: send "
            "only the evaluation keys (relin_keys, galois_keys)"
        )
    for name in names:
        if name not in EVALUATION_KEY_KINDS:
            what = "not an evaluation key" if name in KEY_KINDS else "an unknown key kind"
            raise MalformedPayloadError(
                f"the key bundle holds {name!r}, {what}: a bundle holds only "
                f"{', '.join(EVALUATION_KEY_KINDS)}"
            )
    if len(set(names)) != len(names):
        raise MalformedPayloadError(f"the key bundle names a kind twice: {list(names)}")


def _check_identity(
    header: dict[str, Any],
    *,
    kind: str,
    backend: str,
    params_fingerprint: str,
    model: str | None,
) -> None:
    if header["kind"] != kind:
        raise ParameterMismatchError(
            f"the envelope holds {header['kind']} and {kind} were expected"
        )
    if header["backend"] != backend or header["params"] != params_fingerprint:
        raise ParameterMismatchError(
            f"envelope is for backend {header['backend']}, params {header['params']}, "
            f"this context expects {backend}, params {params_fingerprint}"
        )
    if model is not None and header["model"] != model:
        raise ParameterMismatchError(
            f"envelope is for model {header['model']!r} and this server expects {model!r}"
        )
