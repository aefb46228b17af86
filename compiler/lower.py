"""Lower the normalised graph to a circuit: affine segments, polynomials and products.

Every encrypted tensor has a *root*: the nearest tensor that is the data input or the output
of a non-linear node (activation or product). Linear nodes share their input's root, so the
linear nodes of one root form an affine segment, and each segment tensor that a non-linear
node (or the graph output) reads becomes one ``LinearNode`` from its root, measured as a
whole by ``affine.py``. Fusing the segment this way costs one level however many ONNX nodes
it spans. A segment output that is exactly the identity (a Flatten, say) aliases its root
and costs nothing.

Levels: a linear map consumes one, a polynomial ``chebyshev_depth(degree)`` (that is
``ceil(log2(d + 1))``) plus one when its interval is not ``[-1, 1]``, a product one, an
addition none. The interval's affine map is folded into the preceding linear map when
that map feeds only the activation, which saves the extra level. The other way round, a
segment that only scales and shifts a polynomial's output by scalars (the Neg of a Sub,
say) and is its only reader folds into the polynomial's coefficients instead of becoming
a linear node, which saves its level too.

A join of values from different roots is a ``BinaryNode`` add of two segment outputs of one
shape: ``rewrite_encrypted_joins`` first turns Sub, Concat, Sum, Mean and broadcasting Adds
of several roots into such Adds of linear maps (Neg, Pad, Expand in each operand's
segment), and ``expand_prelu`` a per-channel PRelu into a Relu, linear maps and one Add.
A linear map right after such an add is then composed into the operands' own maps
(:func:`_distribute_over_joins`), so a Concat or residual sum followed by a Conv or Gemm
costs one level, not two.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from scipy import sparse

from compiler.affine import AffineMap, measure_affine_maps
from compiler.graph import ImportedModel, describe, node_key, producers
from compiler.ops import activation_function, classify, root_tensors
from compiler.packing import linear_node
from he_inference import approx
from he_inference.circuit import (
    BinaryNode,
    Circuit,
    Layout,
    LinearNode,
    Node,
    PolynomialNode,
    linear_rotation_steps,
)
from he_inference.errors import ConfigurationError, UnsupportedModelError
from he_inference.params import select_parameters

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What lowering decided before parameters exist: roots, segments, ranges needed."""

    kinds: dict[str, str]
    roots: dict[str, str]
    materialised: list[str]  # linear tensors that become LinearNodes, in graph order
    activations: list[onnx.NodeProto] = field(default_factory=list)

    def range_tensors(self) -> list[str]:
        """The tensors whose calibrated range the polynomials need."""
        return [node.input[0] for node in self.activations]


def plan(imported: ImportedModel) -> Plan:
    """Classify every node and find the roots and the tensors each circuit node reads.

    Raises:
        UnsupportedModelError: a join mixes sources in a way no circuit node computes.
    """
    constants = imported.constants()
    encrypted = imported.encrypted()
    roots = root_tensors(imported.graph.node, imported.input_name, encrypted, constants)
    kinds: dict[str, str] = {}
    needed: list[str] = []
    activations = []
    for node in imported.graph.node:
        kind, reason = classify(node, encrypted, constants)
        inputs = [n for n in node.input if n in encrypted]
        if kind == "join":
            sources = {roots[n] for n in inputs}
            if len(sources) == 1:
                kind = "linear"
            elif node.op_type in ("Add", "Sum") and len(inputs) == 2:
                kind = "add"
            else:  # rewrite_encrypted_joins leaves none of these
                raise UnsupportedModelError(
                    f"{describe(node)} joins encrypted values from {len(sources)} different "
                    f"sources ({', '.join(sorted(sources))}): only an Add of two is supported"
                )
        if kind == "unsupported":
            raise UnsupportedModelError(f"{describe(node)}: {reason}")
        kinds[node_key(node)] = kind
        if kind != "linear":
            needed.extend(inputs[:1] if kind in ("activation", "square") else inputs)
        if kind == "activation":
            activations.append(node)
    needed.extend(imported.output_names)
    materialised = [t for t in dict.fromkeys(needed) if roots.get(t, t) != t]
    return Plan(kinds, roots, materialised, activations)


