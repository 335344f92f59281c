"""Inline every fused `moetrt::MoE` node back into its standard-op function body."""

from __future__ import annotations

import onnx
import onnx.inliner

from moetrt.op.spec import DOMAIN, OP_TYPE


def count_fused(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)


def decompose_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose fused MoE nodes are replaced by their function bodies (standard ops only)."""
    inlined = onnx.inliner.inline_selected_functions(model, [(DOMAIN, OP_TYPE)], exclude=False)
    kept = [f for f in inlined.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del inlined.functions[:]
    inlined.functions.extend(kept)
    if not any(n.domain == DOMAIN for n in inlined.graph.node) and not any(f.domain == DOMAIN for f in kept):
        opsets = [o for o in inlined.opset_import if o.domain != DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(opsets)
    return inlined
