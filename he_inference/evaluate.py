"""Runs a circuit on a backend, timing every node.

The evaluator owns the schedule of each node kind, so the levels it consumes are the ones
the compiler accounted for:

- linear: baby-step rotations of each input chunk (hoisted where the backend can), one
  plaintext product per non-zero diagonal, the products of one giant step summed before
  their giant rotation, one rescale per output chunk, the bias, and one rotation by ``-m``
  plus one addition to restore the ``[x, x]`` duplicate (see ``circuit.py``): one level;
- polynomial: ``approx.chebyshev_series``, ``ceil(log2(d + 1))`` levels, plus one when the
  interval was not folded into the previous linear map;
- binary: level alignment, then add (no level) or multiply, relinearise, rescale (one).

Plaintexts (diagonals pre-rotated for their giant step, biases, coefficients) are encoded
once per node and level and cached, so repeated queries pay only ciphertext work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from he_inference.approx import chebyshev_series
from he_inference.backends.base import Backend, Ciphertext, Plaintext
from he_inference.circuit import (
    BinaryNode,
    Circuit,
    LinearNode,
    Node,
    PolynomialNode,
    linear_rotation_points,
    linear_schedule,
)
from he_inference.errors import CircuitError

logger = logging.getLogger(__name__)


@dataclass
class NodeTiming:
    """How long one circuit node took, with the ONNX nodes it came from."""

    name: str
    kind: str
    sources: list[str]
    level_in: int
    level_out: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


class Evaluator:
    """Evaluates one circuit on one backend context holding evaluation keys."""

    def __init__(self, circuit: Circuit, backend: Backend) -> None:
        if backend.params != circuit.params:
            raise CircuitError(
                f"backend parameters {backend.params.fingerprint()} differ from the circuit's "
                f"{circuit.params.fingerprint()}: make the backend from circuit.params"
            )
        self.circuit = circuit
        self.backend = backend
        self.slots = circuit.params.slots
        self.period = circuit.input_layout.period
        self.batch = circuit.input_layout.batch
        self._cache: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self._last_use = self._last_uses(circuit.nodes)

    # -- public -----------------------------------------------------------------------

    def run(
        self,
        inputs: Sequence[Ciphertext],
        on_node: Callable[[Node, list[Ciphertext], NodeTiming], None] | None = None,
    ) -> tuple[list[Ciphertext], list[NodeTiming]]:
        """Evaluate on the input chunks; returns the output chunks and per-node timings.

        Args:
            inputs: the input value's ciphertexts, one per chunk of the input layout.
            on_node: called after each node with the node, its output ciphertexts and its
                timing, outside the timed span (the benchmark decrypts intermediate values
                with it, holding the secret key itself); ``None`` on the server.

        Raises:
            CircuitError: the number of input ciphertexts does not match the layout.
        """
        if len(inputs) != self.circuit.input_layout.chunks:
            raise CircuitError(
                f"the circuit takes {self.circuit.input_layout.chunks} input ciphertexts and "
                f"{len(inputs)} were given"
            )
        values: dict[str, list[Ciphertext]] = {self.circuit.input_name: list(inputs)}
        timings = []
        for index, node in enumerate(self.circuit.nodes):
            start = time.perf_counter()
            values[node.name] = self._run_node(index, node, values)
            seconds = time.perf_counter() - start
            timing = NodeTiming(
                node.name, node.kind, node.sources, node.level_in, node.level_out, seconds
            )
            timings.append(timing)
            logger.debug("node %s (%s) took %.4f s", node.name, node.kind, seconds)
            if on_node is not None:
                on_node(node, values[node.name], timing)
            for name in node.inputs:
                if self._last_use.get(name) == index and name != self.circuit.output_name:
                    values.pop(name, None)
        return values[self.circuit.output_name], timings

    # -- node kinds ---------------------------------------------------------------------

    def _run_node(self, index: int, node: Node, values: dict[str, list[Ciphertext]]) -> list[Any]:
        if isinstance(node, LinearNode):
            return self._linear(index, node, values[node.input])
        if isinstance(node, PolynomialNode):
            return [self._polynomial(index, node, ct) for ct in values[node.input]]
        left, right = values[node.left], values[node.right]
        if len(left) != len(right):
            raise CircuitError(
                f"node {node.name}: operands span {len(left)} and {len(right)} ciphertexts"
            )
        return [self._binary(node, a, b) for a, b in zip(left, right, strict=True)]

    def _linear(self, index: int, node: LinearNode, chunks: list[Ciphertext]) -> list[Any]:
        be = self.backend
        level = max(be.level(ct) for ct in chunks)
        chunks = [self._at_level(ct, level) for ct in chunks]
        plan = self._linear_plaintexts(index, node, level)

        rotated = {
            j: self._baby_rotations(chunks[j], steps) for j, steps in plan["babies"].items()
        }

        outputs = []
        for out_chunk in range(node.out_chunks):
            giants = plan["giants"].get(out_chunk, {})
            if not any(giants.values()):
                # No weight reaches this chunk (padding, or a bias-only slice): a product
                # with zero gives an encryption of zero at the right level and scale.
                giants = {0: [(0, 0, be.encode(0.0, level))]}
            # Horner's rule over the giant steps, highest first: each rotation is by the gap
            # to the next giant step, so only the gaps need Galois keys.
            total = None
            previous = None
            for giant in sorted(giants, reverse=True):
                inner = None
                for in_chunk, baby, plaintext in giants[giant]:
                    source = chunks[in_chunk] if baby == 0 else rotated[in_chunk][baby]
                    product = be.multiply_plain(source, plaintext)
                    inner = product if inner is None else be.add(inner, product)
                if total is not None:
                    total = be.rotate(total, previous - giant)
                    total = total if inner is None else be.add(total, inner)
                else:
                    total = inner
                previous = giant
            if previous:
                total = be.rotate(total, previous)
            result = be.rescale(total)
            bias = plan["bias"][out_chunk]
            if bias is not None:
                result = be.add_plain(result, bias)
            if node.duplicate:
                result = be.add(result, be.rotate(result, -self.period))
            outputs.append(result)
        return outputs

    def _baby_rotations(self, ct: Ciphertext, steps: list[int]) -> dict[int, Ciphertext]:
        """``rot(ct, b)`` for each baby step: hoisted when every step has a key, else chained.

        Chaining reaches each step from the previous one, so it needs keys only for the gaps
        (see ``circuit.linear_rotation_steps``) and costs the same number of rotations.
        """
        be = self.backend
        available = set(be.rotation_steps)
        if be.supports_hoisting and all(be.normalise_step(s) in available for s in steps):
            return be.rotate_many(ct, steps)
        out: dict[int, Ciphertext] = {}
        current, position = ct, 0
        for step in steps:
            current = be.rotate(current, step - position)
            out[step] = current
            position = step
        return out

    def _polynomial(self, index: int, node: PolynomialNode, x: Ciphertext) -> Ciphertext:
        be = self.backend
        scale_bits = self.circuit.params.scale_bits
        if (node.lower, node.upper) != (-1.0, 1.0):
            # Map [lower, upper] to [-1, 1]: one plaintext product, so one level.
            alpha = 2.0 / (node.upper - node.lower)
            beta = -(node.upper + node.lower) / (node.upper - node.lower)
            level = be.level(x)
            x = be.rescale(be.multiply_plain(x, be.encode(alpha, level)))
            x = be.add_plain(x, be.encode(beta, level + 1))

        result = chebyshev_series(node.coefficients, x, _BackendSeries(self), scale_bits)
        if isinstance(result, float):
            # Nothing but a constant survives encoding: a fresh encryption of it would need
            # the public key, so scale the input by zero instead.
            zero = be.rescale(be.multiply_plain(x, be.encode(0.0, be.level(x))))
            return be.add_plain(zero, be.encode(result, be.level(zero)))
        return result

    def _binary(self, node: BinaryNode, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        be = self.backend
        a, b = self._aligned(a, b)
        if node.op == "add":
            return be.add(a, b)
        if node.op == "multiply":
            return be.rescale(be.multiply(a, b))
        raise CircuitError(f"unknown binary op {node.op!r} in node {node.name}")

    # -- helpers ----------------------------------------------------------------------

    def _at_level(self, ct: Ciphertext, level: int) -> Ciphertext:
        return ct if self.backend.level(ct) == level else self.backend.drop_to_level(ct, level)

    def _aligned(self, a: Ciphertext, b: Ciphertext) -> tuple[Ciphertext, Ciphertext]:
        level = max(self.backend.level(a), self.backend.level(b))
        return self._at_level(a, level), self._at_level(b, level)

    def _tile(self, block_values: np.ndarray) -> np.ndarray:
        """An m-vector placed in the first half of every used 2m block, zeros elsewhere."""
        full = np.zeros(self.slots)
        m = self.period
        for q in range(self.batch):
            full[2 * m * q : 2 * m * q + m] = block_values
        return full

    def _linear_plaintexts(self, index: int, node: LinearNode, level: int) -> dict[str, Any]:
        key = (index, level)
        cached = self._cache.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        with self._lock:
            if key in self._cache:
                return self._cache[key]  # type: ignore[no-any-return]
            be = self.backend
            threshold = 2.0 ** -(self.circuit.params.scale_bits - 1)
            giants: dict[int, dict[int, list[tuple[int, int, Plaintext]]]] = {}
            n1 = node.baby_steps
            for giant, entries in sorted(linear_schedule(node).items()):
                for b_index, d_index in entries:
                    block = node.blocks[b_index]
                    diagonal = block.diagonals[d_index]
                    if np.max(np.abs(diagonal)) < threshold:
                        continue  # encodes to zero: the product would be transparent
                    baby = int(block.offsets[d_index]) % n1
                    # rot(d, -g) so that the giant rotation applied after the sum lines up.
                    vector = np.roll(self._tile(diagonal), giant)
                    plaintext = be.encode(vector, level)
                    giants.setdefault(block.out_chunk, {}).setdefault(giant, []).append(
                        (block.in_chunk, baby, plaintext)
                    )
            bias: list[Plaintext | None] = [None] * node.out_chunks
            if node.bias is not None:
                for i in range(node.out_chunks):
                    if np.any(node.bias[i]):
                        bias[i] = be.encode(self._tile(node.bias[i]), level + 1)
            # Every baby and giant step is walked, also those whose diagonals all encoded to
            # zero, so the gaps match the Galois keys the compiler listed.
            babies, all_giants = linear_rotation_points(node)
            for out_chunk, points in all_giants.items():
                for giant in points:
                    giants.setdefault(out_chunk, {}).setdefault(giant, [])
            plan = {"giants": giants, "babies": babies, "bias": bias}
            self._cache[key] = plan
            return plan

    @staticmethod
    def _last_uses(nodes: list[Node]) -> dict[str, int]:
        last: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for name in node.inputs:
                last[name] = index
        return last


def encrypt_input(circuit: Circuit, backend: Backend, x: np.ndarray) -> list[Ciphertext]:
    """Pack queries per the circuit's input layout and encrypt each chunk."""
    vectors = circuit.input_layout.pack(x, circuit.params.slots)
    return [backend.encrypt(v) for v in vectors]


