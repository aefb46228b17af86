"""Diagonal extraction and baby-step choice, checked against dense numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from compiler.packing import choose_baby_steps, diagonal_blocks, linear_node
from he_inference.circuit import LinearBlock, LinearNode, node_cost


def apply_diagonals(
    blocks: list[LinearBlock], out_chunks: int, period: int, x: np.ndarray, d_out: int
) -> np.ndarray:
    """``y[t] = sum_k d_k[t] * xdup[t + k]`` per block: the packed formula, in numpy."""
    m = period
    chunks = -(-x.size // m)
    padded = np.zeros(chunks * m)
    padded[: x.size] = x
    y = np.zeros((out_chunks, m))
    for block in blocks:
        v = padded[block.in_chunk * m : (block.in_chunk + 1) * m]
        duplicated = np.concatenate([v, v])
        for k, d in zip(block.offsets.tolist(), block.diagonals, strict=True):
            y[block.out_chunk] += d * duplicated[k : k + m]
    return y.reshape(-1)[:d_out]


@pytest.mark.parametrize(
    ("d_out", "d_in", "period"),
    [(5, 7, 8), (16, 16, 16), (40, 70, 32), (3, 100, 64), (100, 3, 64)],
)
def test_diagonals_reproduce_a_dense_matmul(d_out: int, d_in: int, period: int) -> None:
    rng = np.random.default_rng(d_out * d_in)
    a = rng.standard_normal((d_out, d_in)) * (rng.random((d_out, d_in)) < 0.5)
    x = rng.standard_normal(d_in)
    blocks, in_chunks, out_chunks = diagonal_blocks(sparse.csr_matrix(a), period)
    assert (in_chunks, out_chunks) == (-(-d_in // period), -(-d_out // period))
    np.testing.assert_allclose(
        apply_diagonals(blocks, out_chunks, period, x, d_out), a @ x, rtol=1e-12, atol=1e-12
    )


def test_only_non_zero_diagonals_are_stored() -> None:
    # A 1-D convolution with kernel 3 touches three diagonals of each block (plus wrap).
    m = 16
    a = np.zeros((m, m))
    for t in range(m - 2):
        a[t, t : t + 3] = [1.0, 2.0, 3.0]
    blocks, _, _ = diagonal_blocks(a, m)
    assert len(blocks) == 1
    assert blocks[0].offsets.tolist() == [0, 1, 2]
    assert np.all(blocks[0].diagonals[2, : m - 2] == 3.0)


def test_zero_matrix_has_no_blocks() -> None:
    blocks, _, _ = diagonal_blocks(np.zeros((4, 4)), 4)
    assert blocks == []


def _node(offsets: list[int], period: int) -> LinearNode:
    block = LinearBlock(0, 0, np.array(offsets, np.int64), np.ones((len(offsets), period)))
    return LinearNode("y", "x", 1, 1, [block], None, baby_steps=1)


def test_baby_steps_for_a_dense_block_are_near_its_square_root() -> None:
    node = _node(list(range(64)), 64)
    assert choose_baby_steps(node, 64) == 8
    assert node_cost(node).rotations == 7 + 7 + 1  # babies, giants, re-duplication


def test_baby_steps_minimise_rotations_for_sparse_offsets() -> None:
    node = _node([0, 1, 2, 32, 33, 34], 64)
    n1 = choose_baby_steps(node, 64)
    best = min(node_cost(_with(node, 2**i)).rotations for i in range(7))
    assert node_cost(_with(node, n1)).rotations == best == 3 + 1


def _with(node: LinearNode, n1: int) -> LinearNode:
    node.baby_steps = n1
    return node


def test_linear_node_pads_the_bias_and_drops_a_zero_one() -> None:
    node = linear_node("y", "x", np.eye(3), np.array([1.0, 0.0, 2.0]), 4)
    assert node.bias is not None and node.bias.tolist() == [[1.0, 0.0, 2.0, 0.0]]
    assert linear_node("y", "x", np.eye(3), np.zeros(3), 4).bias is None
