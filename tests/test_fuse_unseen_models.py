"""Item 4: an MoE the project has never seen, written by hand (not transformers) in the batched_mm gather form,
fuses without new code; the same module with an activation the op does not cover stays unfused, explained.

The module differs from every demo family on purpose: expert tables stored [E, in, out] and used as
`x @ W`, `y[:, 0]` instead of squeeze after the batched matmul, GELU-tanh GLU, renormalised top-3 of six
experts, routing weights applied after reshaping to [T, k, H].
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from moetrt_testing.graphs import (
    expert_table_gathers,
    export_module,
    fused_nodes,
    node_attributes,
    packed_inputs,
    rel_err,
    run_onnx,
)
from torch import nn

from moetrt.cli import main
from moetrt.op.reference import moe_reference
from moetrt.op.spec import MoEAttributes
from moetrt.passes import FuseResult, fuse_model

HIDDEN, EXPERTS, TOP_K, INTER = 24, 6, 3, 10


class UserMoE(nn.Module):
    def __init__(self, activation: str = "gelu_tanh") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.activation = activation
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=g) * 0.3)
        self.w_in = nn.Parameter(torch.randn(EXPERTS, HIDDEN, 2 * INTER, generator=g) * 0.3)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, INTER, HIDDEN, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, HIDDEN)
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(TOP_K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        sel = idx.flatten()
        xs = x.repeat_interleave(TOP_K, 0)
        h = torch.bmm(xs[:, None], self.w_in[sel])[:, 0]
        a, b = h.chunk(2, -1)
        h = (F.gelu(a, approximate="tanh") if self.activation == "gelu_tanh" else torch.relu(a)) * b
        y = torch.bmm(h[:, None], self.w_out[sel])[:, 0]
        y = (y.view(-1, TOP_K, HIDDEN) * w[..., None]).sum(1)
        return y.view(shape)


class EinsumMoE(nn.Module):
    """Experts as einsum over gathered [T, k, out, in] tables (ids not flattened), softmax top-k, no renorm."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.router = nn.Parameter(torch.randn(EXPERTS, HIDDEN, generator=g) * 0.3)
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.3)
        self.down = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, HIDDEN)
        weights, ids = torch.topk(torch.softmax(x @ self.router.T, dim=-1), TOP_K, dim=-1)
        gate, up = torch.einsum("th,tkih->tki", x, self.gate_up[ids]).chunk(2, dim=-1)
        y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, self.down[ids])
        return (y * weights.unsqueeze(-1)).sum(1).reshape(shape)


def test_einsum_experts_fuse() -> None:
    module = EinsumMoE().eval()
    model = export_module(module, HIDDEN)
    result = fuse_model(model)
    assert result.num_fused == 1 and not result.unfused_candidates, result.unfused_candidates
    attrs = MoEAttributes.from_onnx_attributes(node_attributes(fused_nodes(result.model)[0]))
    assert (attrs.activation, attrs.norm_topk_prob, attrs.top_k) == ("silu_glu", False, TOP_K)
    for batch, seq in [(1, 1), (2, 7), (3, 20)]:
        x = torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = module(x)
        got = run_onnx(result.model, {model.graph.input[0].name: x.numpy()})[0]
        assert rel_err(got, want) <= 1e-5


def test_hand_written_moe_fuses_without_new_code() -> None:
    module = UserMoE().eval()
    model = export_module(module, HIDDEN)
    result = fuse_model(model)
    assert result.num_fused == 1 and not result.unfused_candidates, result.unfused_candidates
    assert not expert_table_gathers(result.model)
    (node,) = fused_nodes(result.model)
    attrs = MoEAttributes.from_onnx_attributes(node_attributes(node))
    assert (attrs.num_experts, attrs.top_k, attrs.hidden_size, attrs.intermediate_size) == (
        EXPERTS,
        TOP_K,
        HIDDEN,
        INTER,
    )
    assert attrs.activation == "gelu_tanh_glu" and attrs.norm_topk_prob and attrs.scoring == "softmax"
    packed = packed_inputs(result.model, node)
    # Stored [E, H, 2I] for x @ W: packed to the canonical [E, 2I, H].
    assert torch.equal(packed["expert_gate_up_weight"], module.w_in.detach().transpose(1, 2).contiguous())
    for batch, seq in [(1, 1), (2, 7), (4, 33)]:
        x = torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(batch + seq))
        with torch.no_grad():
            want = module(x)
        got = run_onnx(result.model, {model.graph.input[0].name: x.numpy()})[0]
        assert rel_err(got, want) <= 1e-5
        ref = moe_reference({"hidden_states": x.reshape(-1, HIDDEN), **packed}, attrs, torch.float64)[
            "output"
        ]
        assert rel_err(ref.reshape(want.shape), want) <= 1e-5


