"""Pass `pack_weights`: store every fused MoE weight once, as one initializer in the canonical layout.

The fusion pass feeds the fused node through standard layout ops (Transpose, Slice with step 2 for
interleaved gate/up, Concat of separate gate and up, Reshape). This pass folds each such chain of constants
into a single contiguous initializer named `<node>.<input>` in the layout of spec.py (the layout the kernels
and the plugin read: [E, 2I, H] gate rows then up rows, [E, H, I], ...), shares one initializer between
nodes whose chains are identical, and drops the original initializers nothing reads any more, so each weight
is stored exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from moetrt.op.spec import DOMAIN, OP_TYPE, MoEAttributes
from moetrt.passes.base import CountedPass, CountedPassResult
from moetrt.passes.graph_utils import attr_int, const_array, unique_initializer_name

_LAYOUT_OPS = frozenset(
    {"Transpose", "Slice", "Concat", "Reshape", "Constant", "Unsqueeze", "Squeeze", "Cast"}
)


def _key(value: ir.Value) -> tuple | None:
    """A structural key of a constant layout chain (None when `value` is not one)."""
    node = value.producer()
    if node is None:
        return ("init", value.name) if value.const_value is not None else None
    if node.domain != "" or node.op_type not in _LAYOUT_OPS:
        return None
    if node.op_type == "Constant":
        array = const_array(value)
        return None if array is None else ("const", array.dtype.str, array.shape, array.tobytes())
    children = tuple(_key(v) for v in node.inputs if v is not None)
    if any(c is None for c in children):
        return None
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    return (node.op_type, attrs, children)


@dataclass(frozen=True)
class _Step:
    """One layout op of a constant chain, detached from the graph (the pass removes the chain's nodes before
    the packed weight is computed at save time): the op, its attributes, and its inputs' steps or tensors."""

    op: str
    attrs: dict[str, Any]
    inputs: tuple[_Step | ir.TensorProtocol, ...]


def _plan(value: ir.Value) -> _Step | ir.TensorProtocol:
    node = value.producer()
    if node is None or node.op_type == "Constant":
        tensor = ir.convenience.get_const_tensor(value)
        assert tensor is not None
        return tensor
    attrs = {k: a.value for k, a in node.attributes.items()}
    return _Step(node.op_type, attrs, tuple(_plan(v) for v in node.inputs if v is not None))


def _evaluate(step: _Step | ir.TensorProtocol) -> np.ndarray:
    if not isinstance(step, _Step):
        return step.numpy()
    args = [_evaluate(v) for v in step.inputs]
    op = step.op
    if op == "Transpose":
        perm = step.attrs.get("perm")
        return np.transpose(args[0], None if perm is None else list(perm))
    if op == "Slice":
        data, starts, ends = args[0], args[1], args[2]
        axes = args[3] if len(args) > 3 else np.arange(len(starts))
        steps = args[4] if len(args) > 4 else np.ones(len(starts), dtype=np.int64)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[int(a)] = slice(int(s), int(min(e, np.iinfo(np.int64).max)), int(st))
        return data[tuple(index)]
    if op == "Concat":
        return np.concatenate(args, axis=int(step.attrs.get("axis", 0)))
    if op == "Reshape":
        return args[0].reshape([int(d) for d in args[1]])
    if op == "Cast":
        return args[0].astype(ir.DataType(int(step.attrs["to"])).numpy())
    if op == "Unsqueeze":
        return np.expand_dims(args[0], tuple(int(a) for a in args[1]))
    return np.squeeze(args[0], tuple(int(a) for a in args[1]))  # Squeeze


def _packer(value: ir.Value, name: str) -> Callable[[], ir.TensorProtocol]:
    plan = _plan(value)
    return lambda: ir.tensor(np.ascontiguousarray(_evaluate(plan)), name=name)


def _meta(value: ir.Value) -> tuple[tuple[int, ...], ir.DataType]:
    """Shape and dtype of a constant layout chain, without evaluating it."""
    node = value.producer()
    if node is None or node.op_type == "Constant":
        tensor = ir.convenience.get_const_tensor(value)
        assert tensor is not None
        return tuple(int(d) for d in tensor.shape), tensor.dtype
    inputs = [v for v in node.inputs if v is not None]
    shape, dtype = _meta(inputs[0])
    op = node.op_type
    if op == "Transpose":
        perm = node.attributes.get("perm")
        order = list(perm.value) if perm is not None else list(range(len(shape)))[::-1]
        return tuple(shape[p] for p in order), dtype
    if op == "Slice":
        args = [const_array(v) for v in inputs[1:]]
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 else np.arange(len(starts))
        steps = args[3] if len(args) > 3 else np.ones(len(starts), dtype=np.int64)
        dims = list(shape)
        for s_, e, a, st in zip(starts, ends, axes, steps):
            dims[int(a)] = len(
                range(*slice(int(s_), int(min(e, np.iinfo(np.int64).max)), int(st)).indices(dims[int(a)]))
            )
        return tuple(dims), dtype
    if op == "Concat":
        axis = attr_int(node, "axis", 0)
        parts = [_meta(v)[0] for v in inputs]
        dims = list(parts[0])
        dims[axis % len(dims)] = sum(p[axis % len(dims)] for p in parts)
        return tuple(dims), dtype
    if op == "Reshape":
        target = [int(d) for d in const_array(inputs[1])]  # type: ignore[union-attr]
        dims = [shape[k] if d == 0 else d for k, d in enumerate(target)]  # 0 copies the input dim
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
            dims[dims.index(-1)] = int(np.prod(shape, dtype=np.int64)) // max(known, 1)
        return tuple(dims), dtype
    if op == "Cast":
        return shape, ir.DataType(attr_int(node, "to", 0))
    axes = sorted(int(a) for a in const_array(inputs[1]))  # type: ignore[union-attr]
    if op == "Unsqueeze":
        dims = list(shape)
        for a in axes:
            dims.insert(a % (len(dims) + 1), 1)
        return tuple(dims), dtype
    return tuple(d for i, d in enumerate(shape) if i not in {a % len(shape) for a in axes}), dtype  # Squeeze


class PackMoEWeightsPass(CountedPass):
    name = "pack_weights"

    def call(self, model: ir.Model) -> CountedPassResult:
        graph = model.graph
        packed: dict[tuple, ir.Value] = {}
        count = 0
        for node in list(graph):
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            attrs = MoEAttributes.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
            for index, input_name in enumerate(attrs.present_inputs()):
                value = node.inputs[index]
                if index == 0 or value is None or value.producer() is None:
                    continue
                key = _key(value)
                if key is None:
                    continue
                if key not in packed:
                    name = unique_initializer_name(
                        graph, f"{node.name or 'moe'}.{input_name}".replace("/MoE.", ".")
                    )
                    shape, dtype = _meta(value)
                    # Evaluated when the model is saved (or read), one weight at a time: packing a model
                    # never holds more than the weight being written, whatever the model's size.
                    tensor = ir.LazyTensor(_packer(value, name), dtype, ir.Shape(shape), name=name)
                    packed_value = ir.Value(
                        name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
                    )
                    graph.register_initializer(packed_value)
                    packed[key] = packed_value
                    count += 1
                node.replace_input_with(index, packed[key])
        if count:
            common_passes.RemoveUnusedNodesPass()(model)
        return CountedPassResult(model, count > 0, count)