def lower(
    imported: ImportedModel,
    the_plan: Plan,
    ranges: dict[str, tuple[float, float]],
    *,
    name: str,
    degree: int | None,
    error_budget: float,
    max_degree: int,
    security_level: int,
    scale_bits: int | None,
    batch: int,
    input_range: tuple[float, float] | None,
    output_bound: float | None = None,
    backend: str = "seal",
) -> Circuit:
    """Build the circuit: measure the maps, fit the polynomials, assign levels and params.

    Raises:
        ConfigurationError: no polynomial meets the error budget.
        InsecureParametersError: no ring degree fits the depth at the security level.
        UnsupportedModelError: a segment is not affine or shapes do not match.
    """
    graph = imported.graph
    maps = _measure(imported, the_plan)
    made = producers(graph)
    output = imported.output_names[0]
    readers: dict[str, int] = {}
    for node in graph.node:
        if the_plan.kinds[node_key(node)] != "linear":
            for n in set(node.input):
                readers[n] = readers.get(n, 0) + 1

    per_root: dict[str, int] = {}
    for tensor in the_plan.materialised:
        per_root[the_plan.roots[tensor]] = per_root.get(the_plan.roots[tensor], 0) + 1

    value: dict[str, str] = {imported.input_name: imported.input_name}
    specs: list[dict[str, Any]] = []
    linear_specs: dict[str, dict[str, Any]] = {}
    polynomial_specs: dict[str, dict[str, Any]] = {}

    def emit_linear(tensor: str) -> None:
        matrix, bias = maps[tensor]
        root = the_plan.roots[tensor]
        if tensor != output and _is_identity(matrix, bias):
            value[tensor] = value[root]
            logger.debug("segment output %s is the identity of %s: aliased", tensor, root)
            return
        scalar = _scalar_affine(matrix, bias)
        polynomial = polynomial_specs.get(root)
        if (
            scalar is not None
            and polynomial is not None
            and tensor != output
            and root != output
            and per_root[root] == 1
            and not readers.get(root)
        ):
            _fold_into_polynomial(polynomial, *scalar)
            polynomial["sources"] = [*polynomial["sources"], *_segment_sources(tensor, root, made)]
            value[tensor] = value[root]
            logger.debug(
                "segment output %s = %g * %s %+g folded into the polynomial",
                tensor,
                scalar[0],
                root,
                scalar[1],
            )
            return
        node_name = tensor if tensor != imported.input_name else f"{tensor}:out"
        spec = {
            "kind": "linear",
            "name": node_name,
            "input": value[root],
            "matrix": matrix,
            "bias": bias,
            "sources": _segment_sources(tensor, root, made),
            "shape": imported.shapes[tensor],
        }
        specs.append(spec)
        linear_specs[tensor] = spec
        value[tensor] = node_name

    if output == imported.input_name:
        identity = sparse.identity(int(np.prod(imported.input_shape)), format="csr")
        maps[output] = (identity, np.zeros(identity.shape[0]))
        the_plan.roots[output] = output
        emit_linear(output)
    materialised = set(the_plan.materialised)
    for node in graph.node:
        kind = the_plan.kinds[node_key(node)]
        if kind == "linear":
            for out in node.output:
                if out in materialised:
                    emit_linear(out)
            continue
        source = [node.name or node.output[0]]
        shape = imported.shapes[node.input[0]]
        if kind == "activation":
            spec = _activation_spec(
                node,
                imported,
                ranges,
                linear_specs,
                readers,
                output,
                degree,
                error_budget,
                max_degree,
            )
            spec.update(input=value[node.input[0]], sources=source, shape=shape)
        else:
            left, right = (
                (node.input[0], node.input[0])
                if kind == "square"
                else (node.input[0], node.input[1])
            )
            if imported.shapes[left] != imported.shapes[right]:
                raise UnsupportedModelError(
                    f"{describe(node)} combines encrypted tensors of shapes "
                    f"{imported.shapes[left]} and {imported.shapes[right]}: broadcasting "
                    f"between two encrypted values is not supported"
                )
            spec = {
                "kind": "binary",
                "op": "add" if kind == "add" else "multiply",
                "left": value[left],
                "right": value[right],
                "sources": source,
                "shape": shape,
            }
        spec["name"] = node.output[0]
        specs.append(spec)
        value[node.output[0]] = node.output[0]
        if spec["kind"] == "polynomial":
            polynomial_specs[node.output[0]] = spec

    _distribute_over_joins(specs, value[output])
    return _assemble(
        imported,
        specs,
        value[output],
        name=name,
        batch=batch,
        security_level=security_level,
        scale_bits=scale_bits,
        input_range=input_range,
        output_bound=output_bound,
        backend=backend,
    )


