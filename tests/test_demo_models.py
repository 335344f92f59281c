"""The built-in demo models: every family builds, is seeded, has MoE blocks with non-trivial routing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moetrt.core.errors import MoetrtError
from moetrt.export.cached import positions
from moetrt.export.demo_models import DEFAULT_DEMO, DEMO_FAMILIES, build_demo, demo_config
from moetrt.export.loaded import UNCACHED, count_moe_blocks, is_moe_block
from moetrt.export.model_source import load_model


def test_families_listed_with_qwen3_next_first() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(DEMO_FAMILIES) == 7 and all(f"`{family}`" in readme for family in DEMO_FAMILIES)
    assert DEFAULT_DEMO == "qwen3_next"


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_whole_model_runs_with_o1_logits(family: str) -> None:
    loaded = build_demo(family, form=UNCACHED)
    assert loaded.spec == f"demo:{family}"
    assert loaded.input_names == ["input_ids"] and loaded.output_names == ["logits"]
    assert loaded.num_moe_blocks >= 1
    (input_ids,) = loaded.make_inputs(2, 11, seed=3)
    assert input_ids.shape == (2, 11) and input_ids.dtype == torch.int64
    (logits,) = loaded.run((input_ids,))
    assert logits.shape == (2, 11, 512)
    assert torch.isfinite(logits).all()
    assert 0.1 < logits.std().item() < 10.0
    # The example batch is >= 2 and seq >= 3: a batch-1 example would specialise the exported graph.
    assert loaded.example_inputs[0].shape[0] >= 2 and loaded.example_inputs[0].shape[1] >= 3


@pytest.mark.parametrize("family", [*DEMO_FAMILIES, "qwen3_next:linear_only"])
def test_cached_decoder_continues_its_own_prefill(family: str) -> None:
    """The cached form's state carries the sequence: 11 tokens at once give the logits of 8, then 3 more.
    A Qwen3-Next of one (linear-attention) layer has no attention state at all: transformers' own cache has no
    length to give its mask code then; the decoder's cache takes it from the attention mask."""
    family, _, variant = family.partition(":")
    loaded = build_demo(family, num_layers=1 if variant else None)
    assert not variant or {layer.kind for layer in loaded.state.layers} == {"linear"}
    assert loaded.state is not None and loaded.input_names[:3] == [
        "input_ids",
        "attention_mask",
        "position_ids",
    ]
    assert len(loaded.input_names) == 3 + 2 * len(loaded.state.layers) == len(loaded.output_names) + 2
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 11, dtype=torch.int64)
    empty = loaded.state.empty_state(2)
    whole = loaded.run((ids, mask, positions(mask, 11), *empty))
    first = loaded.run((ids[:, :8], mask[:, :8], positions(mask[:, :8], 8), *empty))
    rest = loaded.run((ids[:, 8:], mask, positions(mask, 3), *first[1:]))
    torch.testing.assert_close(torch.cat([first[0], rest[0]], dim=1), whole[0], rtol=1e-4, atol=1e-4)
    for got, want in zip(rest[1:], whole[1:]):  # the state after both steps is the state after one
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_block_routes_to_many_experts(family: str) -> None:
    loaded = build_demo(family, block=True)
    assert loaded.spec == f"demo:{family}:block"
    assert loaded.num_moe_blocks == 1
    (hidden,) = loaded.make_inputs(2, 40, seed=1)
    (out,) = loaded.run((hidden,))
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 10.0

    # Routing is non-trivial: the tokens spread over most experts.
    moe = loaded.module.block
    router = next(
        c for n, c in moe.named_children() if n != "experts" and getattr(c, "weight", None) is not None
    )
    logits = hidden.reshape(-1, hidden.shape[-1]) @ router.weight.T
    num_experts = router.weight.shape[0]
    top_k = getattr(router, "top_k", 2)
    used = logits.topk(top_k, dim=-1).indices.unique().numel()
    assert used >= num_experts // 2, f"{family}: only {used}/{num_experts} experts used"


def test_demo_is_deterministic() -> None:
    first = build_demo("mixtral", block=True)
    second = build_demo("mixtral", block=True)
    x = first.make_inputs(1, 5)
    torch.testing.assert_close(first.run(x)[0], second.run(x)[0], rtol=0, atol=0)
    assert not torch.equal(first.make_inputs(1, 5, seed=0)[0], first.make_inputs(1, 5, seed=1)[0])


def test_family_specific_structure() -> None:
    next_config = demo_config("qwen3_next")
    assert {"linear_attention", "full_attention"} <= set(next_config.layer_types)
    assert next_config.num_experts == 32 and next_config.shared_expert_intermediate_size > 0

    deepseek = demo_config("deepseek_v3")
    assert deepseek.n_group > 1 and 1 <= deepseek.topk_group < deepseek.n_group
    loaded = build_demo("deepseek_v3")
    layers = loaded.module.model.model.layers
    assert not is_moe_block(layers[0].mlp) and is_moe_block(layers[1].mlp)
    bias = layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the correction bias changes which experts win

    gpt = build_demo("gpt_oss", block=True).module.block
    assert gpt.router.bias.abs().sum() > 0
    assert gpt.experts.gate_up_proj_bias.abs().sum() > 0 and gpt.experts.down_proj_bias.abs().sum() > 0


def test_dtype_is_applied() -> None:
    loaded = build_demo("olmoe", block=True, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in loaded.module.parameters())
    assert loaded.make_inputs(1, 3)[0].dtype == torch.float16


def test_spec_parsing() -> None:
    assert load_model("demo:").spec == "demo:qwen3_next"
    assert load_model("demo:gpt_oss:block").spec == "demo:gpt_oss:block"
    with pytest.raises(MoetrtError) as unknown:
        load_model("demo:llama")
    # The one line the CLI prints names the bad family and lists the good ones.
    assert re.search(r"unknown demo family 'llama'.*demo:qwen3_next", unknown.value.one_line())
    with pytest.raises(MoetrtError, match="cannot parse demo spec"):
        load_model("demo:mixtral:blocks")
    with pytest.raises(MoetrtError, match="unsupported dtype"):
        load_model("demo:mixtral", "int8")


def test_count_moe_blocks_is_structural() -> None:
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    assert count_moe_blocks(dense) == 0

    class ListMoE(torch.nn.Module):  # experts as a ModuleList, router as nn.Linear
        def __init__(self) -> None:
            super().__init__()
            self.router = torch.nn.Linear(8, 4, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    assert count_moe_blocks(torch.nn.Sequential(ListMoE(), ListMoE())) == 2
