"""Dense affine maps to the packed form of ``circuit.LinearNode``: diagonals and baby steps.

The matrix is padded to ``out_chunks * m`` by ``in_chunks * m`` and split into ``m x m``
blocks; block ``(o, c)`` keeps only its non-zero generalised diagonals
``d_k[t] = A[o m + t, c m + (t + k) % m]``, so a 3x3 convolution costs about nine products
per channel pair rather than ``m``. The baby-step size is the power of two that minimises
the node's rotations under ``circuit.node_cost`` (Halevi-Shoup BSGS, about ``2 sqrt(nd)``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import sparse

from he_inference.circuit import LinearBlock, LinearNode, node_cost

logger = logging.getLogger(__name__)


def diagonal_blocks(
    matrix: sparse.spmatrix | np.ndarray, period: int
) -> tuple[list[LinearBlock], int, int]:
    """The non-zero diagonals of every ``m x m`` block, with the output and input chunks."""
    coo = sparse.coo_matrix(matrix)
    rows, cols = coo.shape
    out_chunks, in_chunks = max(1, math.ceil(rows / period)), max(1, math.ceil(cols / period))
    keep = coo.data != 0
    r, c, v = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]
    oc, ic, t = r // period, c // period, r % period
    k = (c % period - t) % period

    blocks = []
    key = (oc * in_chunks + ic) * period + k
    order = np.argsort(key, kind="stable")
    key, oc, ic, t, k, v = key[order], oc[order], ic[order], t[order], k[order], v[order]
    block_id = oc * in_chunks + ic
    for bid in np.unique(block_id):
        sel = block_id == bid
        offsets, index = np.unique(k[sel], return_inverse=True)
        diagonals = np.zeros((offsets.size, period))
        diagonals[index, t[sel]] = v[sel]
        blocks.append(
            LinearBlock(
                int(bid // in_chunks), int(bid % in_chunks), offsets.astype(np.int64), diagonals
            )
        )
    return blocks, in_chunks, out_chunks


def choose_baby_steps(node: LinearNode, period: int) -> int:
    """The baby-step size (a power of two up to ``m``) with the fewest rotations."""
    distinct = {int(k) for block in node.blocks for k in block.offsets}
    target = math.sqrt(max(len(distinct), 1))
    best: tuple[int, float, int] | None = None
    n1 = 1
    while n1 <= period:
        node.baby_steps = n1
        rotations = node_cost(node).rotations
        candidate = (rotations, abs(math.log2(n1) - math.log2(target)), n1)
        if best is None or candidate < best:
            best = candidate
        n1 *= 2
    assert best is not None  # the loop runs at least once, period >= 1
    node.baby_steps = best[2]
    return best[2]


def linear_node(
    name: str,
    input_name: str,
    matrix: sparse.spmatrix | np.ndarray,
    bias: np.ndarray,
    period: int,
    *,
    duplicate: bool = True,
) -> LinearNode:
    """A ``LinearNode`` for ``y = matrix @ x + bias`` at period ``m``."""
    blocks, in_chunks, out_chunks = diagonal_blocks(matrix, period)
    padded = np.zeros(out_chunks * period)
    padded[: bias.size] = bias
    node = LinearNode(
        name=name,
        input=input_name,
        in_chunks=in_chunks,
        out_chunks=out_chunks,
        blocks=blocks,
        bias=padded.reshape(out_chunks, period) if np.any(bias) else None,
        baby_steps=1,
        duplicate=duplicate,
    )
    choose_baby_steps(node, period)
    logger.debug(
        "linear %s: %d blocks, %d diagonals, baby steps %d",
        name,
        len(blocks),
        sum(b.offsets.size for b in blocks),
        node.baby_steps,
    )
    return node