def _measure(imported: ImportedModel, the_plan: Plan) -> dict[str, AffineMap]:
    made = producers(imported.graph)
    by_root: dict[str, list[str]] = {}
    for tensor in the_plan.materialised:
        by_root.setdefault(the_plan.roots[tensor], []).append(tensor)
    maps: dict[str, AffineMap] = {}
    for root, outputs in by_root.items():
        nodes = _segment_nodes(outputs, root, made)
        maps.update(measure_affine_maps(imported, root, nodes, outputs))
    logger.info("lower: %d affine segments measured into %d linear maps", len(by_root), len(maps))
    return maps


def _segment_nodes(
    outputs: list[str], root: str, made: dict[str, onnx.NodeProto]
) -> list[onnx.NodeProto]:
    """The nodes between ``root`` and ``outputs``, in graph order."""
    seen: set[str] = set()
    stack = [made[o] for o in outputs if o in made]
    while stack:
        node = stack.pop()
        if node_key(node) in seen:
            continue
        seen.add(node_key(node))
        stack.extend(made[n] for n in node.input if n and n != root and n in made)
    ordered: dict[str, onnx.NodeProto] = {}
    for node in made.values():  # producers() keeps graph order
        if node_key(node) in seen:
            ordered.setdefault(node_key(node), node)
    return list(ordered.values())


def _segment_sources(tensor: str, root: str, made: dict[str, onnx.NodeProto]) -> list[str]:
    return [n.name or n.output[0] for n in _segment_nodes([tensor], root, made)]


def _is_identity(matrix: sparse.csr_matrix, bias: np.ndarray) -> bool:
    if matrix.shape[0] != matrix.shape[1] or np.any(bias) or matrix.nnz != matrix.shape[0]:
        return False
    coo = matrix.tocoo()
    return bool(np.all(coo.row == coo.col) and np.all(coo.data == 1.0))


