"""Numerical checks that keep the fusion honest: run a piece of the graph with onnxruntime on random data.

`classify_glu` tells which GLU activation (and which gate/up layout) an expert activation subgraph computes,
by comparing its output with every candidate the op supports. `block_error` runs the original block and its
fused replacement side by side on random hidden states and returns the relative error; the fusion pass only
rewrites a block when it is within tolerance. Exported graphs vary (Gelu op vs erf formula, Split vs Slice,
clamps); judging by values instead of by node shapes makes the rule accept what is equal and refuse what is
not.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import helper

from moetrt.core.onnx_io import widen_to_fp32
from moetrt.core.tolerances import FUSION_CHECK_TOLERANCE, relative_error
from moetrt.op.reference import glu
from moetrt.passes.graph_utils import NoMatch, const_array

_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class GluForm:
    activation: str
    # halves | interleaved | tied (one input: gate and up are the same projection) | separate |
    # separate_swapped (gate, up inputs)
    layout: str
    alpha: float = 1.702
    limit: float = 7.0


def _probe(values: np.ndarray, dtype: ir.DataType | None) -> np.ndarray:
    """Probe data rounded to the model's precision, fed as float32 when the piece runs in its shadow."""
    if dtype is None:
        return values.astype(np.float32)
    rounded = values.astype(np.dtype(dtype.numpy()))
    return rounded.astype(np.float32) if dtype in _HALF else rounded


def subgraph_model(
    nodes: Iterable[ir.Node],
    inputs: Sequence[ir.Value],
    input_shapes: Sequence[Sequence[int]],
    outputs: Sequence[ir.Value],
    opset_imports: dict[str, int],
    functions: Sequence[onnx.FunctionProto] = (),
) -> onnx.ModelProto:
    """A standalone model of `nodes` (already topologically ordered) with the given boundary values."""
    node_list = list(nodes)
    # By name: the check may stand a copied node in for an original one (same output name).
    produced = {v.name for n in node_list for v in n.outputs}
    input_set = {v.name for v in inputs}
    initializers: dict[str, onnx.TensorProto] = {}
    for node in node_list:
        for value in node.inputs:
            if (
                value is None
                or value.name in produced
                or value.name in input_set
                or value.name in initializers
            ):
                continue
            if value.const_value is None:
                raise ValueError(f"subgraph reads '{value.name}', which is neither an input nor a constant")
            const = value.const_value
            if isinstance(const, ir.ExternalTensor):  # the check runs from bytes: carry the values inline
                const = ir.tensor(const.numpy())
            tensor = ir.serde.serialize_tensor(const)
            tensor.name = value.name  # type: ignore[assignment]
            initializers[value.name] = tensor  # type: ignore[index]
    graph = helper.make_graph(
        [ir.serde.serialize_node(n) for n in node_list],
        "check",
        [helper.make_tensor_value_info(v.name, int(v.dtype), list(s)) for v, s in zip(inputs, input_shapes)],  # type: ignore[arg-type]
        # Values made by the rewrite have no type yet: they share the dtype of the (first) input.
        [helper.make_tensor_value_info(v.name, int(v.dtype or inputs[0].dtype), None) for v in outputs],  # type: ignore[arg-type]
        list(initializers.values()),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in opset_imports.items()],
        functions=list(functions),
        ir_version=10,
    )
    # onnxruntime's CPU provider lacks bf16 kernels and rounds fp16 differently from the targets: the
    # checks ask whether two graphs compute the same function, so both run in float32 (exact for weights).
    return widen_to_fp32(model, "half", in_place=True)


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ----------------------------------------------------------------------------------------------- activation
def _float_scalar(array: np.ndarray | None) -> float | None:
    """A one-element floating constant as a Python float (bfloat16 arrays have numpy kind 'V')."""
    if array is None or array.size != 1:
        return None
    if array.dtype.kind != "f" and array.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return None
    return float(array.astype(np.float32).reshape(-1)[0])


def _candidates(consts: list[float]) -> list[tuple[str, float, float]]:
    positive = sorted({c for c in consts if c > 0} | {1.702, 7.0})
    out: list[tuple[str, float, float]] = [
        ("silu_glu", 1.702, 7.0),
        ("gelu_glu", 1.702, 7.0),
        ("gelu_tanh_glu", 1.702, 7.0),
    ]
    out += [("swiglu_clamped", a, lim) for a, lim in itertools.product(positive, positive)]
    return out


