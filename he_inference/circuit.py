"""The circuit IR: a short SSA list of nodes over encrypted slot vectors, and its manifest.

Packing (see DESIGN.md, "Packing"): every encrypted value uses one *period* ``m`` (a power
of two) for the whole circuit. A value of ``d`` elements is split into ``ceil(d / m)``
chunks, one ciphertext each. In a chunk, query ``q`` of a throughput batch owns the slots
``[2mq, 2m(q+1))`` and holds its ``m`` elements twice, ``[x, x]``. The duplicate is what makes
a left rotation by ``k < m`` read ``x[(t + k) % m]`` in the first half of every block, so a
linear map needs no masking; the diagonals are zero outside the first halves of the used
blocks, which keeps the unused slots of every result at zero and the weights out of them.
After a linear map one rotation by ``-m`` and one addition restore the duplicate.

A ``LinearNode`` stores only the non-zero generalised diagonals of each ``m x m`` block of its
padded matrix, ``d_k[t] = A[t, (t + k) % m]``, and the baby-step size of its baby-step
giant-step schedule (Halevi and Shoup, "Algorithms in HElib", CRYPTO 2014, section 4.2):
``A x = sum_g rot(sum_b rot(d_{g n1 + b}, -g n1) * rot(x, b), g n1)``, which costs about
``n1 + nd / n1`` rotations for ``nd`` diagonals instead of ``nd``.

The circuit file is a zip of ``manifest.json`` and ``weights.npz`` (loaded with
``allow_pickle=False``), carrying the format version, the producing package version and a
content hash over both, so a file that was altered or written by another format is refused.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from he_inference.errors import CircuitError, FormatVersionError, InputError
from he_inference.params import CkksParameters

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PACKAGE_VERSION = "0.1.0"


@dataclass(frozen=True)
class Layout:
    """Where each tensor element sits in the slots of a value's ciphertexts.

    Attributes:
        shape: the tensor shape of one query, as in the ONNX model (batch dimension 1).
        period: ``m``, the cyclic length every linear map works in (a power of two).
        chunks: ciphertexts the value spans.
        batch: queries packed side by side in each ciphertext (throughput mode).
        scale: the slots hold the values divided by this (a power of two): an output kept
            small so it fits a first prime with little integer room (noise flooding).
    """

    shape: tuple[int, ...]
    period: int
    chunks: int
    batch: int = 1
    scale: float = 1.0

    @property
    def size(self) -> int:
        """Elements of one query's tensor."""
        return int(np.prod(self.shape)) if self.shape else 1

    def slot_indices(self, slots: int) -> np.ndarray:
        """``[batch, size]`` array of (chunk * slots + slot) for each element's first copy."""
        m = self.period
        if 2 * m * self.batch > slots:
            raise CircuitError(
                f"layout needs {2 * m * self.batch} slots per ciphertext and has {slots}"
            )
        i = np.arange(self.size)
        q = np.arange(self.batch)[:, None]
        indices: np.ndarray = (i // m) * slots + q * 2 * m + (i % m)
        return indices

    def pack(self, x: np.ndarray, slots: int) -> np.ndarray:
        """Slot vectors ``[chunks, slots]`` for ``batch`` queries ``[batch, *shape]``.

        Raises:
            InputError: the queries do not have the layout's shape or count.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.shape == self.shape and self.batch == 1:
            x = x[None]
        if x.ndim == len(self.shape) + 1 and x.shape[1:] == self.shape and x.shape[0] < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - x.shape[0], *self.shape))])
        if x.shape != (self.batch, *self.shape):
            raise InputError(
                f"input of shape {x.shape} does not match the model's input "
                f"{(self.batch, *self.shape)}"
            )
        out = np.zeros(self.chunks * slots)
        idx = self.slot_indices(slots)
        flat = x.reshape(self.batch, -1) / self.scale
        out[idx] = flat
        out[idx + self.period] = flat
        return out.reshape(self.chunks, slots)

    def unpack(self, vectors: np.ndarray, slots: int) -> np.ndarray:
        """Tensors ``[batch, *shape]`` from decrypted slot vectors ``[chunks, slots]``."""
        vectors = np.asarray(vectors, dtype=np.float64).reshape(-1)
        if vectors.size != self.chunks * slots:
            raise CircuitError(
                f"{vectors.size} slots decrypted, layout needs {self.chunks * slots}"
            )
        tensors: np.ndarray = vectors[self.slot_indices(slots)] * self.scale
        return tensors.reshape(self.batch, *self.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data: dict[str, Any] = {
            "shape": list(self.shape),
            "period": self.period,
            "chunks": self.chunks,
            "batch": self.batch,
        }
        if self.scale != 1.0:
            data["scale"] = self.scale
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(int(s) for s in data["shape"]),
            int(data["period"]),
            int(data["chunks"]),
            int(data.get("batch", 1)),
            float(data.get("scale", 1.0)),
        )


@dataclass
class NodeCost:
    """Operation counts of one node, the unit the cost model prices."""

    rotations: int = 0
    plain_multiplications: int = 0
    multiplications: int = 0
    additions: int = 0
    rescales: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class LinearBlock:
    """The non-zero diagonals of one ``m x m`` block of a linear map's padded matrix."""

    out_chunk: int
    in_chunk: int
    offsets: np.ndarray  # int64 [nd], each in [0, m)
    diagonals: np.ndarray  # float64 [nd, m], d_k[t] = A[t, (t + k) % m]


@dataclass
class LinearNode:
    """y = A x + b on one encrypted value, as diagonals with a baby-step giant-step split."""

    name: str
    input: str
    in_chunks: int
    out_chunks: int
    blocks: list[LinearBlock]
    bias: np.ndarray | None  # float64 [out_chunks, m]
    baby_steps: int
    duplicate: bool = True
    sources: list[str] = field(default_factory=list)
    level_in: int = 0
    level_out: int = 0
    kind: str = "linear"

    @property
    def inputs(self) -> list[str]:
        """Values this node reads."""
        return [self.input]


@dataclass
class PolynomialNode:
    """An elementwise polynomial in the Chebyshev basis of [lower, upper]."""

    name: str
    input: str
    coefficients: np.ndarray  # float64 [degree + 1], Chebyshev basis on [lower, upper]
    lower: float
    upper: float
    function: str
    max_error: float
    sources: list[str] = field(default_factory=list)
    level_in: int = 0
    level_out: int = 0
    kind: str = "polynomial"
    # The calibrated range the fit covers; [lower, upper] is (-1, 1) when the map onto it
    # was folded into the previous linear node. None in files from before it was recorded.
    fitted_range: tuple[float, float] | None = None

    @property
    def degree(self) -> int:
        """Degree of the polynomial."""
        return len(self.coefficients) - 1

    @property
    def inputs(self) -> list[str]:
        """Values this node reads."""
        return [self.input]


@dataclass
class BinaryNode:
    """Elementwise ``add`` or ``multiply`` of two encrypted values."""

    name: str
    left: str
    right: str
    op: str  # "add" | "multiply"
    sources: list[str] = field(default_factory=list)
    level_in: int = 0
    level_out: int = 0
    kind: str = "binary"

    @property
    def inputs(self) -> list[str]:
        """Values this node reads."""
        return [self.left, self.right]


Node = LinearNode | PolynomialNode | BinaryNode


# -- baby-step giant-step schedule and costs ------------------------------------------------


def linear_schedule(node: LinearNode) -> dict[int, list[tuple[int, int]]]:
    """Giant step -> [(block index, diagonal index)] for every non-zero diagonal."""
    schedule: dict[int, list[tuple[int, int]]] = {}
    n1 = node.baby_steps
    for b_index, block in enumerate(node.blocks):
        for d_index, k in enumerate(block.offsets.tolist()):
            schedule.setdefault((k // n1) * n1, []).append((b_index, d_index))
    return schedule


def linear_rotation_points(node: LinearNode) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Non-zero baby steps per input chunk and giant steps (with 0) per output chunk, sorted."""
    n1 = node.baby_steps
    babies: dict[int, set[int]] = {}
    giants: dict[int, set[int]] = {}
    for block in node.blocks:
        for k in block.offsets.tolist():
            if k % n1:
                babies.setdefault(block.in_chunk, set()).add(k % n1)
            giants.setdefault(block.out_chunk, set()).add((k // n1) * n1)
    return ({j: sorted(b) for j, b in babies.items()}, {i: sorted(g) for i, g in giants.items()})


def linear_rotation_steps(node: LinearNode, period: int, hoist: bool = False) -> set[int]:
    """Rotation steps (left; may be negative) whose Galois keys a linear node needs.

    Galois keys are the largest upload, so by default only the gaps between consecutive
    steps get keys: baby steps are reached one from the next (``rot(x, b2) =
    rot(rot(x, b1), b2 - b1)``) and giant steps by Horner's rule on the accumulated sums
    (``sum_g rot(s_g, g) = rot(... rot(s_gk, gk - gk-1) + s_gk-1 ..., g1)``). Both take
    exactly as many rotations as rotating each term directly, so the keys shrink from
    ``~2 sqrt(d)`` to a handful at no cost in rotations. ``hoist`` adds a key for every
    baby step, so a backend with hoisting (OpenFHE) can rotate one input by all of them
    from one decomposition: more key bytes, less time.
    """
    babies, giants = linear_rotation_points(node)
    steps: set[int] = set()
    for points in babies.values():
        steps |= set(points) if hoist else _gaps([0, *points])
    for points in giants.values():
        steps |= _gaps(points)
    if node.duplicate:
        steps.add(-period)
    steps.discard(0)
    return steps


def _gaps(points: list[int]) -> set[int]:
    """Differences of consecutive sorted points, and the first point itself (from 0)."""
    if not points:
        return set()
    return {points[0], *(b - a for a, b in itertools.pairwise(points))} - {0}


def node_cost(node: Node) -> NodeCost:
    """Operation counts of a node as the evaluator runs it."""
    if isinstance(node, LinearNode):
        babies, giants = linear_rotation_points(node)
        diagonals = sum(int(block.offsets.size) for block in node.blocks)
        rotations = (
            sum(len(b) for b in babies.values())
            + sum(len(g) - (1 if g[0] == 0 else 0) for g in giants.values())
            + (node.out_chunks if node.duplicate else 0)
        )
        return NodeCost(
            rotations=rotations,
            plain_multiplications=diagonals,
            additions=diagonals + (node.out_chunks if node.bias is not None else 0),
            rescales=node.out_chunks,
        )
    if isinstance(node, PolynomialNode):
        from he_inference.approx import chebyshev_cost

        mults, scalars, additions, _ = chebyshev_cost(node.coefficients)
        affine = 0 if (node.lower, node.upper) == (-1.0, 1.0) else 1
        return NodeCost(
            multiplications=mults,
            plain_multiplications=scalars + affine,
            additions=additions + affine,
            rescales=mults + scalars + affine,
        )
    if node.op == "multiply":
        return NodeCost(multiplications=1, rescales=1)
    return NodeCost(additions=1)


# -- the circuit ------------------------------------------------------------------------


@dataclass
class Circuit:
    """A compiled model: nodes, layouts, parameters and the public facts a client needs."""

    name: str
    params: CkksParameters
    input_name: str
    input_layout: Layout
    output_name: str
    output_layout: Layout
    nodes: list[Node]
    rotation_steps: tuple[int, ...] = ()
    postprocess: list[dict[str, Any]] = field(default_factory=list)
    input_range: tuple[float, float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Levels the circuit consumes on its longest path."""
        return max((n.level_out for n in self.nodes), default=0)

    def check_backend(self, backend: str) -> None:
        """Refuse a backend other than the one the circuit was compiled for.

        The chain is shaped by the backend's key switching (OpenFHE reserves a 60-bit prime
        that SEAL does not), so another backend would have to fall back to a slower, noisier
        key switching and lose precision silently. The plain backend simulates any circuit.

        Raises:
            ConfigurationError: the circuit names another backend.
        """
        from he_inference.errors import ConfigurationError

        compiled_for = self.metadata.get("backend")
        if compiled_for and backend not in (compiled_for, "plain"):
            raise ConfigurationError(
                f"circuit {self.name!r} was compiled for {compiled_for} and would lose "
                f"precision on {backend}: recompile it with 'he-infer compile --backend "
                f"{backend}'"
            )

    def layout(self, value: str) -> Layout:
        """The layout of a named value (all share the period; chunks follow the shape)."""
        return self.input_layout if value == self.input_name else self.output_layout

    def iter_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every weight array, with the name it is stored under."""
        for i, node in enumerate(self.nodes):
            if isinstance(node, LinearNode):
                for j, block in enumerate(node.blocks):
                    yield f"n{i}.b{j}.offsets", block.offsets
                    yield f"n{i}.b{j}.diagonals", block.diagonals
                if node.bias is not None:
                    yield f"n{i}.bias", node.bias
            elif isinstance(node, PolynomialNode):
                yield f"n{i}.coefficients", node.coefficients

    def manifest(self) -> dict[str, Any]:
        """The public description: the circuit minus its weights."""
        nodes = []
        for node in self.nodes:
            entry: dict[str, Any] = {
                "kind": node.kind,
                "name": node.name,
                "inputs": node.inputs,
                "sources": node.sources,
                "level_in": node.level_in,
                "level_out": node.level_out,
                "cost": node_cost(node).to_dict(),
            }
            if isinstance(node, LinearNode):
                entry.update(
                    in_chunks=node.in_chunks,
                    out_chunks=node.out_chunks,
                    baby_steps=node.baby_steps,
                    duplicate=node.duplicate,
                    blocks=[[b.out_chunk, b.in_chunk, int(b.offsets.size)] for b in node.blocks],
                    has_bias=node.bias is not None,
                )
            elif isinstance(node, PolynomialNode):
                entry.update(
                    function=node.function,
                    degree=node.degree,
                    interval=[float(node.lower), float(node.upper)],
                    range=[float(v) for v in (node.fitted_range or (node.lower, node.upper))],
                    max_error=float(node.max_error),
                )
            else:
                entry.update(op=node.op)
            nodes.append(entry)
        return {
            "format_version": FORMAT_VERSION,
            "producer": f"he-inference {PACKAGE_VERSION}",
            "name": self.name,
            "params": self.params.to_dict(),
            "input": {"name": self.input_name, "layout": self.input_layout.to_dict()},
            "output": {"name": self.output_name, "layout": self.output_layout.to_dict()},
            "rotation_steps": list(self.rotation_steps),
            "depth": self.depth,
            "postprocess": self.postprocess,
            "input_range": list(self.input_range) if self.input_range else None,
            "nodes": nodes,
            "metadata": self.metadata,
        }

    # -- file format ------------------------------------------------------------------

    def content_hash(self) -> str:
        """sha256 over the manifest and every weight array."""
        return _content_hash(self.manifest(), dict(self.iter_arrays()))

    def to_bytes(self) -> bytes:
        """The circuit file's bytes."""
        manifest = self.manifest()
        arrays = dict(self.iter_arrays())
        manifest["content_hash"] = _content_hash(manifest, arrays)
        weights = io.BytesIO()
        np.savez(weights, **arrays)  # type: ignore[arg-type]
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
            zf.writestr("weights.npz", weights.getvalue())
        return out.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write the circuit file atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit file.

        Raises:
            CircuitError: the file is missing, not a circuit, or its hash does not match.
            FormatVersionError: it was written by another format version.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CircuitError(f"cannot read circuit file {path}: {exc.strerror}") from exc
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Circuit:
        """Parse a circuit file's bytes (see :meth:`load`)."""
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                manifest = json.loads(zf.read("manifest.json"))
                with np.load(io.BytesIO(zf.read("weights.npz")), allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
        # zlib.error, EOFError and NotImplementedError: a damaged or unusual deflate stream.
        except (
            zipfile.BadZipFile,
            KeyError,
            ValueError,
            OSError,
            EOFError,
            NotImplementedError,
            zlib.error,
        ) as exc:
            raise CircuitError(
                f"{source} is not a he-inference circuit file ({exc}): compile the model "
                f"again with 'he-infer compile'"
            ) from exc
        if not isinstance(manifest, dict):
            raise CircuitError(f"{source} holds a manifest that is not a JSON object")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{source} has circuit format {version} and this he-inference "
                f"({PACKAGE_VERSION}) reads format {FORMAT_VERSION}: recompile the model"
            )
        stored = manifest.pop("content_hash", None)
        if stored != _content_hash(manifest, arrays):
            raise CircuitError(f"{source} fails its content hash: the file is damaged or altered")
        circuit = _circuit_from(manifest, arrays)
        # OpenFHE circuits from before noise flooding carry neither its parameters nor the
        # mark of having turned it off: they still serve, with plain decryption.
        metadata = circuit.metadata
        if metadata.get("backend") == "openfhe" and "noise_flooding" not in metadata:
            logger.warning(
                "%s was compiled before noise-flooding decryption: its results decrypt "
                "without it; recompile it with he-infer compile --backend openfhe",
                source,
            )
        return circuit


def _content_hash(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _circuit_from(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> Circuit:
    try:
        nodes: list[Node] = []
        for i, entry in enumerate(manifest["nodes"]):
            common = {
                "name": entry["name"],
                "sources": list(entry["sources"]),
                "level_in": int(entry["level_in"]),
                "level_out": int(entry["level_out"]),
            }
            if entry["kind"] == "linear":
                blocks = [
                    LinearBlock(
                        int(o),
                        int(c),
                        arrays[f"n{i}.b{j}.offsets"].astype(np.int64),
                        arrays[f"n{i}.b{j}.diagonals"].astype(np.float64),
                    )
                    for j, (o, c, _) in enumerate(entry["blocks"])
                ]
                bias = arrays.get(f"n{i}.bias") if entry["has_bias"] else None
                nodes.append(
                    LinearNode(
                        input=entry["inputs"][0],
                        in_chunks=entry["in_chunks"],
                        out_chunks=entry["out_chunks"],
                        blocks=blocks,
                        bias=bias,
                        baby_steps=int(entry["baby_steps"]),
                        duplicate=bool(entry["duplicate"]),
                        **common,
                    )
                )
            elif entry["kind"] == "polynomial":
                lower, upper = entry["interval"]
                nodes.append(
                    PolynomialNode(
                        input=entry["inputs"][0],
                        coefficients=arrays[f"n{i}.coefficients"],
                        lower=float(lower),
                        upper=float(upper),
                        function=entry["function"],
                        max_error=float(entry["max_error"]),
                        fitted_range=_pair(entry.get("range")),
                        **common,
                    )
                )
            elif entry["kind"] == "binary":
                nodes.append(
                    BinaryNode(
                        left=entry["inputs"][0], right=entry["inputs"][1], op=entry["op"], **common
                    )
                )
            else:
                raise ValueError(f"unknown node kind {entry['kind']!r}")
        rng = manifest.get("input_range")
        return Circuit(
            name=manifest["name"],
            params=CkksParameters.from_dict(manifest["params"]),
            input_name=manifest["input"]["name"],
            input_layout=Layout.from_dict(manifest["input"]["layout"]),
            output_name=manifest["output"]["name"],
            output_layout=Layout.from_dict(manifest["output"]["layout"]),
            nodes=nodes,
            rotation_steps=tuple(int(s) for s in manifest["rotation_steps"]),
            postprocess=list(manifest.get("postprocess", [])),
            input_range=(float(rng[0]), float(rng[1])) if rng else None,
            metadata=dict(manifest.get("metadata", {})),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CircuitError(f"circuit manifest is malformed: {exc}") from exc


def _pair(value: Any) -> tuple[float, float] | None:
    """A stored ``[low, high]`` as a float pair, or None when absent."""
    return None if value is None else (float(value[0]), float(value[1]))
