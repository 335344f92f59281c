"""Level two of rule `moe_gather_experts`: the routing that feeds the TopK, read back from the routing weights.

First the weight transforms after the selection are peeled off (a constant scaling `Mul`, a renorm `Div` by the
weights' own sum), then the ordered `ROUTING_RULES` are tried; the first whose form applies decides:

    TopKValues(scoring)       weights = TopK(softmax|sigmoid(logits)).values            (Mixtral, Qwen, OLMoE)
    SoftmaxOfTopK()           weights = softmax(TopK(logits).values)                    (GPT-OSS)
    GatheredScores(scoring)   weights = GatherElements(scores, TopK(choice).indices),
                              choice = scores (+ correction bias) (group-masked)        (DeepSeek-V3, GLM)

Each rule is a small class in the onnxscript style: `applies` says whether the weights have its form, `check`
raises NoMatch(check) when a detail is outside the op.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from moetrt.passes.graph_utils import (
    VIEW_OR_CAST_OPS,
    NoMatch,
    attr_int,
    back_through,
    const_array,
    const_scalar,
    is_const,
    operand,
    producer_node,
    producer_op,
    rank,
    require,
)
from moetrt.passes.moe_rule.results import GroupMask, Routing, WeightTransforms

SCORINGS = {"Softmax": "softmax", "Sigmoid": "sigmoid"}
_EPSILON = 1e-6  # what a renorm may add to (or clamp) its denominator


class RoutingRule:
    """One routing form. `applies(weights, topk)` is a cheap structural test; `check` reads the variant."""

    name = "routing"

    def applies(self, weights: ir.Value, topk: ir.Node) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, weights: ir.Value, topk: ir.Node, transforms: WeightTransforms) -> Routing:
        raise NotImplementedError  # pragma: no cover - abstract


class TopKValues(RoutingRule):
    """The TopK values are the weights: TopK reads softmax (or sigmoid) scores of the logits."""

    def __init__(self, scoring: str) -> None:
        self.scoring = scoring
        self.name = f"topk_values/{scoring}"

    def applies(self, weights: ir.Value, topk: ir.Node) -> bool:
        return (
            weights is topk.outputs[0] and SCORINGS.get(producer_op(_topk_input(topk)) or "") == self.scoring
        )

    def check(self, weights: ir.Value, topk: ir.Node, transforms: WeightTransforms) -> Routing:
        scores = _topk_input(topk)
        _check_softmax_axis(scores)
        logits = operand(producer_node(scores, "scores have no producer"), 0)
        return Routing(self.scoring, logits, transforms=transforms)


class SoftmaxOfTopK(RoutingRule):
    """Top-k of the logits first, then a softmax over the k values (no renorm, no scaling)."""

    name = "softmax_of_topk"

    def applies(self, weights: ir.Value, topk: ir.Node) -> bool:
        node = weights.producer()
        return (
            node is not None
            and producer_op(weights) == "Softmax"
            and node.inputs[0] is not None
            and back_through(node.inputs[0], VIEW_OR_CAST_OPS) is topk.outputs[0]
        )

    def check(self, weights: ir.Value, topk: ir.Node, transforms: WeightTransforms) -> Routing:
        _check_softmax_axis(weights)
        require(
            transforms.scale == 1.0, "a routed scaling factor with top-k before softmax is not part of the op"
        )
        logits = operand(topk, 0)
        # A renorm of softmax outputs divides by 1: the op computes the same without it.
        return Routing("softmax", logits, topk_before_score=True, transforms=WeightTransforms())


class GatheredScores(RoutingRule):
    """Scores gathered at the ids TopK chose from them (plus a correction bias, minus masked groups)."""

    def __init__(self, scoring: str) -> None:
        self.scoring = scoring
        self.name = f"gathered_scores/{scoring}"

    def applies(self, weights: ir.Value, topk: ir.Node) -> bool:
        if producer_op(weights) != "GatherElements":
            return False
        gather = producer_node(weights, "")
        scores = back_through(operand(gather, 0), VIEW_OR_CAST_OPS)
        # Unknown scorings fall to the softmax instance, whose check names the problem.
        kind = SCORINGS.get(producer_op(scores) or "", "softmax")
        return kind == self.scoring

    def check(self, weights: ir.Value, topk: ir.Node, transforms: WeightTransforms) -> Routing:
        gather = producer_node(weights, "")
        require(
            back_through(operand(gather, 1), VIEW_OR_CAST_OPS) is topk.outputs[1],
            "weights gathered at indices other than TopK's",
        )
        require(
            attr_int(gather, "axis", 0) in (-1, 1), "weights gathered along an axis other than the experts"
        )
        scores = back_through(operand(gather, 0), VIEW_OR_CAST_OPS)
        require(producer_op(scores) in SCORINGS, "gathered weights are not softmax/sigmoid scores")
        _check_softmax_axis(scores)
        logits = operand(producer_node(scores, ""), 0)
        choice = _topk_input(topk)
        group = None
        if producer_op(choice) == "Where":
            group, choice = _match_group_mask(choice)
        correction = None
        if producer_op(choice) == "Add":
            add = producer_node(choice, "")
            a, b = (back_through(operand(add, i), VIEW_OR_CAST_OPS) for i in (0, 1))
            correction = b if a is scores else a if b is scores else None
            require(correction is not None and is_const(correction), "TopK reads scores plus a non-constant")
            choice = scores
        require(choice is scores, "TopK does not read the (corrected, group-masked) scores")
        return Routing(self.scoring, logits, transforms=transforms, group=group, correction=correction)


# Tried in order; the first rule whose form applies decides (its failed check is the candidate's reason).
ROUTING_RULES: Sequence[RoutingRule] = (
    TopKValues("softmax"),
    TopKValues("sigmoid"),
    SoftmaxOfTopK(),
    GatheredScores("softmax"),
    GatheredScores("sigmoid"),
)
NO_ROUTING_FORM = (
    "routing weights are not TopK values, softmax of TopK values, or scores gathered at the TopK ids"
)


def match_routing(topk: ir.Node, weights: ir.Value) -> Routing:
    """Routing weights [T, k] back to the router logits, or NoMatch(check)."""
    value, transforms = _peel_transforms(weights)
    for rule in ROUTING_RULES:
        if rule.applies(value, topk):
            return rule.check(value, topk, transforms)
    if value is topk.outputs[0]:
        raise NoMatch("TopK values are used as weights but TopK does not read softmax/sigmoid scores")
    raise NoMatch(NO_ROUTING_FORM)


def _topk_input(topk: ir.Node) -> ir.Value:
    return back_through(operand(topk, 0), VIEW_OR_CAST_OPS)


def _peel_transforms(weights: ir.Value) -> tuple[ir.Value, WeightTransforms]:
    """Strip `weights * scale` and `weights / (sum(weights) + eps)`; return what is left and what was stripped."""
    value, scale, norm = weights, 1.0, False
    if producer_op(value) == "Mul":
        node = producer_node(value, "")
        consts = [const_scalar(v) for v in node.inputs]
        require(any(c is not None for c in consts), "routing weights are multiplied by a non-constant")
        idx = 0 if consts[0] is not None else 1
        scale = float(consts[idx])  # type: ignore[arg-type]
        value = back_through(operand(node, 1 - idx), VIEW_OR_CAST_OPS)
    if producer_op(value) == "Div":
        node = producer_node(value, "")
        numer = back_through(operand(node, 0), VIEW_OR_CAST_OPS)
        denom = _renorm_sum(back_through(operand(node, 1), VIEW_OR_CAST_OPS))
        require(
            producer_op(denom) == "ReduceSum", "routing weights are divided by something other than their sum"
        )
        red = producer_node(denom, "")
        require(
            back_through(operand(red, 0), VIEW_OR_CAST_OPS) is numer,
            "renorm divides by the sum of another tensor",
        )
        axes = const_array(red.inputs[1]) if len(red.inputs) > 1 else None
        require(
            axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, (rank(numer) or 2) - 1),
            "renorm sums over an axis other than k",
        )
        norm, value = True, numer
    return value, WeightTransforms(norm=norm, scale=scale)


def _renorm_sum(denom: ir.Value) -> ir.Value:
    """The sum under `sum + eps`, `max(sum, eps)` or `clip(sum, min=eps)` (ERNIE-4.5): all equal the op's
    `sum + 1e-20` unless the k weights sum below eps."""
    kind = producer_op(denom)
    if kind == "Add":
        add = producer_node(denom, "")
        eps = [const_scalar(v) for v in add.inputs]
        require(
            any(e is not None and abs(e) <= _EPSILON for e in eps), "renorm denominator adds a non-epsilon"
        )
        return back_through(operand(add, 1 if eps[0] is not None else 0), VIEW_OR_CAST_OPS)
    if kind == "Clip":
        clip = producer_node(denom, "")
        require(len(clip.inputs) < 3 or clip.inputs[2] is None, "renorm denominator is clamped above")
        floor, inner = const_scalar(clip.inputs[1]) if len(clip.inputs) > 1 else None, operand(clip, 0)
    elif kind == "Max":
        node = producer_node(denom, "")
        require(len(node.inputs) == 2, "renorm denominator is a Max of more than two values")
        values = [const_scalar(v) for v in node.inputs]
        floor = values[0] if values[0] is not None else values[1]
        inner = operand(node, 1 if values[0] is not None else 0)
    else:
        return denom
    require(floor is not None and 0 <= floor <= _EPSILON, "renorm denominator is clamped to a non-epsilon")
    return back_through(inner, VIEW_OR_CAST_OPS)


def _check_softmax_axis(value: ir.Value) -> None:
    node = value.producer()
    if node is not None and node.op_type == "Softmax":
        axis = attr_int(node, "axis", -1)
        require(axis == -1 or axis == (rank(value) or 2) - 1, "softmax over an axis other than the experts")


def _match_group_mask(where_out: ir.Value) -> tuple[GroupMask, ir.Value]:
    """Where(mask, choice, -inf) from grouped top-k: read n_group / topk_group; return the mask and `choice`."""
    node = producer_node(where_out, "")
    cond, a, b = (operand(node, i) for i in range(3))
    fill_a, fill_b = const_scalar(a), const_scalar(b)
    fill, choice = (fill_a, b) if fill_a is not None else (fill_b, a)
    require(fill is not None and fill <= -1e30, "experts outside the chosen groups are not masked with -inf")
    choice = back_through(choice, VIEW_OR_CAST_OPS)
    # The mask is computed from `choice`: reshape to [T, G, E/G], top-2 per group summed, top-k groups.
    n_group, group_size = 1, None
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
        if producer.op_type == "Reshape" and back_through(operand(producer, 0), VIEW_OR_CAST_OPS) is choice:
            shape = const_array(producer.inputs[1])
            if shape is not None and shape.size == 3:
                group_size = int(shape[2]) if shape[2] > 0 else None
                n_group = int(shape[1])
        if producer.op_type == "TopK":
            topk_ks.append((int(const_scalar(producer.inputs[1]) or 0), rank(producer.inputs[0])))
        stack.extend(v for v in producer.inputs if v is not None)
    require(len(topk_ks) == 2, "the expert mask is not a grouped top-k")
    group_topk = [kk for kk, r in topk_ks if r == 2]
    require(len(group_topk) == 1, "could not tell the group top-k from the in-group top-k")
    in_group_k = next(kk for kk, r in topk_ks if r != 2)
    # One group (n_group = topk_group = 1, as several released configs ship): the mask keeps every expert, so
    # the routing is the ungrouped one; the block's numeric check confirms it.
    require(n_group > 1 or group_topk[0] == 1, "a single expert group with a group top-k other than 1")
    return GroupMask(n_group, group_topk[0], group_size, in_group_k), choice
