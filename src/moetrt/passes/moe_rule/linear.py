"""The dense parts around the experts: the router linear layer and the shared expert (optionally gated)."""

from __future__ import annotations

import onnx_ir as ir

from moetrt.passes import layout as L
from moetrt.passes.graph_utils import (
    VIEW_OPS,
    VIEW_OR_CAST_OPS,
    NoMatch,
    attr_float,
    attr_int,
    back_through,
    is_const,
    operand,
    producer_node,
    producer_op,
    rank,
    require,
)
from moetrt.passes.moe_rule.results import Linear, Router, SharedExpert

# Lossless upcasts a router may compute through (half -> float32 routing).
_UPCASTS = {
    ir.DataType.FLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.BFLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.FLOAT: (ir.DataType.DOUBLE,),
}


def match_linear(value: ir.Value) -> Linear:
    """Gemm | MatMul with a constant 2-D weight (no bias) -> canonical [out, in] weight and its input."""
    node = producer_node(back_through(value, VIEW_OR_CAST_OPS), "not a linear layer")
    require(node.op_type in ("Gemm", "MatMul"), "not a linear layer")
    a, w = operand(node, 0), operand(node, 1)
    require(is_const(w) and rank(w) == 2, "linear layer weight is not a constant matrix")
    if node.op_type == "Gemm":
        require(
            attr_int(node, "transA", 0) == 0 and attr_float(node, "alpha", 1.0) == 1.0,
            "Gemm with transA/alpha",
        )
        require(len(node.inputs) < 3 or node.inputs[2] is None, "linear layer has a bias")
        weight = L.source(w) if attr_int(node, "transB", 0) else L.transpose(L.source(w), (1, 0))
    else:
        weight = L.transpose(L.source(w), (1, 0))
    return Linear(weight, through_upcast(a))


def through_upcast(value: ir.Value) -> ir.Value:
    """Back through views and lossless Casts (half -> float32: routers that compute in float32)."""
    value = back_through(value, VIEW_OPS)
    while (node := value.producer()) is not None and node.op_type == "Cast" and node.domain == "":
        source = node.inputs[0]
        if source is None or source.dtype is None or value.dtype not in _UPCASTS.get(source.dtype, ()):
            break
        value = back_through(source, VIEW_OPS)
    return value


def match_router(logits: ir.Value) -> Router:
    """Router logits -> the linear layer, its bias and the logits value as computed."""
    raw = back_through(logits, VIEW_OR_CAST_OPS)
    check = "router logits are not a linear layer of the hidden states"
    node = producer_node(raw, check)
    require(node.op_type in ("Gemm", "MatMul", "Add"), check)
    bias = None
    if node.op_type == "Add":
        lhs, rhs = operand(node, 0), operand(node, 1)
        const_side = rhs if is_const(rhs) else lhs if is_const(lhs) else None
        require(const_side is not None, "router logits add a non-constant")
        assert const_side is not None
        bias = L.source(const_side)
        linear = match_linear(rhs if const_side is lhs else lhs)
    elif node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        require(is_const(node.inputs[2]), "router bias is not constant")
        require(
            attr_float(node, "beta", 1.0) == 1.0 and attr_float(node, "alpha", 1.0) == 1.0,
            "router Gemm scales",
        )
        bias = L.source(node.inputs[2])
        w = operand(node, 1)
        require(is_const(w) and attr_int(node, "transA", 0) == 0, "router weight is not constant")
        weight = L.source(w) if attr_int(node, "transB", 0) else L.transpose(L.source(w), (1, 0))
        linear = Linear(weight, through_upcast(operand(node, 0)))
    else:
        linear = match_linear(raw)
    return Router(linear, bias, raw)


def match_shared_expert(value: ir.Value, hidden: ir.Value) -> SharedExpert:
    """down(silu(gate(x)) * up(x)), optionally scaled by sigmoid(x @ g.T) -> canonical shared weights."""
    value = back_through(value, VIEW_OR_CAST_OPS)
    gate_weight = None
    node = value.producer()
    if node is not None and node.op_type == "Mul":
        for s, y in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            if s is None or y is None:
                continue
            s0 = back_through(s, VIEW_OR_CAST_OPS)
            if producer_op(s0) == "Sigmoid":
                gate = match_linear(operand(producer_node(s0, ""), 0))
                require(
                    gate.input is hidden and gate.weight.shape()[0] == 1,
                    "shared gate is not sigmoid(x @ g.T) with g [1, H]",
                )
                gate_weight, value = gate.weight, back_through(y, VIEW_OR_CAST_OPS)
                break
    down = match_linear(value)
    act = producer_node(down.input, "shared expert is not a gated MLP")
    require(act.op_type == "Mul", "shared expert is not a gated MLP")
    for p, q in ((act.inputs[0], act.inputs[1]), (act.inputs[1], act.inputs[0])):
        if p is None or q is None:
            continue
        z = _silu_input(back_through(p, VIEW_OR_CAST_OPS))
        if z is None:
            continue
        gate_proj, up_proj = match_linear(z), match_linear(q)
        require(
            gate_proj.input is hidden and up_proj.input is hidden,
            "shared expert reads other than the hidden states",
        )
        size = gate_proj.weight.shape()[0]
        require(
            up_proj.weight.shape()[0] == size and down.weight.shape()[1] == size,
            "shared expert sizes disagree",
        )
        return SharedExpert(L.concat([gate_proj.weight, up_proj.weight], 0), down.weight, gate_weight, size)
    raise NoMatch("shared expert activation is not SiLU-GLU")


def _silu_input(value: ir.Value) -> ir.Value | None:
    node = value.producer()
    if node is None or node.op_type != "Mul":
        return None
    a, b = node.inputs
    for z, s in ((a, b), (b, a)):
        s_node = s.producer() if s is not None else None
        if s_node is not None and s_node.op_type == "Sigmoid" and s_node.inputs[0] is z:
            return z
    return None
