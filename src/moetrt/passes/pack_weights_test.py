"""Pass pack_weights: canonical layouts (spec.py), each expert weight stored once."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from moetrt_testing.graphs import exported_hf_block, fused_nodes, initializer_arrays, packed_inputs

from moetrt.passes import fuse_model
from moetrt.passes.pipeline import fuse_ir


def test_gpt_oss_gate_up_is_transposed_and_deinterleaved() -> None:
    module, model = exported_hf_block("gpt_oss")
    experts = module.inner.experts
    result = fuse_model(model)
    stats = {s.name: s.count for s in result.stats}
    assert stats["pack_weights"] >= 3  # gate_up weight, its bias, down weight
    packed = packed_inputs(result.model, fused_nodes(result.model)[0])
    gate_up = experts.gate_up_proj.detach()  # [E, H, 2I], gate/up interleaved along the last axis
    want = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1).transpose(1, 2)
    assert torch.equal(packed["expert_gate_up_weight"], want.contiguous())
    bias = experts.gate_up_proj_bias.detach()
    assert torch.equal(packed["expert_gate_up_bias"], torch.cat([bias[..., 0::2], bias[..., 1::2]], dim=-1))
    assert torch.equal(packed["expert_down_weight"], experts.down_proj.detach().transpose(1, 2).contiguous())


def test_each_weight_stored_once_and_contiguous() -> None:
    _, model = exported_hf_block("gpt_oss")
    result = fuse_model(model)
    arrays = initializer_arrays(result.model)
    tables = [a for a in arrays.values() if a.ndim == 3]
    assert len(tables) == 2  # packed gate_up + down; the original transposed tables are gone
    total = sum(a.nbytes for a in arrays.values())
    original = sum(a.nbytes for a in initializer_arrays(model).values())
    assert total <= original
    node = fused_nodes(result.model)[0]
    assert all(name in arrays for name in node.input[1:])  # every weight input is an initializer
    assert all(arrays[n].flags.c_contiguous for n in node.input[1:])


def test_shared_expert_packed_gate_then_up() -> None:
    module, model = exported_hf_block("qwen2_moe")
    result = fuse_model(model)
    packed = packed_inputs(result.model, fused_nodes(result.model)[0])
    shared = module.inner.shared_expert
    want = torch.cat([shared.gate_proj.weight, shared.up_proj.weight], dim=0).detach()
    np.testing.assert_array_equal(packed["shared_gate_up_weight"].numpy(), want.numpy())
    np.testing.assert_array_equal(
        packed["shared_down_weight"].numpy(), shared.down_proj.weight.detach().numpy()
    )


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe", "deepseek_v3"])  # layouts that need packing
def test_packed_weights_are_lazy_and_their_declared_shapes_hold(family: str) -> None:
    """Packed weights are computed when written (memory bounded by one weight at any model size): the shape
    and dtype each declares without evaluating must be what evaluating it gives."""
    _, model = exported_hf_block(family)
    ir_model = ir.serde.deserialize_model(model)
    fuse_ir(ir_model)
    lazy = [
        v.const_value
        for v in ir_model.graph.initializers.values()
        if isinstance(v.const_value, ir.LazyTensor)
    ]
    assert lazy
    for tensor in lazy:
        array = tensor.numpy()
        assert (
            tuple(array.shape) == tuple(tensor.shape) and ir.DataType.from_numpy(array.dtype) == tensor.dtype
        )
