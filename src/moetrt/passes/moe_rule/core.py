"""Level one of rule `moe_gather_experts`: the expert core, anchored on a TopK whose indices gather expert weights.

    ids = Reshape(TopK.indices, [-1])
    per pair: W = Gather|GatherND(expert_w, ids)  ->  MatMul(W, token) or MatMul(token, W)  (+ gathered bias)
              -> GLU activation (halves, interleaved, or separate gate/up weights) -> MatMul(down) (+ bias)
    out = ReduceSum(Reshape(down * weights, [T, k, H]), axis=1)

The activation is told apart numerically (`numeric_check.classify_glu`): exporters write the same GLU many ways.
"""

from __future__ import annotations

import onnx_ir as ir

from moetrt.passes import layout as L
from moetrt.passes.graph_utils import (
    VIEW_OPS,
    VIEW_OR_CAST_OPS,
    attr_int,
    back_through,
    backward_slice,
    const_array,
    const_scalar,
    forward_through,
    is_const,
    other_input,
    producer_op,
    rank,
    require,
    single_consumer,
    static_dims,
)
from moetrt.passes.moe_rule.results import ExpertCore, Projection
from moetrt.passes.numeric_check import classify_glu

# Ops an expert activation may be written with (everything else refuses the candidate).
ACTIVATION_OPS = frozenset(
    {
        "Split",
        "Slice",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Sigmoid",
        "Tanh",
        "Erf",
        "Gelu",
        "Clip",
        "Pow",
        "Cast",
        "Neg",
        "Min",
        "Max",
        "Constant",
        "Shape",
        "Gather",
        "Concat",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "HardSigmoid",
        "Softplus",
        "Relu",
    }
)
# What may stand between the hidden states and the expert MatMuls: views and the broadcast over k.
STREAM_OPS = VIEW_OPS | {"Expand", "Tile"}


def expert_gathers(ids: ir.Value) -> list[ir.Node]:
    """Gather / GatherND nodes reading a constant table at `ids` (looked up through views and casts)."""
    found: list[ir.Node] = []
    stack, seen = [ids], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for node in value.consumers():
            if node.domain != "":
                continue
            if node.op_type in VIEW_OR_CAST_OPS and node.inputs[0] is value:
                stack.append(node.outputs[0])
            elif (
                node.op_type in ("Gather", "GatherND")
                and node.inputs[1] is value
                and is_const(node.inputs[0])
            ):
                found.append(node)
    return found


def is_expert_gather(node: ir.Node) -> bool:
    """A gather of a constant [E, ...] table of rank >= 2 by a computed index: looks like expert weights."""
    return (
        node.op_type in ("Gather", "GatherND")
        and node.domain == ""
        and is_const(node.inputs[0])
        and not is_const(node.inputs[1])
        and (rank(node.inputs[0]) or 0) >= 2
    )