def _distribute_over_joins(specs: list[dict[str, Any]], output: str) -> None:
    """Move a linear map after an encrypted addition into the addition's linear branches.

    ``M (L1 a + L2 b) = (M L1) a + (M L2) b``: the map after a join (a Concat of two
    branches followed by a Conv, or a residual sum followed by BatchNormalization and a
    Gemm) composes with each branch's own map, so the join costs one level instead of two,
    and two maps run instead of three. A branch without its own map gets ``M`` alone.
    Applied only where each value involved has that one reader, and where every row of
    each composed map keeps a weight (the evaluator cannot make an all-zero ciphertext).
    Repeats until nothing changes, so chains of joins collapse too.
    """
    changed = True
    while changed:
        changed = False
        readers: dict[str, int] = {output: 1}
        for spec in specs:
            for name in _spec_inputs(spec):
                readers[name] = readers.get(name, 0) + 1
        by_name = {spec["name"]: spec for spec in specs}
        for after in specs:
            join = by_name.get(after.get("input", ""))
            if (
                after["kind"] != "linear"
                or join is None
                or join["kind"] != "binary"
                or join["op"] != "add"
                or join["name"] == output
                or readers.get(join["name"]) != 1
                or join["left"] == join["right"]
            ):
                continue
            branches = [by_name.get(join["left"]), by_name.get(join["right"])]
            linear = [
                b is not None
                and b["kind"] == "linear"
                and b["name"] != output
                and readers.get(b["name"]) == 1
                for b in branches
            ]
            if not any(linear):
                continue
            composed: list[tuple[Any, np.ndarray, str, dict[str, Any] | None]] = []
            for index, (branch, is_linear) in enumerate(zip(branches, linear, strict=True)):
                source = join["left"] if index == 0 else join["right"]
                if is_linear:
                    assert branch is not None
                    matrix = (after["matrix"] @ branch["matrix"]).tocsr()
                    bias = after["matrix"] @ branch["bias"]
                    composed.append((matrix, bias, branch["input"], branch))
                else:
                    composed.append(
                        (after["matrix"], np.zeros(after["matrix"].shape[0]), source, None)
                    )
            if any(np.any(np.diff(m.indptr) == 0) for m, _, _, _ in composed):
                continue
            composed[0] = (composed[0][0], composed[0][1] + after["bias"], *composed[0][2:])
            names = []
            for index, (matrix, bias, source, branch) in enumerate(composed):
                if branch is None:
                    branch = {
                        "kind": "linear",
                        "name": f"{after['name']}:{index}",
                        "input": source,
                        "sources": [],
                    }
                    specs.insert(specs.index(join), branch)
                branch.update(
                    matrix=matrix,
                    bias=bias,
                    shape=after["shape"],
                    sources=[*branch["sources"], *after["sources"]],
                )
                names.append(branch["name"])
            specs.remove(join)
            join.update(
                name=after["name"],
                left=names[0],
                right=names[1],
                shape=after["shape"],
                sources=[*join["sources"], *after["sources"]],
            )
            specs[specs.index(after)] = join
            logger.debug("linear map %s moved into the branches of its join", after["name"])
            changed = True
            break


def _spec_inputs(spec: dict[str, Any]) -> list[str]:
    return [spec["left"], spec["right"]] if spec["kind"] == "binary" else [spec["input"]]


def _scalar_affine(matrix: sparse.csr_matrix, bias: np.ndarray) -> tuple[float, float] | None:
    """``(c, d)`` when the map is ``y = c * x + d`` in every element, else ``None``."""
    n = matrix.shape[0]
    if matrix.shape != (n, n) or matrix.nnz != n or bias.size != n:
        return None
    coo = matrix.tocoo()
    c, d = float(coo.data[0]), float(bias[0])
    if not (np.all(coo.row == coo.col) and np.all(coo.data == c) and np.all(bias == d)):
        return None
    return c, d


def _fold_into_polynomial(spec: dict[str, Any], c: float, d: float) -> None:
    """Make a polynomial spec compute ``c * p(x) + d``: exact in the Chebyshev basis, free."""
    coefficients = np.array(spec["coefficients"], dtype=np.float64) * c
    coefficients[0] += d
    spec["coefficients"] = coefficients
    spec["max_error"] = abs(c) * spec["max_error"]
    spec["function"] = f"{c:g}*{spec['function']}" + (f"{d:+g}" if d else "")


