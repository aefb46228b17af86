"""The affine map of a segment of linear ONNX nodes, measured with onnxruntime.

Rather than lowering Gemm, Conv, Pad, Transpose, ... one by one, the compiler builds a model
of the segment reading its one encrypted source and runs it on the zero vector (giving
``b``) and on scaled basis vectors (column ``j`` of ``A`` is ``(f(c e_j) - b) / c``), in
batches where the batch dimension passes through the segment, one by one where it does
not. Every linear operator the runtime knows then lowers without code of its own. The map
is then checked on random vectors, so a segment that is not affine is refused, not
mis-compiled.

``c = 2^10`` for float32 segments: the weights' contributions then dominate the bias in
``f(c e_j)``, so the subtraction loses ``2^10`` times less of them to the bias's rounding,
and the scaling itself is exact. Float64 segments use ``c = 1``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from scipy import sparse

from compiler.graph import ImportedModel, describe, session, submodel
from he_inference.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

#: Relative error of ``A x + b`` against the segment on a random input that counts as affine.
AFFINE_TOLERANCE = 1e-4

#: Largest ``d_in * d_out`` measured: the basis runs cost that many multiply-adds at least.
MAX_MAP_ELEMENTS = 1 << 28

#: Elements of one batch of basis vectors and their outputs (about 128 MiB as float64).
_BATCH_ELEMENTS = 1 << 24

AffineMap = tuple[sparse.csr_matrix, np.ndarray]
Runner = Callable[[np.ndarray], list[np.ndarray]]


def measure_affine_maps(
    imported: ImportedModel,
    source: str,
    nodes: Sequence[onnx.NodeProto],
    outputs: Sequence[str],
) -> dict[str, AffineMap]:
    """``(A, b)`` with ``output = A @ source + b`` (flattened, row-major) for each output.

    Raises:
        UnsupportedModelError: onnxruntime cannot run the segment, or it is not affine.
    """
    shape = imported.shapes[source]
    d_in = int(np.prod(shape))
    dtype = imported.input_dtype
    scale = 1024.0 if dtype == np.float32 else 1.0
    sizes = [int(np.prod(imported.shapes[o])) for o in outputs]
    if d_in * sum(sizes) > MAX_MAP_ELEMENTS:
        raise UnsupportedModelError(
            f"the linear segment from {source!r} ({d_in} elements) to {', '.join(outputs)} "
            f"({sum(sizes)} elements) is too large to measure and to pack: reduce the "
            f"resolution or the channels of the model"
        )
    single = session(submodel(imported, nodes, source, shape, outputs))

    def run(x: np.ndarray) -> list[np.ndarray]:
        values = single.run(list(outputs), {source: x.astype(dtype).reshape(shape)})
        return [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]

    bias = run(np.zeros(d_in))
    maps = None
    if shape and shape[0] == 1 and d_in > 1:
        maps = _columns_batched(imported, source, nodes, outputs, bias, scale)
        if maps is not None and not _is_affine(run, maps, d_in):
            logger.debug("batched basis run of %s mixed the batch; measuring one by one", source)
            maps = None
    if maps is None:
        maps = _columns_looped(run, bias, sizes, d_in, scale)
        if not _is_affine(run, maps, d_in):
            names = ", ".join(describe(n) for n in nodes)
            raise UnsupportedModelError(
                f"the nodes {names} are not affine in {source!r} although their operators "
                f"are linear ones (a non-constant parameter or a data-dependent op): rewrite "
                f"that part of the model"
            )
    for name, (matrix, _) in zip(outputs, maps, strict=True):
        logger.debug(
            "affine map %s <- %s: %s, %d non-zeros", name, source, matrix.shape, matrix.nnz
        )
    return dict(zip(outputs, maps, strict=True))


def _columns_batched(
    imported: ImportedModel,
    source: str,
    nodes: Sequence[onnx.NodeProto],
    outputs: Sequence[str],
    bias: list[np.ndarray],
    scale: float,
) -> list[AffineMap] | None:
    shape = imported.shapes[source]
    d_in = int(np.prod(shape))
    try:
        batched = session(submodel(imported, nodes, source, ["N", *shape[1:]], outputs))
    except UnsupportedModelError:
        return None
    per_batch = max(1, min(d_in, _BATCH_ELEMENTS // (d_in + sum(b.size for b in bias))))
    triplets: list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = [
        ([], [], []) for _ in outputs
    ]
    for start in range(0, d_in, per_batch):
        count = min(per_batch, d_in - start)
        x = np.zeros((count, d_in), imported.input_dtype)
        x[np.arange(count), start + np.arange(count)] = scale
        try:
            values = batched.run(list(outputs), {source: x.reshape(count, *shape[1:])})
        except Exception:  # a Reshape to a fixed batch of 1, for example
            return None
        for out, value, b, acc in zip(outputs, values, bias, triplets, strict=True):
            expected = imported.shapes[out]
            if not expected or expected[0] != 1 or value.shape != (count, *expected[1:]):
                return None
            columns = (np.asarray(value, np.float64).reshape(count, -1) - b) / scale
            j, i = np.nonzero(columns)
            acc[0].append(i)
            acc[1].append(j + start)
            acc[2].append(columns[j, i])
    return [_matrix(acc, b.size, d_in, b) for acc, b in zip(triplets, bias, strict=True)]


def _columns_looped(
    run: Runner, bias: list[np.ndarray], sizes: list[int], d_in: int, scale: float
) -> list[AffineMap]:
    triplets: list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = [
        ([], [], []) for _ in sizes
    ]
    for j in range(d_in):
        x = np.zeros(d_in)
        x[j] = scale
        for value, b, acc in zip(run(x), bias, triplets, strict=True):
            column = (value - b) / scale
            (i,) = np.nonzero(column)
            acc[0].append(i)
            acc[1].append(np.full(i.size, j))
            acc[2].append(column[i])
    return [
        _matrix(acc, size, d_in, b) for acc, size, b in zip(triplets, sizes, bias, strict=True)
    ]


def _matrix(
    acc: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]],
    rows: int,
    cols: int,
    bias: np.ndarray,
) -> AffineMap:
    i, j, v = (np.concatenate(part) if part else np.zeros(0) for part in acc)
    matrix = sparse.csr_matrix((v, (i.astype(np.int64), j.astype(np.int64))), shape=(rows, cols))
    return matrix, bias


def _is_affine(run: Runner, maps: list[AffineMap], d_in: int) -> bool:
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = rng.standard_normal(d_in)
        for value, (matrix, b) in zip(run(x), maps, strict=True):
            predicted = matrix @ x + b
            norm = max(float(np.linalg.norm(value)), 1e-6 * np.sqrt(value.size))
            if float(np.linalg.norm(value - predicted)) > AFFINE_TOLERANCE * norm:
                return False
    return True
