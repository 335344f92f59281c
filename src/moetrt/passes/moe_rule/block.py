"""Rule `moe_gather_experts`: one MoE block in the gather form, described as a fused op (`MoEMatch`).

The form is what transformers' batched_mm experts (and user code written the same way) export; `core.py`
matches the experts, `routing.py` the routing, `linear.py` the router and the shared expert. This file puts
them together: the whole block's attributes, weights (as layout expressions) and boundary, with every check
that the parts agree. A refused candidate raises `RuleRefused(Refusal(stage, check))`; the fusion pass also
checks the block numerically before the rewrite, so an unrecognised variation stays unfused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moetrt.op.spec import MoEAttributes
from moetrt.passes import layout as L
from moetrt.passes.graph_utils import (
    VIEW_OR_CAST_OPS,
    NoMatch,
    backward_slice,
    const_array,
    escaping_values,
    forward_through,
    other_input,
    rank,
    require,
    single_consumer,
)
from moetrt.passes.moe_rule.core import match_expert_core
from moetrt.passes.moe_rule.linear import match_router, match_shared_expert
from moetrt.passes.moe_rule.results import (
    RULE_BLOCK,
    RULE_CORE,
    RULE_ROUTING,
    ExpertCore,
    MoEMatch,
    Refusal,
    Routing,
    RuleRefused,
    SharedExpert,
)
from moetrt.passes.moe_rule.routing import match_routing


def match_moe_block(topk: ir.Node, order: dict[ir.Node, int], opset_imports: dict[str, int]) -> MoEMatch:
    """Describe the MoE block whose experts `topk` selects, or raise RuleRefused with the stage and check."""
    stage = RULE_CORE
    try:
        core = match_expert_core(topk, order, opset_imports)
        stage = RULE_ROUTING
        routing = match_routing(topk, core.weights_value)
        stage = RULE_BLOCK
        return assemble_block(topk, core, routing, order)
    except NoMatch as failure:
        raise RuleRefused(Refusal(stage, failure.check)) from None


def assemble_block(topk: ir.Node, core: ExpertCore, routing: Routing, order: dict[ir.Node, int]) -> MoEMatch:
    """Router + experts + routing (+ shared expert) -> the fused op's attributes, weights and boundary."""
    router = match_router(routing.logits)
    hidden = router.linear.input
    require(core.stream is hidden, "router and experts read different hidden states")
    require(hidden.dtype is not None and hidden.shape is not None, "hidden states have no known type")
    dtype: ir.DataType = hidden.dtype  # type: ignore[assignment]
    num_experts, hidden_size = router.linear.weight.shape()
    require(num_experts == core.num_experts, "router and expert tables disagree on the number of experts")
    require(
        rank(hidden) is not None and hidden.shape[-1] == hidden_size,  # type: ignore[index]
        "router weight does not match the hidden size",
    )
    group = routing.group
    if group is not None:
        group_size = num_experts // group.n_group
        require(num_experts % group.n_group == 0, "n_group does not divide the experts")
        require(group.group_size in (None, group_size), "group reshape disagrees with n_group")
        require(group.in_group_k == min(2, group_size), "groups are not scored by their top-2 sum")

    gate_up, gate_up_bias = _gate_up(core, num_experts, dtype)
    two_i, in_dim = gate_up.shape()[1], gate_up.shape()[2]
    require(in_dim == hidden_size and two_i % 2 == 0, "expert gate/up weights do not match the hidden size")
    intermediate = two_i // 2
    require(
        core.down.in_dim == intermediate and core.down.out_dim == hidden_size,
        "down projection shape mismatch",
    )
    down_bias = core.down.bias
    has_expert_bias = gate_up_bias is not None or down_bias is not None
    if has_expert_bias:
        gate_up_bias = gate_up_bias or L.zeros((num_experts, two_i), dtype)
        down_bias = down_bias or L.zeros((num_experts, hidden_size), dtype)

    output, shared = _block_output(core.output, hidden)
    externals: set[ir.Value] = set()
    nodes = backward_slice([output], [hidden], order, externals)
    shape_fixes, shape_only = _external_shape_reshapes(nodes, externals, hidden)
    require(topk in nodes, "the block output does not depend on the routing")
    raw_logits = router.logits
    logits_used_outside = raw_logits.is_graph_output() or any(c not in nodes for c in raw_logits.consumers())
    escaping = escaping_values(nodes, [output, raw_logits], hidden)
    require(
        not escaping, f"intermediate value '{escaping[0].name}' is used outside the block" if escaping else ""
    )

    weights: dict[str, L.Layout] = {
        "router_weight": router.linear.weight,
        "expert_gate_up_weight": gate_up,
        "expert_down_weight": core.down.weight,
    }
    if router.bias is not None:
        weights["router_bias"] = L.reshape(router.bias, (num_experts,))
    if routing.correction is not None:
        weights["score_correction_bias"] = L.reshape(L.source(routing.correction), (num_experts,))
    if gate_up_bias is not None and down_bias is not None:
        weights["expert_gate_up_bias"] = gate_up_bias
        weights["expert_down_bias"] = down_bias
    if shared is not None:
        weights["shared_gate_up_weight"] = shared.gate_up
        weights["shared_down_weight"] = shared.down
        if shared.gate is not None:
            weights["shared_gate_weight"] = shared.gate
    _to_hidden_dtype(weights, dtype)

    try:
        attrs = MoEAttributes(
            num_experts=num_experts,
            top_k=core.top_k,
            hidden_size=hidden_size,
            intermediate_size=intermediate,
            scoring=routing.scoring,
            topk_before_score=routing.topk_before_score,
            norm_topk_prob=routing.transforms.norm,
            n_group=group.n_group if group else 1,
            topk_group=group.topk_group if group else 1,
            routed_scaling_factor=routing.transforms.scale,
            activation=core.glu.activation,
            swiglu_alpha=core.glu.alpha,
            swiglu_limit=core.glu.limit,
            has_router_bias=router.bias is not None,
            has_score_correction_bias=routing.correction is not None,
            has_expert_bias=has_expert_bias,
            shared_intermediate_size=shared.size if shared else 0,
            has_shared_gate=bool(shared and shared.gate is not None),
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


def _gate_up(core: ExpertCore, num_experts: int, dtype: ir.DataType) -> tuple[L.Layout, L.Layout | None]:
    """The canonical [E, 2I, H] gate_up table (gate rows first) and its [E, 2I] bias, from the GLU's layout."""
    glu = core.glu
    if len(core.first) == 1:
        projection = core.first[0]
        gate_up, bias = projection.weight, projection.bias
        require(glu.layout in ("halves", "interleaved", "tied"), "unexpected GLU layout")
        if glu.layout == "interleaved":
            gate_up = L.deinterleave(gate_up, 1)
            bias = L.deinterleave(bias, 1) if bias is not None else None
        elif glu.layout == "tied":  # gate and up are one projection: store it twice, gate rows then up rows
            gate_up = L.concat([gate_up, gate_up], 1)
            bias = L.concat([bias, bias], 1) if bias is not None else None
        return gate_up, bias
    ordered = core.first if glu.layout == "separate" else core.first[::-1]
    gate_up = L.concat([p.weight for p in ordered], 1)
    if all(p.bias is None for p in ordered):
        return gate_up, None
    biases = [p.bias if p.bias is not None else L.zeros((num_experts, p.out_dim), dtype) for p in ordered]
    return gate_up, L.concat(biases, 1)


def _block_output(core_output: ir.Value, hidden: ir.Value) -> tuple[ir.Value, SharedExpert | None]:
    """The sum over k, then views, and at most one shared expert added: the value the fused op replaces."""
    output, shared = core_output, None
    while True:
        output = forward_through(output, VIEW_OR_CAST_OPS)  # half models sum in float32, then cast back
        consumer = single_consumer(output)
        if shared is not None or consumer is None or consumer.op_type != "Add":
            return output, shared
        other = other_input(consumer, output)
        if other is None:
            return output, shared
        try:
            shared = match_shared_expert(other, hidden)
        except NoMatch:
            return output, shared
        output = consumer.outputs[0]


def _to_hidden_dtype(weights: dict[str, L.Layout], dtype: ir.DataType) -> None:
    """The op takes every weight in the hidden states' dtype. Exporters fold Cast(half weight -> float32) for
    routers that compute in float32: such a table goes back without loss; one that would lose bits is refused."""
    for name, expr in list(weights.items()):
        found = _dtype_of(expr)
        if found in (None, dtype):
            continue
        require(
            _casts_exactly(expr, dtype),
            f"{name} is {found.name if found else '?'} with values that {dtype.name} cannot hold "
            "(the op takes every weight in the hidden states' dtype)",
        )
        weights[name] = L.cast(expr, dtype)


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
        return expr.source.dtype if expr.source is not None else None
    if expr.kind in ("zeros", "cast"):
        return expr.dtype
    return _dtype_of(expr.parts[0])
