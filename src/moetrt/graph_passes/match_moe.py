"""Rule `moe_gather_experts`: recognise one MoE block in the gather form and describe it as a fused op.

The form is what transformers' batched_mm experts (and user code written the same way) export:

    logits = Gemm|MatMul(x, router_w) (+ bias)
    routing: softmax|sigmoid, TopK (+ renorm Div, scaling Mul), or TopK on logits then Softmax (GPT-OSS),
             or sigmoid + correction bias + grouped mask (Where -inf) then GatherElements (DeepSeek-V3)
    ids = Reshape(TopK.indices, [-1])
    per pair: W = Gather|GatherND(expert_w, ids)  ->  MatMul(W, token) or MatMul(token, W)  (+ gathered bias)
              -> GLU activation (halves, interleaved, or separate gate/up weights) -> MatMul(down) (+ bias)
    out = ReduceSum(Reshape(down * weights, [T, k, H]), axis=1) (+ shared expert, optionally sigmoid-gated)

Matching has two levels: the expert core (anchored on each TopK whose indices gather expert weights) and
the routing that feeds the TopK. Every check raises `NoMatch` with what failed; the activation is told
apart numerically (`numeric_check.classify_glu`) and the whole block is checked numerically before the
rewrite, so an unrecognised variation stays unfused instead of fusing wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from moetrt.graph_passes import layout as L
from moetrt.graph_passes.graph_utils import (
    VIEW_OPS,
    VIEW_OR_CAST_OPS,
    NoMatch,
    attr_float,
    attr_int,
    back_through,
    backward_slice,
    const_array,
    const_scalar,
    escaping_values,
    forward_through,
    is_const,
    other_input,
    producer_op,
    rank,
    require,
    single_consumer,
)
from moetrt.graph_passes.numeric_check import GluForm, classify_glu
from moetrt.plugins.moe.spec import MoEAttributes

RULE_CORE = "moe_gather_experts/expert_core"
RULE_ROUTING = "moe_gather_experts/routing"
RULE_BLOCK = "moe_gather_experts/block"

_ACTIVATION_OPS = frozenset(
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
_STREAM_OPS = VIEW_OPS | {"Expand", "Tile"}


@dataclass
class MoEMatch:
    attrs: MoEAttributes
    hidden: ir.Value  # the block's input (any rank, last dim H)
    output: ir.Value  # the value the fused op replaces (same shape as `hidden`, or [T, H])
    router_logits: ir.Value | None  # the logits value read outside the block, when there is one
    weights: dict[str, L.Layout]  # canonical input name -> layout expression
    nodes: set[ir.Node] = field(default_factory=set)
    topk: ir.Node | None = None
    # Reshapes back to the hidden shape whose target comes from the model's input dims, and the integer
    # nodes that compute it: the numerical check reshapes to Shape(hidden) instead.
    shape_fixes: list[ir.Node] = field(default_factory=list)
    shape_only: set[ir.Node] = field(default_factory=set)
    # Set by the rewrite: the variant's function body and the (old value, new value) pairs it replaces.
    function: onnx.FunctionProto | None = None
    pairs: list[tuple[ir.Value, ir.Value]] = field(default_factory=list)


@dataclass
class _Linear:
    weight: L.Layout  # canonical [out, in]
    input: ir.Value


# ----------------------------------------------------------------------------------------------- candidates
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


# ------------------------------------------------------------------------------------------------ the rule
def match_moe_block(topk: ir.Node, order: dict[ir.Node, int], opset_imports: dict[str, int]) -> MoEMatch:
    """Describe the MoE block whose experts are selected by `topk`, or raise NoMatch(check) with a rule tag."""
    stage = RULE_CORE
    try:
        core = _match_core(topk, order, opset_imports)
        stage = RULE_ROUTING
        routing = _match_routing(topk, core["weights_value"])
        stage = RULE_BLOCK
        return _assemble(topk, core, routing, order)
    except NoMatch as failure:
        raise NoMatch(f"{stage}: {failure.check}") from None


def _match_core(topk: ir.Node, order: dict[ir.Node, int], opset_imports: dict[str, int]) -> dict:
    require(topk.op_type == "TopK" and len(topk.outputs) == 2, "not a TopK node")
    k = const_scalar(topk.inputs[1])
    require(k is not None, "TopK's k is not a constant")
    require(attr_int(topk, "largest", 1) == 1, "TopK selects the smallest values")
    axis, data_rank = attr_int(topk, "axis", -1), rank(topk.inputs[0])
    require(
        axis == -1 or (data_rank is not None and axis == data_rank - 1),
        "TopK does not select along the last axis",
    )
    ids = topk.outputs[1]
    gathers = expert_gathers(ids)
    for node in gathers:
        if node.op_type == "GatherND":
            require(attr_int(node, "batch_dims", 0) == 0, "GatherND with batch_dims != 0")
            require(
                producer_op(node.inputs[1]) == "Unsqueeze"
                or (rank(node.inputs[1]) is not None and node.inputs[1].shape[-1] == 1),
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
    num_experts = {int(g.inputs[0].shape[0]) for g in gathers}  # type: ignore[arg-type]
    require(len(num_experts) == 1, "expert tables disagree on the number of experts")

    projections = [_match_projection(g, bias_gathers) for g in weight_gathers]
    require(
        len({id(p["bias_gather"]) for p in projections if p["bias_gather"] is not None})
        == sum(p["bias_gather"] is not None for p in projections),
        "one expert bias is added twice",
    )
    used_biases = {p["bias_gather"] for p in projections if p["bias_gather"] is not None}
    require(
        used_biases == set(bias_gathers), "an expert bias table is gathered but not added to a projection"
    )
    projections.sort(key=lambda p: order.get(p["matmul"], -1))
    down, first = projections[-1], projections[:-1]

    # The activation: everything between the first projection(s) and the down projection's input.
    act_inputs = [p["output"] for p in first]
    act_nodes = backward_slice([down["input"]], act_inputs, order)
    bad = sorted({n.op_type for n in act_nodes} - _ACTIVATION_OPS)
    require(not bad, f"expert activation uses {bad}")
    widths = [p["out_dim"] for p in first]
    glu = classify_glu(act_nodes, act_inputs, down["input"], widths, order, opset_imports)
    require(
        glu is not None,
        "the expert activation is not a GLU the op supports (SiLU, GELU, GELU-tanh, clamped SwiGLU)",
    )
    assert glu is not None

    streams = {back_through(p["input"], _STREAM_OPS) for p in first}
    require(len(streams) == 1, "the gate and up projections read different token streams")

    # Weighting and the sum over the k slots.
    y = forward_through(down["output"], VIEW_OR_CAST_OPS)
    mul = single_consumer(y)
    require(
        mul is not None and mul.op_type == "Mul", "the down projection is not multiplied by routing weights"
    )
    assert mul is not None
    weights_flat = other_input(mul, y)
    require(weights_flat is not None, "routing-weight multiply is not binary")
    assert weights_flat is not None
    summed_in = forward_through(mul.outputs[0], VIEW_OR_CAST_OPS)
    red = single_consumer(summed_in)
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
    return {
        "k": int(k),  # type: ignore[arg-type]
        "num_experts": num_experts.pop(),
        "first": first,
        "down": down,
        "glu": glu,
        "stream": streams.pop(),
        "weights_value": back_through(weights_flat, VIEW_OR_CAST_OPS),
        "core_out": red.outputs[0],
        "keepdims": attr_int(red, "keepdims", 1),
    }


def _match_projection(gather: ir.Node, bias_gathers: list[ir.Node]) -> dict:
    """Gathered weight -> batched MatMul with the (unsqueezed) activations -> squeeze (+ gathered bias)."""
    gathered = forward_through(gather.outputs[0], frozenset({"Cast"}))
    matmul = single_consumer(gathered)
    require(
        matmul is not None and matmul.op_type == "MatMul", "gathered expert weights do not feed one MatMul"
    )
    assert matmul is not None
    weight_left = matmul.inputs[0] is gathered
    vec = matmul.inputs[1] if weight_left else matmul.inputs[0]
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
    assert table is not None and table.shape is not None
    _, a, b = (int(d) for d in table.shape)  # type: ignore[arg-type]
    # weight @ x: table is [E, out, in] (nn.Linear); x @ weight: table is [E, in, out] (transposed).
    canonical = L.source(table) if weight_left else L.transpose(L.source(table), (0, 2, 1))
    return {
        "matmul": matmul,
        "input": back_through(vec, VIEW_OPS),
        "output": out,
        "weight": canonical,
        "out_dim": a if weight_left else b,
        "in_dim": b if weight_left else a,
        "bias_gather": bias_gather,
        "bias": L.source(bias_gather.inputs[0]) if bias_gather is not None else None,
    }


# ------------------------------------------------------------------------------------------------- routing
def _match_routing(topk: ir.Node, weights: ir.Value) -> dict:
    """Routing weights [T, k] back to the router logits; returns the routing attributes."""
    out: dict = {
        "scale": 1.0,
        "norm": False,
        "topk_before_score": False,
        "n_group": 1,
        "topk_group": 1,
        "correction": None,
    }
    value = weights
    if producer_op(value) == "Mul":
        node = value.producer()
        assert node is not None
        consts = [const_scalar(v) for v in node.inputs]
        require(any(c is not None for c in consts), "routing weights are multiplied by a non-constant")
        idx = 0 if consts[0] is not None else 1
        out["scale"] = float(consts[idx])  # type: ignore[arg-type]
        value = back_through(node.inputs[1 - idx], VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
    if producer_op(value) == "Div":
        node = value.producer()
        assert node is not None
        numer = back_through(node.inputs[0], VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
        denom = back_through(node.inputs[1], VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
        if producer_op(denom) == "Add":
            add = denom.producer()
            assert add is not None
            eps = [const_scalar(v) for v in add.inputs]
            require(
                any(e is not None and abs(e) <= 1e-6 for e in eps), "renorm denominator adds a non-epsilon"
            )
            denom = back_through(add.inputs[1] if eps[0] is not None else add.inputs[0], VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
        elif producer_op(denom) in ("Max", "Clip"):
            # sum.clamp(min=eps) (ERNIE-4.5): equals the op's sum + 1e-20 unless the k weights sum below eps.
            floor = denom.producer()
            assert floor is not None
            if floor.op_type == "Clip":
                bounds = [const_scalar(v) if v is not None else None for v in [*floor.inputs[1:], None, None]]
                require(
                    len(floor.inputs) < 3 or floor.inputs[2] is None, "renorm denominator is clamped above"
                )
                eps_value, inner = bounds[0], floor.inputs[0]
            else:
                require(len(floor.inputs) == 2, "renorm denominator is a Max of more than two values")
                values = [const_scalar(v) for v in floor.inputs]
                eps_value = values[0] if values[0] is not None else values[1]
                inner = floor.inputs[1] if values[0] is not None else floor.inputs[0]
            require(
                eps_value is not None and 0 <= eps_value <= 1e-6,
                "renorm denominator is clamped to a non-epsilon",
            )
            denom = back_through(inner, VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
        require(
            producer_op(denom) == "ReduceSum", "routing weights are divided by something other than their sum"
        )
        red = denom.producer()
        assert red is not None
        require(
            back_through(red.inputs[0], VIEW_OR_CAST_OPS) is numer,
            "renorm divides by the sum of another tensor",
        )  # type: ignore[arg-type]
        axes = const_array(red.inputs[1]) if len(red.inputs) > 1 else None
        require(
            axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, (rank(numer) or 2) - 1),
            "renorm sums over an axis other than k",
        )
        out["norm"] = True
        value = numer

    top_values, top_ids = topk.outputs
    topk_input = back_through(topk.inputs[0], VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
    if value is top_values:
        scores_kind = producer_op(topk_input)
        require(
            scores_kind in ("Softmax", "Sigmoid"),
            "TopK values are used as weights but TopK does not read softmax/sigmoid scores",
        )
        _check_softmax_axis(topk_input)
        out["scoring"] = scores_kind.lower()  # type: ignore[union-attr]
        out["logits"] = topk_input.producer().inputs[0]  # type: ignore[union-attr]
    elif (
        producer_op(value) == "Softmax"
        and back_through(value.producer().inputs[0], VIEW_OR_CAST_OPS) is top_values
    ):  # type: ignore[union-attr,arg-type]
        _check_softmax_axis(value)
        require(
            out["scale"] == 1.0, "a routed scaling factor with top-k before softmax is not part of the op"
        )
        out.update(scoring="softmax", topk_before_score=True, norm=False, logits=topk.inputs[0])
    elif producer_op(value) == "GatherElements":
        gather = value.producer()
        assert gather is not None
        require(
            back_through(gather.inputs[1], VIEW_OR_CAST_OPS) is top_ids,
            "weights gathered at indices other than TopK's",
        )  # type: ignore[arg-type]
        axis = attr_int(gather, "axis", 0)
        require(axis in (-1, 1), "weights gathered along an axis other than the experts")
        scores = back_through(gather.inputs[0], VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
        scores_kind = producer_op(scores)
        require(scores_kind in ("Softmax", "Sigmoid"), "gathered weights are not softmax/sigmoid scores")
        _check_softmax_axis(scores)
        out["scoring"] = scores_kind.lower()  # type: ignore[union-attr]
        out["logits"] = scores.producer().inputs[0]  # type: ignore[union-attr]
        choice = topk_input
        if producer_op(choice) == "Where":
            choice = _match_group_mask(choice, out)
        if producer_op(choice) == "Add":
            add = choice.producer()
            assert add is not None
            a, b = (back_through(v, VIEW_OR_CAST_OPS) for v in add.inputs)  # type: ignore[arg-type]
            bias_value = b if a is scores else a if b is scores else None
            require(bias_value is not None and is_const(bias_value), "TopK reads scores plus a non-constant")
            out["correction"] = bias_value
            choice = scores
        require(choice is scores, "TopK does not read the (corrected, group-masked) scores")
    else:
        raise NoMatch(
            "routing weights are not TopK values, softmax of TopK values, or scores gathered at the TopK ids"
        )
    return out


def _check_softmax_axis(value: ir.Value) -> None:
    node = value.producer()
    if node is not None and node.op_type == "Softmax":
        axis = attr_int(node, "axis", -1)
        require(axis == -1 or axis == (rank(value) or 2) - 1, "softmax over an axis other than the experts")


def _match_group_mask(where_out: ir.Value, out: dict) -> ir.Value:
    """Where(mask, choice, -inf) from grouped top-k: read n_group / topk_group; return `choice`."""
    node = where_out.producer()
    assert node is not None
    cond, a, b = node.inputs
    fill_a, fill_b = const_scalar(a), const_scalar(b)
    fill, choice = (fill_a, b) if fill_a is not None else (fill_b, a)
    require(fill is not None and fill <= -1e30, "experts outside the chosen groups are not masked with -inf")
    assert choice is not None and cond is not None
    choice = back_through(choice, VIEW_OR_CAST_OPS)
    # The mask is computed from `choice`: reshape to [T, G, E/G], top-2 per group summed, top-k groups.
    group_size = None
    topk_ks: list[tuple[int, int | None]] = []
    stack, seen = [cond], set()
    while stack and len(seen) < 200:
        value = stack.pop()
        if value in seen or value is choice:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is None:
            continue
        if producer.op_type == "Reshape" and back_through(producer.inputs[0], VIEW_OR_CAST_OPS) is choice:  # type: ignore[arg-type]
            shape = const_array(producer.inputs[1])
            if shape is not None and shape.size == 3:
                group_size = int(shape[2]) if shape[2] > 0 else None
                out["n_group"] = int(shape[1])
        if producer.op_type == "TopK":
            topk_ks.append((int(const_scalar(producer.inputs[1]) or 0), rank(producer.inputs[0])))  # type: ignore[arg-type]
        stack.extend(v for v in producer.inputs if v is not None)
    require(out["n_group"] > 1 and len(topk_ks) == 2, "the expert mask is not a grouped top-k")
    group_topk = [kk for kk, r in topk_ks if r == 2]
    require(len(group_topk) == 1, "could not tell the group top-k from the in-group top-k")
    out["topk_group"] = group_topk[0]
    out["group_size"] = group_size
    out["in_group_k"] = next(kk for kk, r in topk_ks if r != 2)
    return choice


def _match_linear(value: ir.Value) -> _Linear:
    """Gemm | MatMul with a constant 2-D weight (no bias) -> canonical [out, in] weight and its input."""
    value = back_through(value, VIEW_OR_CAST_OPS)
    node = value.producer()
    require(node is not None and node.op_type in ("Gemm", "MatMul"), "not a linear layer")
    assert node is not None
    a, w = node.inputs[0], node.inputs[1]
    require(w is not None and is_const(w) and rank(w) == 2, "linear layer weight is not a constant matrix")
    assert a is not None and w is not None
    if node.op_type == "Gemm":
        require(
            attr_int(node, "transA", 0) == 0 and attr_float(node, "alpha", 1.0) == 1.0,
            "Gemm with transA/alpha",
        )
        require(len(node.inputs) < 3 or node.inputs[2] is None, "linear layer has a bias")
        weight = L.source(w) if attr_int(node, "transB", 0) else L.transpose(L.source(w), (1, 0))
    else:
        weight = L.transpose(L.source(w), (1, 0))
    return _Linear(weight, _through_upcast(a))


_UPCASTS = {
    ir.DataType.FLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.BFLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.FLOAT: (ir.DataType.DOUBLE,),
}


def _through_upcast(value: ir.Value) -> ir.Value:
    """Back through views and lossless Casts (half -> float32: routers that compute in float32)."""
    value = back_through(value, VIEW_OPS)
    while (node := value.producer()) is not None and node.op_type == "Cast" and node.domain == "":
        source = node.inputs[0]
        if source is None or value.dtype not in _UPCASTS.get(source.dtype, ()):  # type: ignore[arg-type]
            break
        value = back_through(source, VIEW_OPS)
    return value


def _match_router(logits: ir.Value) -> tuple[_Linear, L.Layout | None, ir.Value]:
    """Router logits -> (linear, bias, the logits value as computed)."""
    raw = back_through(logits, VIEW_OR_CAST_OPS)
    node = raw.producer()
    require(
        node is not None and node.op_type in ("Gemm", "MatMul", "Add"),
        "router logits are not a linear layer of the hidden states",
    )
    assert node is not None
    bias = None
    if node.op_type == "Add":
        lhs, rhs = node.inputs
        const_side = rhs if is_const(rhs) else lhs if is_const(lhs) else None
        require(const_side is not None, "router logits add a non-constant")
        assert const_side is not None
        bias = L.source(const_side)
        linear = _match_linear(rhs if const_side is lhs else lhs)  # type: ignore[arg-type]
    elif node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        require(is_const(node.inputs[2]), "router bias is not constant")
        require(
            attr_float(node, "beta", 1.0) == 1.0 and attr_float(node, "alpha", 1.0) == 1.0,
            "router Gemm scales",
        )
        bias = L.source(node.inputs[2])  # type: ignore[arg-type]
        w = node.inputs[1]
        require(is_const(w) and attr_int(node, "transA", 0) == 0, "router weight is not constant")
        weight = L.source(w) if attr_int(node, "transB", 0) else L.transpose(L.source(w), (1, 0))  # type: ignore[arg-type]
        linear = _Linear(weight, _through_upcast(node.inputs[0]))  # type: ignore[arg-type]
    else:
        linear = _match_linear(raw)
    return linear, bias, raw


# --------------------------------------------------------------------------------------------- shared expert
def _match_shared(value: ir.Value, hidden: ir.Value) -> dict:
    """down(silu(gate(x)) * up(x)), optionally scaled by sigmoid(x @ g.T) -> canonical shared weights."""
    value = back_through(value, VIEW_OR_CAST_OPS)
    gate_weight = None
    node = value.producer()
    if node is not None and node.op_type == "Mul":
        for s, y in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            s0 = back_through(s, VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
            if producer_op(s0) == "Sigmoid":
                gate = _match_linear(s0.producer().inputs[0])  # type: ignore[union-attr,arg-type]
                require(
                    gate.input is hidden and gate.weight.shape()[0] == 1,
                    "shared gate is not sigmoid(x @ g.T) with g [1, H]",
                )
                gate_weight, value = gate.weight, back_through(y, VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
                break
    down = _match_linear(value)
    act = down.input.producer()
    require(act is not None and act.op_type == "Mul", "shared expert is not a gated MLP")
    assert act is not None
    for p, q in ((act.inputs[0], act.inputs[1]), (act.inputs[1], act.inputs[0])):
        silu = back_through(p, VIEW_OR_CAST_OPS)  # type: ignore[arg-type]
        z = _silu_input(silu)
        if z is None:
            continue
        gate_proj, up_proj = _match_linear(z), _match_linear(q)  # type: ignore[arg-type]
        require(
            gate_proj.input is hidden and up_proj.input is hidden,
            "shared expert reads other than the hidden states",
        )
        size = gate_proj.weight.shape()[0]
        require(
            up_proj.weight.shape()[0] == size and down.weight.shape()[1] == size,
            "shared expert sizes disagree",
        )
        return {
            "gate_up": L.concat([gate_proj.weight, up_proj.weight], 0),
            "down": down.weight,
            "gate": gate_weight,
            "size": size,
        }
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


# ------------------------------------------------------------------------------------------------ assembly
def _assemble(topk: ir.Node, core: dict, routing: dict, order: dict[ir.Node, int]) -> MoEMatch:
    linear, router_bias, raw_logits = _match_router(routing["logits"])
    hidden = linear.input
    require(core["stream"] is hidden, "router and experts read different hidden states")
    require(hidden.dtype is not None and hidden.shape is not None, "hidden states have no known type")
    num_experts, hidden_size = linear.weight.shape()
    require(num_experts == core["num_experts"], "router and expert tables disagree on the number of experts")
    require(
        rank(hidden) is not None and hidden.shape[-1] == hidden_size,
        "router weight does not match the hidden size",
    )  # type: ignore[index]
    if routing["n_group"] > 1:
        group_size = num_experts // routing["n_group"]
        require(num_experts % routing["n_group"] == 0, "n_group does not divide the experts")
        require(routing.get("group_size") in (None, group_size), "group reshape disagrees with n_group")
        require(routing["in_group_k"] == min(2, group_size), "groups are not scored by their top-2 sum")

    glu: GluForm = core["glu"]
    first, down = core["first"], core["down"]
    if len(first) == 1:
        gate_up = first[0]["weight"]
        gate_up_bias = first[0]["bias"]
        if glu.layout == "interleaved":
            gate_up = L.deinterleave(gate_up, 1)
            gate_up_bias = L.deinterleave(gate_up_bias, 1) if gate_up_bias is not None else None
        elif glu.layout == "tied":  # gate and up are one projection: store it twice, gate rows then up rows
            gate_up = L.concat([gate_up, gate_up], 1)
            gate_up_bias = L.concat([gate_up_bias, gate_up_bias], 1) if gate_up_bias is not None else None
        require(glu.layout in ("halves", "interleaved", "tied"), "unexpected GLU layout")
    else:
        gate_first = glu.layout == "separate"
        ordered = first if gate_first else first[::-1]
        gate_up = L.concat([p["weight"] for p in ordered], 1)
        biases = [p["bias"] for p in ordered]
        gate_up_bias = None
        if any(b is not None for b in biases):
            gate_up_bias = L.concat(
                [
                    b if b is not None else L.zeros((num_experts, p["out_dim"]), hidden.dtype)
                    for b, p in zip(biases, ordered)
                ],
                1,
            )
    two_i, in_dim = gate_up.shape()[1], gate_up.shape()[2]
    require(in_dim == hidden_size and two_i % 2 == 0, "expert gate/up weights do not match the hidden size")
    intermediate = two_i // 2
    require(
        down["in_dim"] == intermediate and down["out_dim"] == hidden_size, "down projection shape mismatch"
    )
    down_bias = down["bias"]
    has_expert_bias = gate_up_bias is not None or down_bias is not None
    if has_expert_bias:
        gate_up_bias = gate_up_bias or L.zeros((num_experts, two_i), hidden.dtype)
        down_bias = down_bias or L.zeros((num_experts, hidden_size), hidden.dtype)

    # The block's output: the sum over k, then views and at most one shared expert added.
    output = core["core_out"]
    shared = None
    while True:
        output = forward_through(output, VIEW_OR_CAST_OPS)  # half models sum in float32, then cast back
        consumer = single_consumer(output)
        if shared is not None or consumer is None or consumer.op_type != "Add":
            break
        other = other_input(consumer, output)
        if other is None:
            break
        try:
            shared = _match_shared(other, hidden)
        except NoMatch:
            break
        output = consumer.outputs[0]

    externals: set[ir.Value] = set()
    nodes = backward_slice([output], [hidden], order, externals)
    shape_fixes, shape_only = _external_shape_reshapes(nodes, externals, hidden)
    require(topk in nodes, "the block output does not depend on the routing")
    logits_used_outside = raw_logits.is_graph_output() or any(c not in nodes for c in raw_logits.consumers())
    escaping = escaping_values(nodes, [output, raw_logits], hidden)
    require(
        not escaping, f"intermediate value '{escaping[0].name}' is used outside the block" if escaping else ""
    )

    weights: dict[str, L.Layout] = {
        "router_weight": linear.weight,
        "expert_gate_up_weight": gate_up,
        "expert_down_weight": down["weight"],
    }
    if router_bias is not None:
        weights["router_bias"] = L.reshape(router_bias, (num_experts,))
    if routing["correction"] is not None:
        weights["score_correction_bias"] = L.reshape(L.source(routing["correction"]), (num_experts,))
    if has_expert_bias:
        weights["expert_gate_up_bias"] = gate_up_bias
        weights["expert_down_bias"] = down_bias
    if shared is not None:
        weights["shared_gate_up_weight"] = shared["gate_up"]
        weights["shared_down_weight"] = shared["down"]
        if shared["gate"] is not None:
            weights["shared_gate_weight"] = shared["gate"]
    for name, expr in list(weights.items()):
        dtype = _dtype_of(expr)
        if dtype in (None, hidden.dtype):
            continue
        # Exporters fold Cast(half weight -> float32) for routers that compute in float32: such a table
        # goes back to the hidden states' dtype without loss. One that would lose bits is refused.
        require(
            _casts_exactly(expr, hidden.dtype),  # type: ignore[arg-type]
            f"{name} is {dtype.name if dtype else '?'} with values that {hidden.dtype.name} cannot hold "
            "(the op takes every weight in the hidden states' dtype)",
        )
        weights[name] = L.cast(expr, hidden.dtype)  # type: ignore[arg-type]

    try:
        attrs = MoEAttributes(
            num_experts=num_experts,
            top_k=core["k"],
            hidden_size=hidden_size,
            intermediate_size=intermediate,
            scoring=routing["scoring"],
            topk_before_score=routing["topk_before_score"],
            norm_topk_prob=routing["norm"],
            n_group=routing["n_group"],
            topk_group=routing["topk_group"],
            routed_scaling_factor=routing["scale"],
            activation=glu.activation,
            swiglu_alpha=glu.alpha,
            swiglu_limit=glu.limit,
            has_router_bias=router_bias is not None,
            has_score_correction_bias=routing["correction"] is not None,
            has_expert_bias=has_expert_bias,
            shared_intermediate_size=shared["size"] if shared else 0,
            has_shared_gate=bool(shared and shared["gate"] is not None),
            output_router_logits=logits_used_outside,
        )
    except ValueError as err:
        raise NoMatch(str(err)) from None
    return MoEMatch(
        attrs,
        hidden,
        output,
        raw_logits if logits_used_outside else None,
        weights,
        nodes,
        topk,
        shape_fixes,
        shape_only,
    )


def _external_shape_reshapes(
    nodes: set[ir.Node], externals: set[ir.Value], hidden: ir.Value
) -> tuple[list[ir.Node], set[ir.Node]]:
    """Reshapes inside the block whose target shape is computed from outside (the model's input dims).

    Accepted only when the exporter's shape says the result has exactly the hidden states' shape, so the
    rewrite (which reshapes to Shape(hidden)) keeps it. Returns those reshapes and the integer nodes that
    only feed them.
    """
    if not externals:
        return [], set()
    tainted_values = set(externals)
    tainted: set[ir.Node] = set()
    fixes: list[ir.Node] = []
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node in tainted or not any(v in tainted_values for v in node.inputs if v is not None):
                continue
            tainted.add(node)
            changed = True
            if node.op_type == "Reshape" and node.inputs[0] not in tainted_values:
                fixes.append(node)  # only its target shape comes from outside; its values do not
            else:
                tainted_values.update(node.outputs)
    for node in tainted:
        if node in fixes:
            out = node.outputs[0]
            require(
                out.shape is not None and hidden.shape is not None and list(out.shape) == list(hidden.shape),
                f"'{out.name}' is reshaped to a shape computed outside the block that is not the hidden states' shape",
            )
        else:
            require(
                all(v.dtype in (ir.DataType.INT64, ir.DataType.INT32) for v in node.outputs),
                f"'{node.name}' computes values from outside the block",
            )
    return fixes, tainted - set(fixes)


def _casts_exactly(expr: L.Layout, dtype: ir.DataType) -> bool:
    """Every constant under `expr` survives a round trip through `dtype` unchanged."""
    if expr.kind == "source":
        array = const_array(expr.source)
        if array is None:
            return False
        return bool(np.array_equal(array.astype(dtype.numpy()).astype(array.dtype), array))
    return all(_casts_exactly(part, dtype) for part in expr.parts)


def _dtype_of(expr: L.Layout) -> ir.DataType | None:
    if expr.kind == "source":
        return expr.source.dtype  # type: ignore[union-attr]
    if expr.kind in ("zeros", "cast"):
        return expr.dtype
    return _dtype_of(expr.parts[0])
