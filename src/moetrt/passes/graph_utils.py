"""Small read-only helpers over onnx-ir graphs shared by the passes (no rewriting here)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

# Ops that only change how a tensor is viewed (never its values): matching looks through them.
VIEW_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
# Cast changes precision only; routing often upcasts (softmax in float32) and casts back.
VIEW_OR_CAST_OPS = VIEW_OPS | {"Cast"}


_SHAPE_DTYPES = (ir.DataType.INT64, ir.DataType.INT32)


class NoMatch(Exception):
    """A check of a rule failed: `check` names it in words (shown by `moetrt fuse --explain`)."""

    def __init__(self, check: str) -> None:
        super().__init__(check)
        self.check = check


def require(condition: bool, check: str) -> None:
    if not condition:
        raise NoMatch(check)


def producer_op(value: ir.Value | None) -> str | None:
    if value is None:
        return None
    node = value.producer()
    return None if node is None else node.op_type if node.domain in ("", "ai.onnx") else None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def is_const(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def back_through(value: ir.Value, ops: frozenset[str] = VIEW_OPS) -> ir.Value:
    """Follow producers while they are in `ops` (first input), return the first value that is not."""
    while (node := value.producer()) is not None and node.op_type in ops and node.domain == "":
        source = node.inputs[0]
        if source is None:
            break
        value = source
    return value


def single_consumer(value: ir.Value) -> ir.Node | None:
    consumers = list(value.consumers())
    if len(consumers) != 1 or value.is_graph_output():
        return None
    return consumers[0]


def forward_through(value: ir.Value, ops: frozenset[str] = VIEW_OPS) -> ir.Value:
    """Follow the only consumer while it is in `ops`; return the last value reached."""
    while (node := single_consumer(value)) is not None and node.op_type in ops and node.inputs[0] is value:
        value = node.outputs[0]
    return value


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node: the input that is not `value` (None if `value` is not an input)."""
    inputs = list(node.inputs)
    if len(inputs) != 2 or value not in inputs:
        return None
    return inputs[1] if inputs[0] is value else inputs[0]


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def static_dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def backward_slice(
    outputs: Iterable[ir.Value],
    stops: Iterable[ir.Value],
    order: dict[ir.Node, int],
    external_shapes: set[ir.Value] | None = None,
) -> set[ir.Node]:
    """Every node computing `outputs` from the `stops` values and constants.

    Raises NoMatch when a value the slice needs is neither a stop, a constant, nor computed after the
    earliest stop's producer: the block would depend on something besides its inputs. `order` (node ->
    position in the topologically sorted graph) bounds the walk to the nodes between the stops and the
    outputs, which keeps a whole-model walk linear in the number of blocks. With `external_shapes`, integer
    values from outside (shape arithmetic on the model's inputs) end the walk and are collected there.
    """
    stop_set = set(stops)
    floor = min((order.get(v.producer(), -1) if v.producer() is not None else -1) for v in stop_set)
    nodes: set[ir.Node] = set()
    stack = list(outputs)
    seen: set[ir.Value] = set()
    while stack:
        value = stack.pop()
        if value in stop_set or value in seen:
            continue
        seen.add(value)
        node = value.producer()
        outside = f"the block reads '{value.name}', which is not computed from its inputs"
        if node is None:
            if external_shapes is not None and value.dtype in _SHAPE_DTYPES and not is_const(value):
                external_shapes.add(value)
                continue
            require(is_const(value), outside)
            continue
        if not node.inputs:  # Constant-like node
            nodes.add(node)
            continue
        if order.get(node, -1) <= floor and external_shapes is not None and value.dtype in _SHAPE_DTYPES:
            external_shapes.add(value)
            continue
        require(order.get(node, -1) > floor, outside)
        if node in nodes:
            continue
        nodes.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    return nodes


def escaping_values(nodes: set[ir.Node], allowed: Iterable[ir.Value], hidden: ir.Value) -> list[ir.Value]:
    """Values computed inside `nodes` that something outside them (or a graph output) reads.

    Shape arithmetic (integer values), constants and views of the hidden states may be shared with the rest
    of the graph: they stay alive for their other readers and cost nothing.
    """
    allowed_set = set(allowed)
    escaping = []
    for node in nodes:
        if not node.inputs:
            continue
        for value in node.outputs:
            if value in allowed_set or value.dtype in _SHAPE_DTYPES or back_through(value) is hidden:
                continue
            if value.is_graph_output() or any(consumer not in nodes for consumer in value.consumers()):
                escaping.append(value)
    return escaping


def producer_node(value: ir.Value | None, check: str) -> ir.Node:
    """The node that computes `value`, or NoMatch(check) when it is a graph input or initializer."""
    node = value.producer() if value is not None else None
    if node is None:
        raise NoMatch(check)
    return node


def operand(node: ir.Node, index: int, check: str = "a node lacks an input the rule reads") -> ir.Value:
    """Input `index` of `node`, or NoMatch(check) when it is absent."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        raise NoMatch(check)
    return value


def static_dims(value: ir.Value | None, check: str) -> tuple[int, ...]:
    """The shape of `value` as ints, or NoMatch(check) when any dim is unknown or symbolic."""
    shape = value.shape if value is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise NoMatch(check)
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def unique_initializer_name(graph: ir.Graph, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ... : the first no initializer of `graph` has."""
    candidate, i = name, 1
    while candidate in graph.initializers:
        candidate, i = f"{name}_{i}", i + 1
    return candidate