@pytest.mark.parametrize("explain", [True, False])
def test_unsupported_activation_is_explained_not_fused(tmp_path: Path, explain: bool) -> None:
    module = UserMoE(activation="relu").eval()
    path = tmp_path / "relu_glu.onnx"
    onnx.save(export_module(module, HIDDEN), str(path))
    out_path = tmp_path / "out.onnx"
    args = ["fuse", str(path), "-o", str(out_path)] + (["--explain"] if explain else [])
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "0 MoE blocks fused, 1 unfused candidates" in out.output
    lines = [line for line in out.output.splitlines() if "unfused:" in line]
    if explain:
        assert (
            len(lines) == 1 and "rule=moe_gather_experts/expert_core" in lines[0] and "not a GLU" in lines[0]
        )
    else:
        assert not lines
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        want = module(x)
    fused = onnx.load(str(out_path))
    assert not fused_nodes(fused)
    assert rel_err(run_onnx(fused, {fused.graph.input[0].name: x.numpy()})[0], want) <= 1e-5


# Transformers families outside the seven demo families: the same rule must take them as they are.
_COMMON = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 64,
    "head_dim": 8,
}
OTHER_FAMILIES: dict[str, dict[str, object]] = {
    "glm4_moe": {
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.5,
        "norm_topk_prob": True,
    },
    "dots1": {
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "n_shared_experts": 1,
    },
    "ernie4_5_moe": {
        "moe_intermediate_size": 16,
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 0,
    },
    "minimax": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    # Sparse-mixer routing (a different function of the logits): must stay unfused, with a reason.
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_transformers_families(family: str) -> None:
    _fuses_and_matches(family, OTHER_FAMILIES[family], expect_fused=family != "phimoe")


# Grouped top-k with one group (n_group = topk_group = 1), the value several released configs ship: the mask
# keeps every expert, so the block is plain sigmoid routing with a correction bias.
SINGLE_GROUP: dict[str, dict[str, object]] = {
    "glm4_moe": {**OTHER_FAMILIES["glm4_moe"], "n_group": 1, "topk_group": 1},
    "deepseek_v3": {
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "n_shared_experts": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
    },
}


@pytest.mark.parametrize("family", sorted(SINGLE_GROUP))
def test_single_group_routing_fuses(family: str) -> None:
    result = _fuses_and_matches(family, SINGLE_GROUP[family], expect_fused=True)
    attrs = MoEAttributes.from_onnx_attributes(node_attributes(fused_nodes(result.model)[0]))
    assert (attrs.n_group, attrs.topk_group, attrs.scoring) == (1, 1, "sigmoid")


def _fuses_and_matches(family: str, overrides: dict[str, object], expect_fused: bool) -> FuseResult:
    from moetrt_testing.graphs import FirstOutput, init_random
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetrt.export.loaded import is_moe_block

    config = AutoConfig.for_model(family, **{**_COMMON, **overrides})
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    block = next(m for m in AutoModelForCausalLM.from_config(config).modules() if is_moe_block(m))
    module = init_random(FirstOutput(block).eval(), seed=3, std=0.2)
    model = export_module(module, 32)
    result = fuse_model(model)
    if not expect_fused:
        assert result.num_fused == 0 and result.unfused_candidates
    else:
        assert result.num_fused == 1 and not result.unfused_candidates, result.unfused_candidates
        assert not expert_table_gathers(result.model)
    for batch, seq in [(1, 1), (2, 5), (3, 11)]:
        x = torch.randn(batch, seq, 32, generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = module(x)
        got = run_onnx(result.model, {model.graph.input[0].name: x.numpy()})[0]
        assert rel_err(got, want) <= 1e-5
    return result


class LogitsMoE(UserMoE):
    """UserMoE that also returns its router logits (as training code does for the load-balancing loss)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = self.router(x.reshape(-1, HIDDEN))
        return super().forward(x), logits


def test_router_logits_read_outside_become_a_second_output() -> None:
    module = LogitsMoE().eval()
    model = export_module(module, HIDDEN)
    result = fuse_model(model)
    assert result.num_fused == 1, result.unfused_candidates
    (node,) = fused_nodes(result.model)
    attrs = MoEAttributes.from_onnx_attributes(node_attributes(node))
    assert attrs.output_router_logits and len(node.output) == 2
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_out, want_logits = module(x)
    got_out, got_logits = run_onnx(result.model, {model.graph.input[0].name: x.numpy()})
    assert rel_err(got_out, want_out) <= 1e-5 and rel_err(got_logits, want_logits) <= 1e-5
