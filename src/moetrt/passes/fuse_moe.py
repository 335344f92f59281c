"""Pass `fuse_moe`: replace each recognised MoE block with one `moetrt::MoE` node.

Cases rewritten (rule `moe_gather_experts`, see moe_rule/): softmax | sigmoid routing, top-k before or
after the softmax, renormalised and scaled top-k weights, grouped top-k with score-correction bias, router
bias, SiLU / GELU / GELU-tanh / clamped-SwiGLU experts with fused, interleaved, separate or tied (one table
for both) gate/up weights and optional biases, a shared expert with an optional sigmoid gate, router logits
read outside the block, and fp16 / bf16 blocks that route in float32 (upcast Casts, float32 router tables
that hold half values exactly).

The fused node reads the block's hidden states flattened to [T, H] and its weights in the canonical layouts
of spec.py (made by standard layout ops that the packing pass folds); its output is reshaped back (and cast
back when the block ended in another dtype). Each variant gets a model-local function (the standard-op body)
told apart by `overload`. A block is rewritten only when its fused form gives the same values as the
original on random hidden states (numeric_check.py; fp16 / bf16 pieces run in a float32 shadow).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from moetrt.core.artifacts import NODE_NAME_SCOPES, node_scopes
from moetrt.core.tolerances import FUSION_CHECK_TOLERANCE
from moetrt.op.function_body import MIN_OPSET, make_moe_function, overload_name
from moetrt.op.spec import DOMAIN, DOMAIN_VERSION, OP_TYPE
from moetrt.passes import layout as L
from moetrt.passes.base import (
    CountedPass,
    CountedPassResult,
    UnfusedCandidate,
    node_order,
    opset_imports,
)
from moetrt.passes.graph_utils import NoMatch, rank
from moetrt.passes.moe_rule import (
    RULE_BLOCK,
    RULE_CORE,
    RULE_NUMERIC,
    MoEMatch,
    RuleRefused,
    expert_gathers,
    is_expert_gather,
    match_moe_block,
)
from moetrt.passes.numeric_check import block_error


class FuseMoEPass(CountedPass):
    """Fuse every MoE block the rule recognises; list the others with the check that failed."""

    name = "fuse_moe"

    def __init__(self, numeric_check: bool = True, max_check_bytes: int = 1 << 30) -> None:
        super().__init__()
        self.numeric_check = numeric_check
        self.max_check_bytes = max_check_bytes  # blocks with more weight bytes rely on the structural match

    def call(self, model: ir.Model) -> CountedPassResult:
        graph = model.graph
        opsets = opset_imports(model)
        order = node_order(graph)
        unfused: list[UnfusedCandidate] = []
        claimed: set[ir.Node] = set()
        topks = [n for n in graph if n.op_type == "TopK" and n.domain == "" and len(n.outputs) == 2]
        anchors = [(t, g) for t in topks if (g := expert_gathers(t.outputs[1]))]
        for _, gathers in anchors:
            claimed.update(gathers)
        for node in graph:
            if is_expert_gather(node) and rank(node.inputs[0]) == 3 and node not in claimed:
                unfused.append(
                    UnfusedCandidate(
                        _where(node),
                        RULE_CORE,
                        "expert weights are gathered by indices that do not come from a TopK",
                    )
                )
        if opsets.get("", 0) < MIN_OPSET and anchors:
            for topk, _ in anchors:
                unfused.append(UnfusedCandidate(_where(topk), RULE_BLOCK, f"model opset < {MIN_OPSET}"))
            return CountedPassResult(model, False, 0, unfused)

        names = _ValueNames(graph)
        fused = 0
        for topk, _ in anchors:
            try:
                match = match_moe_block(topk, order, opsets)
            except RuleRefused as refused:
                unfused.append(UnfusedCandidate(_where(topk), refused.refusal.rule, refused.refusal.check))
                continue
            try:
                self._rewrite(model, match, f"moe{fused}", names, opsets, order)
            except NoMatch as failure:
                unfused.append(UnfusedCandidate(_where(topk), RULE_NUMERIC, failure.check))
                continue
            fused += 1
        if fused:
            model.opset_imports[DOMAIN] = DOMAIN_VERSION
            common_passes.RemoveUnusedNodesPass()(model)
        return CountedPassResult(model, fused > 0, fused, unfused)

    def _rewrite(
        self,
        model: ir.Model,
        match: MoEMatch,
        prefix: str,
        names: _ValueNames,
        opsets: dict[str, int],
        order: dict[ir.Node, int],
    ) -> None:
        new_nodes: list[ir.Node] = []
        check_nodes: list[ir.Node] = []
        try:
            self._build_and_check(match, prefix, names, opsets, order, new_nodes, check_nodes)
        except NoMatch:
            _detach(new_nodes)  # not inserted: they must not stay registered as readers of graph values
            raise
        finally:
            _detach(check_nodes)
        self._insert(model, match, new_nodes, names)

    def _build_and_check(
        self,
        match: MoEMatch,
        prefix: str,
        names: _ValueNames,
        opsets: dict[str, int],
        order: dict[ir.Node, int],
        new_nodes: list[ir.Node],
        check_nodes: list[ir.Node],
    ) -> None:
        attrs = match.attrs
        prefix = names.unique(prefix)
        overload = overload_name(attrs)

        def add(op_type: str, inputs: list[ir.Value], name: str, **attributes: object) -> ir.Value:
            node = ir.node(op_type, inputs, attributes or None, name=f"{prefix}/{name}")  # type: ignore[arg-type]
            node.outputs[0].name = names.unique(f"{prefix}/{name}")
            new_nodes.append(node)
            return node.outputs[0]

        def const(values: list[int], name: str) -> ir.Value:
            return add("Constant", [], name, value=ir.tensor(np.asarray(values, dtype=np.int64)))

        hidden = match.hidden
        flat = hidden
        if rank(hidden) != 2:
            flat = add("Reshape", [hidden, const([-1, attrs.hidden_size], "flat_shape")], "hidden_flat")
        inputs = [flat]
        for input_name in attrs.present_inputs()[1:]:
            start = len(new_nodes)
            inputs.append(L.emit(match.weights[input_name], f"{prefix}/{input_name}", new_nodes))
            for node in new_nodes[start:]:  # layout ops and their constants
                for out in node.outputs:
                    out.name = names.unique(out.name or f"{prefix}/{input_name}")
                node.name = node.outputs[0].name
        moe = ir.node(
            OP_TYPE,
            inputs,
            attrs.to_onnx_attributes(),
            domain=DOMAIN,
            overload=overload,
            num_outputs=len(attrs.present_outputs()),
            name=f"{prefix}/MoE",
        )
        for out, out_name in zip(moe.outputs, attrs.present_outputs()):
            out.name = names.unique(f"{prefix}/{out_name}")
        new_nodes.append(moe)
        new_output = moe.outputs[0]
        if rank(match.output) != 2:
            new_output = add("Reshape", [moe.outputs[0], add("Shape", [hidden], "hidden_shape")], "output")
        if match.output.dtype not in (None, hidden.dtype):  # the block ends in another dtype than it starts
            new_output = add("Cast", [new_output], "output_cast", to=match.output.dtype)
        pairs = [(match.output, new_output)]
        if match.router_logits is not None:
            if rank(match.router_logits) != 2:
                raise NoMatch("router logits read outside the block are not [T, E]")
            logits_out = moe.outputs[1]
            if match.router_logits.dtype not in (None, hidden.dtype):  # a router computing in float32
                logits_out = add("Cast", [logits_out], "router_logits_cast", to=match.router_logits.dtype)
            pairs.append((match.router_logits, logits_out))

        function = make_moe_function(attrs, overload, opset=opsets.get("", 18))
        match.function, match.pairs = function, pairs
        if self.numeric_check and _weight_bytes(match) <= self.max_check_bytes:
            # Node positions from before any rewrite of this pass still order the block's own nodes.
            original = _nodes_for_check(
                match, sorted(match.nodes, key=lambda n: order.get(n, 0)), names, check_nodes
            )
            check_opsets = {**opsets, DOMAIN: 1}
            error = block_error(original, new_nodes, hidden, pairs, check_opsets, [function])
            if not error <= FUSION_CHECK_TOLERANCE:
                raise NoMatch(
                    f"fused op differs from the block on random inputs (relative error {error:.2e})"
                )

    def _insert(self, model: ir.Model, match: MoEMatch, new_nodes: list[ir.Node], names: _ValueNames) -> None:
        function, pairs = match.function, match.pairs
        assert function is not None
        overload = function.overload
        anchor = match.output.producer()
        assert anchor is not None
        scopes = _block_scopes(match.nodes)
        if scopes:
            for node in new_nodes:
                node.metadata_props[NODE_NAME_SCOPES] = repr([*scopes, node.name or ""])
        model.graph.insert_before(anchor, new_nodes)
        for old, new in pairs:
            old_name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = names.unique(f"{old_name}_unfused")
            new.name = old_name
        key = (DOMAIN, OP_TYPE, overload)
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(function)


class _ValueNames:
    """Fresh value names that collide with nothing in the graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken: set[str] = {v.name for v in graph.inputs if v.name}
        self.taken.update(graph.initializers)
        for node in graph:
            self.taken.update(v.name for v in node.outputs if v.name)

    def unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.taken:
            candidate, i = f"{name}_{i}", i + 1
        self.taken.add(candidate)
        return candidate