def decrypt_output(circuit: Circuit, backend: Backend, cts: Sequence[Ciphertext]) -> np.ndarray:
    """Decrypt result chunks and unpack them to ``[batch, *shape]`` per the output layout."""
    vectors = np.stack([backend.decrypt(ct) for ct in cts])
    return circuit.output_layout.unpack(vectors, circuit.params.slots)


def evaluate(
    circuit: Circuit, backend: Backend, inputs: Sequence[Ciphertext]
) -> tuple[list[Ciphertext], list[NodeTiming]]:
    """One-shot evaluation (build an :class:`Evaluator` to reuse its plaintext cache)."""
    return Evaluator(circuit, backend).run(inputs)


def run_local(circuit: Circuit, x: np.ndarray, backend_name: str = "plain") -> np.ndarray:
    """Keygen, encrypt, evaluate and decrypt in one process: for checking a compile."""
    from he_inference.backends import make_backend

    backend = make_backend(backend_name, circuit.params)
    backend.generate_keys(circuit.rotation_steps)
    outputs, _ = evaluate(circuit, backend, encrypt_input(circuit, backend, x))
    return decrypt_output(circuit, backend, outputs)


def run_plain(circuit: Circuit, x: np.ndarray) -> np.ndarray:
    """The circuit on the exact plain backend: the compiler's tests compare this."""
    return run_local(circuit, x, "plain")


class _BackendSeries:
    """The series schedule's arithmetic on a backend, aligning levels where it must."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.be = evaluator.backend

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        left, right = self.evaluator._aligned(a, b)
        return self.be.rescale(self.be.multiply(left, right))

    def scale(self, a: Ciphertext, c: float) -> Ciphertext:
        return self.be.rescale(self.be.multiply_plain(a, self.be.encode(c, self.be.level(a))))

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        return self.be.add(*self.evaluator._aligned(a, b))

    def add_constant(self, a: Ciphertext, c: float) -> Ciphertext:
        return self.be.add_plain(a, self.be.encode(c, self.be.level(a)))