def _activation_spec(
    node: onnx.NodeProto,
    imported: ImportedModel,
    ranges: dict[str, tuple[float, float]],
    linear_specs: dict[str, dict[str, Any]],
    readers: dict[str, int],
    output: str,
    degree: int | None,
    error_budget: float,
    max_degree: int,
) -> dict[str, Any]:
    fn, label = activation_function(node, imported.constants())
    lo, hi = ranges[node.input[0]]
    try:
        if degree is not None:
            fit = approx.fit(fn, lo, hi, degree)
        else:
            peak = float(np.max(np.abs(fn(np.linspace(lo, hi, 4097))))) or 1.0
            try:
                fit = approx.fit_within(fn, lo, hi, error_budget * peak, max_degree)
            except ConfigurationError:
                # Kinks (ReLU, Clip) converge like 1/degree: the best fit within the
                # degree cap is more useful than a refusal, and the manifest shows its error.
                fit = approx.fit(fn, lo, hi, max_degree)
                logger.warning(
                    "activation %s: no degree <= %d meets the error budget %.3g "
                    "(--error-budget %g of its peak %.3g) on [%.4g, %.4g]; using degree %d "
                    "with max error %.3g (to silence this, pass a larger --error-budget, or "
                    "--degree D for a fixed degree; error_budget= or max_degree= in "
                    "compile_model)",
                    describe(node),
                    max_degree,
                    error_budget * peak,
                    error_budget,
                    peak,
                    lo,
                    hi,
                    max_degree,
                    fit.max_error,
                )
    except ConfigurationError as exc:
        raise ConfigurationError(f"activation {describe(node)}: {exc}") from exc

    # Folding the map to [-1, 1] into the previous linear node saves one level; it is
    # exact because the Chebyshev coefficients on [lo, hi] are those of the composed map.
    producer = linear_specs.get(node.input[0])
    lower, upper = fit.lower, fit.upper
    if producer is not None and readers.get(node.input[0]) == 1 and node.input[0] != output:
        width = hi - lo
        producer["matrix"] = producer["matrix"] * (2.0 / width)
        producer["bias"] = (2.0 * producer["bias"] - (lo + hi)) / width
        lower, upper = -1.0, 1.0
    logger.debug(
        "activation %s on [%.4g, %.4g]: degree %d, max error %.3g",
        label,
        lo,
        hi,
        fit.degree,
        fit.max_error,
    )
    return {
        "kind": "polynomial",
        "coefficients": fit.coefficients,
        "lower": lower,
        "upper": upper,
        "function": label,
        "max_error": fit.max_error,
        "range": (float(lo), float(hi)),
    }