def classify_glu(
    nodes: set[ir.Node],
    inputs: list[ir.Value],
    output: ir.Value,
    widths: list[int],
    order: dict[ir.Node, int],
    opset_imports: dict[str, int],
) -> GluForm | None:
    """Which supported GLU `nodes` compute from `inputs` (gate_up, or gate and up) to `output`, or None."""
    dtype = inputs[0].dtype
    if dtype is None or len(inputs) not in (1, 2):
        return None
    rows = 64
    gen = torch.Generator().manual_seed(1234)
    # Wide spread so that clamps (GPT-OSS limit 7) are exercised on part of the probe.
    probes = [torch.randn(rows, w, generator=gen, dtype=torch.float64) * 4.0 for w in widths]
    # Activations of [T, k, 2I] blocks (einsum-style experts) get a probe of the same rank: [rows, 1, .., w].
    lead = [1] * max((len(inputs[0].shape) if inputs[0].shape is not None else 2) - 2, 0)
    feeds = {v.name: _probe(p.numpy(), dtype).reshape(rows, *lead, -1) for v, p in zip(inputs, probes)}
    model = subgraph_model(
        sorted(nodes, key=lambda n: order.get(n, 0)),
        inputs,
        [(rows, *lead, w) for w in widths],
        [output],
        opset_imports,
    )
    try:
        (got,) = run_model(model, feeds)  # type: ignore[arg-type]
    except Exception:
        return None
    if got.size % rows:
        return None
    got = got.reshape(rows, -1)
    probes = [torch.from_numpy(f.astype(np.float64).reshape(rows, -1)) for f in feeds.values()]
    if len(probes) == 1:
        x = probes[0]
        half = x.shape[1] // 2
        # "tied": gate and up read one table, so the exporter merged their projections into one.
        layouts = {
            "halves": (x[:, :half], x[:, half:]),
            "interleaved": (x[:, 0::2], x[:, 1::2]),
            "tied": (x, x),
        }
    else:
        layouts = {"separate": (probes[0], probes[1]), "separate_swapped": (probes[1], probes[0])}
    consts = [c for n in nodes for v in n.inputs if (c := _float_scalar(const_array(v))) is not None]
    consts += [
        c
        for n in nodes
        if n.op_type == "Constant"
        if (c := _float_scalar(const_array(n.outputs[0]))) is not None
    ]
    consts = [abs(c) for c in consts if math.isfinite(c)]
    best: tuple[float, GluForm] | None = None
    for layout, (gate, up) in layouts.items():
        if gate.shape != up.shape or tuple(got.shape) != tuple(gate.shape):
            continue
        for activation, alpha, limit in _candidates(consts):
            err = relative_error(got, glu(gate, up, activation, alpha, limit).numpy())
            if best is None or err < best[0]:
                best = (err, GluForm(activation, layout, alpha, limit))
    if best is None or best[0] > FUSION_CHECK_TOLERANCE:
        return None
    return best[1]


# ----------------------------------------------------------------------------------------------- whole block
def probe_shape(hidden: ir.Value, tokens: tuple[int, ...]) -> list[int]:
    """A concrete shape for the hidden states: static dims kept, symbolic ones from `tokens`."""
    assert hidden.shape is not None
    dims = list(hidden.shape)
    free = iter(tokens)
    return [d if isinstance(d, int) else next(free, 2) for d in dims]


def block_error(
    original_nodes: Sequence[ir.Node],
    fused_nodes: Sequence[ir.Node],
    hidden: ir.Value,
    pairs: Sequence[tuple[ir.Value, ir.Value]],
    opset_imports: dict[str, int],
    functions: Sequence[onnx.FunctionProto],
) -> float:
    """Largest relative error between original and fused outputs over a few random hidden states."""
    outputs = [v for pair in pairs for v in pair]
    worst = 0.0
    for seed, (tokens, scale) in enumerate((((3, 5), 1.0), ((2, 7), 3.0), ((1, 1), 1.0))):
        shape = probe_shape(hidden, tokens)
        model = subgraph_model(
            [*original_nodes, *fused_nodes], [hidden], [shape], outputs, opset_imports, functions
        )
        gen = torch.Generator().manual_seed(seed)
        data = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).numpy()
        try:
            results = run_model(model, {hidden.name: _probe(data, hidden.dtype)})
        except Exception as err:  # onnxruntime raises its own exception types
            raise NoMatch(
                f"onnxruntime could not run the block or its fused form: {str(err).splitlines()[0][:200]}"
            ) from None
        for i in range(0, len(results), 2):
            want, got = results[i], results[i + 1]
            if want.shape != got.shape:
                return math.inf
            if not np.isfinite(want.astype(np.float64)).all():
                raise NoMatch(
                    "the block gives non-finite values on random hidden states, so it cannot be checked"
                )
            err = relative_error(got, want)
            worst = err if not math.isfinite(err) else max(worst, err)
    return worst