def _nodes_for_check(
    match: MoEMatch, ordered: list[ir.Node], names: _ValueNames, check_nodes: list[ir.Node]
) -> list[ir.Node]:
    """The block's nodes, with reshapes to an outside-computed shape retargeted to Shape(hidden).

    The stand-in nodes are appended to `check_nodes`; the caller detaches them after the check.
    """
    if not match.shape_fixes:
        return ordered
    shape = ir.node("Shape", [match.hidden])
    shape.outputs[0].name = names.unique("check/hidden_shape")
    check_nodes.append(shape)
    nodes = [shape]
    for node in ordered:
        if node in match.shape_only:
            continue
        if node in match.shape_fixes:
            copy = ir.node("Reshape", [node.inputs[0], shape.outputs[0]])
            copy.outputs[0].name = node.outputs[0].name
            check_nodes.append(copy)
            nodes.append(copy)
        else:
            nodes.append(node)
    return nodes


def _block_scopes(nodes: Iterable[ir.Node]) -> list[str]:
    """The module scopes every node of the block ran in (root first, down to the block's own module)."""
    common: list[str] | None = None
    for node in nodes:
        text = node.metadata_props.get(NODE_NAME_SCOPES)
        scopes = node_scopes(text) if text else []
        if not scopes:  # nodes the exporter's optimiser made carry no scopes
            continue
        if common is None:
            common = scopes
        else:
            length = 0
            while length < min(len(common), len(scopes)) and common[length] == scopes[length]:
                length += 1
            common = common[:length]
    return common or []


def _detach(nodes: list[ir.Node]) -> None:
    """Drop the uses that nodes outside the graph hold on graph values (onnx-ir tracks every reader)."""
    for node in nodes:
        for index in range(len(node.inputs)):
            node.replace_input_with(index, None)


def _where(node: ir.Node) -> str:
    return f"{node.name or '<unnamed>'} ({node.op_type})"


def _weight_bytes(match: MoEMatch) -> int:
    total = 0
    for node in match.nodes:
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                total += value.const_value.nbytes
    return total
