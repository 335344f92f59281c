"""A one-node fused model: one `moetrt::MoE` node (with its function body) and its weights as initializers.

Exercises the plugin, the engine builders and the runtime on a single MoE block without exporting a whole
model. Input `hidden_states` [T, H] with a dynamic T; outputs as in `spec`.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from moetrt.core.dtypes import precision
from moetrt.op import spec
from moetrt.op.function_body import make_moe_function, make_moe_node, overload_name
from moetrt.op.reference import random_inputs

OPSET = 18
IR_VERSION = 10


def single_moe_model(
    attrs: spec.MoEAttributes, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """(model, weights) with random weights from `reference.random_inputs` (never zero)."""
    onnx_dtype = precision(dtype).onnx_type
    weights = random_inputs(attrs, 1, dtype=dtype, seed=seed)
    weights.pop("hidden_states")
    overload = overload_name(attrs)
    outputs = list(attrs.present_outputs())
    out_dims = {"output": ["T", attrs.hidden_size], "router_logits": ["T", attrs.num_experts]}
    graph = helper.make_graph(
        [make_moe_node(attrs, list(attrs.present_inputs()), outputs, overload, name="moe_0")],
        "moe_block",
        [helper.make_tensor_value_info("hidden_states", onnx_dtype, ["T", attrs.hidden_size])],
        [helper.make_tensor_value_info(name, onnx_dtype, out_dims[name]) for name in outputs],
        [_tensor(name, t) for name, t in weights.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(spec.DOMAIN, spec.DOMAIN_VERSION)],
        functions=[make_moe_function(attrs, overload, OPSET)],
        producer_name="moetrt",
    )
    model.ir_version = IR_VERSION
    return model, weights


def _tensor(name: str, t: torch.Tensor) -> onnx.TensorProto:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: write the raw 16-bit patterns
        raw = t.contiguous().view(torch.int16).numpy().astype(np.int16).tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
    return numpy_helper.from_array(t.numpy(), name)