def match_expert_core(topk: ir.Node, order: dict[ir.Node, int], opset_imports: dict[str, int]) -> ExpertCore:
    """The experts `topk` selects, or NoMatch(check)."""
    require(topk.op_type == "TopK" and len(topk.outputs) == 2, "not a TopK node")
    k = const_scalar(topk.inputs[1])
    require(k is not None, "TopK's k is not a constant")
    require(attr_int(topk, "largest", 1) == 1, "TopK selects the smallest values")
    axis, data_rank = attr_int(topk, "axis", -1), rank(topk.inputs[0])
    require(
        axis == -1 or (data_rank is not None and axis == data_rank - 1),
        "TopK does not select along the last axis",
    )
    gathers = expert_gathers(topk.outputs[1])
    for node in gathers:
        if node.op_type == "GatherND":
            require(attr_int(node, "batch_dims", 0) == 0, "GatherND with batch_dims != 0")
            require(
                producer_op(node.inputs[1]) == "Unsqueeze"
                or (rank(node.inputs[1]) is not None and node.inputs[1].shape[-1] == 1),  # type: ignore[union-attr,index]
                "GatherND indices are not [S, 1] expert ids",
            )
        else:
            require(attr_int(node, "axis", 0) == 0, "expert weights gathered along an axis other than 0")
    weight_gathers = [g for g in gathers if rank(g.inputs[0]) == 3]
    bias_gathers = [g for g in gathers if rank(g.inputs[0]) == 2]
    require(
        len(weight_gathers) in (2, 3),
        f"{len(weight_gathers)} expert weight gathers (need gate_up + down, or gate + up + down)",
    )
    require(
        len(gathers) == len(weight_gathers) + len(bias_gathers),
        "a gathered expert table is neither [E, a, b] nor [E, n]",
    )
    num_experts = {static_dims(g.inputs[0], "an expert table has no static shape")[0] for g in gathers}
    require(len(num_experts) == 1, "expert tables disagree on the number of experts")

    projections = [_match_projection(g, bias_gathers) for g in weight_gathers]
    used = [p.bias_gather for p in projections if p.bias_gather is not None]
    require(len(set(used)) == len(used), "one expert bias is added twice")
    require(set(used) == set(bias_gathers), "an expert bias table is gathered but not added to a projection")
    projections.sort(key=lambda p: order.get(p.matmul, -1))
    down, first = projections[-1], tuple(projections[:-1])

    # The activation: everything between the first projection(s) and the down projection's input.
    act_inputs = [p.output for p in first]
    act_nodes = backward_slice([down.input], act_inputs, order)
    bad = sorted({n.op_type for n in act_nodes} - ACTIVATION_OPS)
    require(not bad, f"expert activation uses {bad}")
    glu = classify_glu(act_nodes, act_inputs, down.input, [p.out_dim for p in first], order, opset_imports)
    if glu is None:
        require(
            False,
            "the expert activation is not a GLU the op supports (SiLU, GELU, GELU-tanh, clamped SwiGLU)",
        )
    assert glu is not None

    streams = {back_through(p.input, STREAM_OPS) for p in first}
    require(len(streams) == 1, "the gate and up projections read different token streams")

    # Weighting and the sum over the k slots.
    y = forward_through(down.output, VIEW_OR_CAST_OPS)
    mul = single_consumer(y)
    require(
        mul is not None and mul.op_type == "Mul", "the down projection is not multiplied by routing weights"
    )
    assert mul is not None
    weights_flat = other_input(mul, y)
    require(weights_flat is not None, "routing-weight multiply is not binary")
    assert weights_flat is not None
    red = single_consumer(forward_through(mul.outputs[0], VIEW_OR_CAST_OPS))
    require(
        red is not None and red.op_type == "ReduceSum",
        "weighted expert outputs are not summed (ReduceSum) over k",
    )
    assert red is not None
    axes = const_array(red.inputs[1]) if len(red.inputs) > 1 else None
    in_rank = rank(red.inputs[0]) or 3
    require(
        axes is not None and [int(a) % in_rank for a in axes.reshape(-1)] == [in_rank - 2],
        "the sum is not over the k axis of [T, k, H]",
    )
    require(in_rank == 3, "the weighted outputs are not reshaped to [T, k, H] before the sum")
    return ExpertCore(
        top_k=int(k),  # type: ignore[arg-type]
        num_experts=num_experts.pop(),
        first=first,
        down=down,
        glu=glu,
        stream=streams.pop(),
        weights_value=back_through(weights_flat, VIEW_OR_CAST_OPS),
        output=red.outputs[0],
    )


def _match_projection(gather: ir.Node, bias_gathers: list[ir.Node]) -> Projection:
    """Gathered weight -> batched MatMul with the (unsqueezed) activations -> squeeze (+ gathered bias)."""
    gathered = forward_through(gather.outputs[0], frozenset({"Cast"}))
    matmul = single_consumer(gathered)
    require(
        matmul is not None and matmul.op_type == "MatMul", "gathered expert weights do not feed one MatMul"
    )
    assert matmul is not None
    weight_left = matmul.inputs[0] is gathered
    vec = matmul.inputs[1] if weight_left else matmul.inputs[0]
    require(vec is not None, "an expert MatMul lacks an input")
    assert vec is not None
    out = forward_through(matmul.outputs[0], VIEW_OPS)
    bias_gather = None
    add = single_consumer(out)
    if add is not None and add.op_type == "Add":
        other = other_input(add, out)
        source = back_through(other, VIEW_OR_CAST_OPS) if other is not None else None
        for candidate in bias_gathers:
            if source is candidate.outputs[0]:
                bias_gather = candidate
                out = forward_through(add.outputs[0], VIEW_OPS)
    table = gather.inputs[0]
    _, a, b = static_dims(table, "an expert weight table has no static shape")
    assert table is not None
    # weight @ x: table is [E, out, in] (nn.Linear); x @ weight: table is [E, in, out] (transposed).
    canonical = L.source(table) if weight_left else L.transpose(L.source(table), (0, 2, 1))
    bias_table = bias_gather.inputs[0] if bias_gather is not None else None
    return Projection(
        matmul=matmul,
        input=back_through(vec, VIEW_OPS),
        output=out,
        weight=canonical,
        out_dim=a if weight_left else b,
        in_dim=b if weight_left else a,
        bias_gather=bias_gather,
        bias=L.source(bias_table) if bias_table is not None else None,
    )
