"""Rule moe_gather_experts + pass fuse_moe on the transformers MoE blocks of the seven demo families."""

from __future__ import annotations

import pytest
import torch
from moetrt_testing.graphs import (
    expert_table_gathers,
    exported_hf_block,
    fused_nodes,
    node_attributes,
    packed_inputs,
    rel_err,
    run_onnx,
)

from moetrt.op.reference import moe_reference
from moetrt.op.spec import PLUGIN_NAMESPACE, PLUGIN_VERSION, MoEAttributes
from moetrt.passes import fuse_model

# What each family's router / experts must become (the rest of the attributes keep their defaults).
EXPECTED: dict[str, dict[str, object]] = {
    "qwen3_moe": {"norm_topk_prob": True},
    "mixtral": {"norm_topk_prob": True},
    "olmoe": {"norm_topk_prob": False},
    "qwen2_moe": {"shared_intermediate_size": 24, "has_shared_gate": True},
    "qwen3_next": {"norm_topk_prob": True, "shared_intermediate_size": 24, "has_shared_gate": True},
    "deepseek_v3": {
        "scoring": "sigmoid",
        "n_group": 4,
        "topk_group": 2,
        "has_score_correction_bias": True,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "shared_intermediate_size": 16,
    },
    "gpt_oss": {
        "topk_before_score": True,
        "activation": "swiglu_clamped",
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "has_router_bias": True,
        "has_expert_bias": True,
    },
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_block_fuses_with_expected_attributes(family: str) -> None:
    module, model = exported_hf_block(family)
    result = fuse_model(model)
    nodes = fused_nodes(result.model)
    assert result.num_fused == 1 and len(nodes) == 1, result.unfused_candidates
    assert not expert_table_gathers(result.model)
    raw = node_attributes(nodes[0])
    assert (
        raw["plugin_version"] == PLUGIN_VERSION.encode()
        and raw["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
    )
    attrs = MoEAttributes.from_onnx_attributes(raw)
    expected = {"num_experts": 8, "top_k": 2, "hidden_size": 32, **EXPECTED[family]}
    assert {k: getattr(attrs, k) for k in expected} == pytest.approx(expected)
    defaults = MoEAttributes(
        num_experts=8, top_k=2, hidden_size=32, intermediate_size=attrs.intermediate_size
    )
    for key in (
        "scoring",
        "activation",
        "n_group",
        "has_router_bias",
        "has_expert_bias",
        "output_router_logits",
    ):
        if key not in expected:
            assert getattr(attrs, key) == getattr(defaults, key), key
    assert nodes[0].overload and any(f.overload == nodes[0].overload for f in result.model.functions)
    assert result.model.ir_version <= 10

    for shape in [(1, 1), (2, 5), (3, 17)]:
        x = torch.randn(*shape, 32, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            want = module(x)
        got = run_onnx(result.model, {model.graph.input[0].name: x.numpy()})[0]
        assert rel_err(got, want) <= 1e-5
        # The attributes and the packed weights alone reproduce the block (what a kernel would compute).
        inputs = {"hidden_states": x.reshape(-1, 32), **packed_inputs(result.model, nodes[0])}
        ref = moe_reference(inputs, attrs, compute_dtype=torch.float64)["output"]
        assert rel_err(ref.reshape(want.shape), want) <= 1e-5


def test_unfused_input_is_not_modified() -> None:
    _, model = exported_hf_block("mixtral")
    before = model.SerializeToString()
    fuse_model(model)
    assert model.SerializeToString() == before
