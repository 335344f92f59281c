"""Inline every fused `moetrt::MoE` node back into its standard-op function body (onnx-ir, any model size)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from moetrt.op.spec import DOMAIN, OP_TYPE


def count_fused(model: onnx.ModelProto | ir.Model) -> int:
    """How many fused MoE nodes the main graph of `model` (a proto or an onnx-ir model) holds."""
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    return sum(1 for n in nodes if n.domain == DOMAIN and n.op_type == OP_TYPE)


def decompose_ir(model: ir.Model) -> int:
    """Inline the fused MoE nodes of `model` in place (their functions go, and the moetrt opset when nothing of
    it is left); returns how many nodes were inlined."""
    count = count_fused(model)
    common_passes.InlinePass(criteria=lambda f: f.domain == DOMAIN and f.name == OP_TYPE)(model)
    for key in [k for k in model.functions if k[0] == DOMAIN and k[1] == OP_TYPE]:
        del model.functions[key]
    if not any(n.domain == DOMAIN for n in model.graph.all_nodes()) and not any(
        f.domain == DOMAIN for f in model.functions.values()
    ):
        model.opset_imports.pop(DOMAIN, None)
    return count


def decompose_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose fused MoE nodes are replaced by their function bodies (standard ops only)."""
    ir_model = ir.serde.deserialize_model(model)
    decompose_ir(ir_model)
    return ir.serde.serialize_model(ir_model)