def _assemble(
    imported: ImportedModel,
    specs: list[dict[str, Any]],
    output: str,
    *,
    name: str,
    batch: int,
    security_level: int,
    scale_bits: int | None,
    input_range: tuple[float, float] | None,
    output_bound: float | None,
    backend: str,
) -> Circuit:
    # Levels, in graph order (specs are topologically sorted).
    level = {imported.input_name: 0}
    for spec in specs:
        if spec["kind"] == "linear":
            spec["level_in"] = level[spec["input"]]
            spec["level_out"] = spec["level_in"] + 1
        elif spec["kind"] == "polynomial":
            spec["level_in"] = level[spec["input"]]
            extra = 0 if (spec["lower"], spec["upper"]) == (-1.0, 1.0) else 1
            degree = len(spec["coefficients"]) - 1
            spec["level_out"] = spec["level_in"] + approx.chebyshev_depth(degree) + extra
        else:
            spec["level_in"] = max(level[spec["left"]], level[spec["right"]])
            spec["level_out"] = spec["level_in"] + (spec["op"] == "multiply")
        level[spec["name"]] = spec["level_out"]
    depth = max(level.values())

    sizes = [int(np.prod(imported.input_shape))] + [int(np.prod(s["shape"])) for s in specs]
    empty = [s["name"] for s in specs if int(np.prod(s["shape"])) == 0]
    if empty:
        raise UnsupportedModelError(f"tensors {empty} are empty: nothing to encrypt")
    # The first prime holds the result at the last level: |y| * scale must stay below half
    # of it. Sizing it from the calibrated output (with a factor 4 to spare) instead of a
    # fixed 20 bits is what lets a depth-5 circuit fit N=8192, whose keys are 10x smaller.
    integer_bits = 20
    if output_bound is not None:
        integer_bits = min(30, max(8, math.ceil(math.log2(max(output_bound, 1.0))) + 3))
    # The period: one power of two covering the largest value, capped at what the smallest
    # ring that fits the depth holds (2m slots per query). A larger value spans several
    # ciphertexts instead of forcing a larger ring: keys grow with the ring (about 4x per
    # doubling, with the longer chain), while extra chunks add only block products.
    smallest = select_parameters(
        depth,
        2 * batch,
        scale_bits=scale_bits,
        integer_bits=integer_bits,
        security_level=security_level,
        backend=backend,
    )
    cap = smallest.slots // 2 // batch
    if cap < 1:
        raise ConfigurationError(f"batch {batch} does not fit one ciphertext: lower it")
    period = min(1 << max(0, math.ceil(math.log2(max(sizes)))), cap)
    params = select_parameters(
        depth,
        2 * period * batch,
        scale_bits=scale_bits,
        integer_bits=integer_bits,
        security_level=security_level,
        backend=backend,
    )

    # A linear node re-duplicates its output only if a later linear node reads it.
    reads_linear: set[str] = set()
    for spec in reversed(specs):
        if spec["kind"] == "linear" or spec["name"] in reads_linear:
            reads_linear.update(
                [spec["input"]] if "input" in spec else [spec["left"], spec["right"]]
            )
    nodes: list[Node] = []
    for spec in specs:
        common = {
            "name": spec["name"],
            "sources": spec["sources"],
            "level_in": spec["level_in"],
            "level_out": spec["level_out"],
        }
        if spec["kind"] == "linear":
            node = linear_node(
                spec["name"],
                spec["input"],
                spec["matrix"],
                spec["bias"],
                period,
                duplicate=spec["name"] in reads_linear,
            )
            node.sources, node.level_in, node.level_out = (
                common["sources"],
                common["level_in"],
                common["level_out"],
            )
            if len({b.out_chunk for b in node.blocks}) < node.out_chunks:
                raise UnsupportedModelError(
                    f"a whole ciphertext of {spec['name']!r} ({period} elements) does not "
                    f"depend on the input: the evaluator needs at least one weight per chunk; "
                    f"remove the constant part from the model"
                )
            nodes.append(node)
        elif spec["kind"] == "polynomial":
            nodes.append(
                PolynomialNode(
                    input=spec["input"],
                    coefficients=spec["coefficients"],
                    lower=spec["lower"],
                    upper=spec["upper"],
                    function=spec["function"],
                    max_error=spec["max_error"],
                    fitted_range=spec["range"],
                    **common,
                )
            )
        else:
            nodes.append(
                BinaryNode(left=spec["left"], right=spec["right"], op=spec["op"], **common)
            )

    steps: set[int] = set()
    for built in nodes:
        if isinstance(built, LinearNode):
            steps |= linear_rotation_steps(built, period)
    out_shape = tuple(next(s["shape"] for s in specs if s["name"] == output))
    size_out = int(np.prod(out_shape))
    circuit = Circuit(
        name=name,
        params=params,
        input_name=imported.input_name,
        input_layout=Layout(
            imported.input_shape,
            period,
            math.ceil(int(np.prod(imported.input_shape)) / period),
            batch,
        ),
        output_name=output,
        output_layout=Layout(out_shape, period, math.ceil(size_out / period), batch),
        nodes=nodes,
        rotation_steps=tuple(sorted(steps)),
        postprocess=imported.postprocess,
        input_range=input_range,
        metadata={
            "source_sha256": imported.sha256,
            "opset": imported.opset,
            "producer": imported.producer,
            "backend": backend,
        },
    )
    logger.info(
        "lower: %d nodes, depth %d, period %d, N=%d, %d rotation steps",
        len(nodes),
        depth,
        period,
        params.poly_modulus_degree,
        len(steps),
    )
    return circuit
