"""Pass quantize: every fused node's experts stored in the asked format (codes, scales, zero points of the op's
layouts), the node's attributes and function body made for it, the native tables gone; refusals with reasons."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from moetrt_testing.graphs import exported_hf_block, fused_nodes, packed_inputs, rel_err, run_onnx

from moetrt.core.errors import MoetrtError
from moetrt.op.fused_node import check_fused_model
from moetrt.op.quant import dequantize, quantize
from moetrt.op.reference import moe_reference
from moetrt.op.spec import DOMAIN, DOMAIN_VERSION, FP8_BLOCK, INT4, MXFP4, MoEAttributes
from moetrt.passes import fuse_model
from moetrt.passes.quantize_experts import QuantizeExpertsPass, choose_block


@pytest.mark.parametrize(("fmt", "zero"), [(FP8_BLOCK, False), (INT4, False), (INT4, True), (MXFP4, False)])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_experts_are_stored_quantized_and_run(family: str, fmt: str, zero: bool) -> None:
    _module, exported = exported_hf_block(family)
    native = fuse_model(exported).model
    native_weights = packed_inputs(native, fused_nodes(native)[0])
    model = ir.serde.deserialize_model(native)
    intermediate = check_fused_model(native)[0].intermediate_size
    if fmt == MXFP4 and intermediate % 32:  # this tiny block's experts are narrower than an MXFP4 group
        with pytest.raises(MoetrtError, match="no mxfp4 group size fits"):
            QuantizeExpertsPass(fmt)(model)
        return
    result = QuantizeExpertsPass(fmt, zero_point=zero)(model)
    assert result.count == 1
    quantized = ir.serde.serialize_model(model)
    (attrs,) = check_fused_model(quantized)  # shapes of codes and scales checked against the attributes
    assert attrs.weight_format == fmt and attrs.has_weight_zero_point == zero
    stored = packed_inputs(quantized, fused_nodes(quantized)[0])
    assert stored["expert_gate_up_weight"].dtype == torch.uint8
    native_node = fused_nodes(native)[0]
    tables = {
        v
        for n, v in zip(check_fused_model(native)[0].present_inputs(), native_node.input)
        if n.endswith("weight") and n.startswith("expert_")
    }
    assert len(tables) == 2 and not tables & {i.name for i in quantized.graph.initializer}, (
        "native tables remain"
    )

    # The stored codes are the quantization of the native experts, and they dequantize close to them.
    k = attrs.hidden_size
    want = quantize(fmt, attrs.weight_block, native_weights["expert_gate_up_weight"].float(), zero)
    assert torch.equal(stored["expert_gate_up_weight"], want.codes)
    back = dequantize(fmt, attrs.weight_block, want, k)
    assert rel_err(back, native_weights["expert_gate_up_weight"].float()) < 0.2

    # onnxruntime runs the quantized body: the oracle on the same stored weights gives its output.
    hidden = torch.randn(7, k, generator=torch.Generator().manual_seed(3))
    hidden_name = quantized.graph.input[0].name
    got = run_onnx(quantized, {hidden_name: hidden.reshape(1, 7, k).numpy()})[0]
    ref = moe_reference({"hidden_states": hidden, **stored}, attrs)["output"]
    assert rel_err(np.asarray(got).reshape(7, k), ref) <= 1e-5


def test_block_choice_and_refusals() -> None:
    attrs = MoEAttributes(8, 2, 64, 96)
    assert choose_block(INT4, attrs, None) == 32  # 128 and 64 do not divide 96
    assert choose_block(FP8_BLOCK, attrs, None) == 128  # fp8 blocks pad ragged edges
    assert choose_block(MXFP4, attrs, None) == 32
    with pytest.raises(MoetrtError, match="does not fit"):
        choose_block(INT4, attrs, 48)
    with pytest.raises(MoetrtError, match="unknown expert weight format"):
        QuantizeExpertsPass("int8")
    with pytest.raises(MoetrtError, match="int4 weights only"):
        QuantizeExpertsPass(FP8_BLOCK, zero_point=True)


def test_scales_of_the_wrong_shape_are_refused() -> None:
    _module, exported = exported_hf_block("qwen3_moe")
    model = ir.serde.deserialize_model(fuse_model(exported).model)
    QuantizeExpertsPass(INT4)(model)
    proto = ir.serde.serialize_model(model)
    node = fused_nodes(proto)[0]
    attrs = check_fused_model(proto)[0]
    scale_name = dict(zip(attrs.present_inputs(), node.input))["expert_down_scale"]
    scale = next(i for i in proto.graph.initializer if i.name == scale_name)
    scale.dims[-1] += 1
    with pytest.raises(MoetrtError, match="do not match its attributes"):
        check_fused_model(proto)


def test_quantizing_a_version_1_model_writes_the_current_version() -> None:
    """A native model fused by op version 1 quantizes to 4-bit codes in this version's runs, and says so: the
    model then imports the domain at DOMAIN_VERSION and passes the fused-model check."""
    _module, exported = exported_hf_block("qwen3_moe")
    model = ir.serde.deserialize_model(fuse_model(exported).model)
    model.opset_imports[DOMAIN] = 1
    check_fused_model(ir.serde.serialize_model(model))  # native experts of version 1 still load
    assert QuantizeExpertsPass(INT4)(model).count == 1
    assert model.opset_imports[DOMAIN] == DOMAIN_VERSION
    (attrs,) = check_fused_model(ir.serde.serialize_model(model))
    assert attrs.weight_format == INT4
