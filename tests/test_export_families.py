"""Families beyond the demos that needed export-friendly rewrites: DeepSeek-V2 computes its rotary embedding with
complex numbers (torch.export has no complex decompositions); the rewrite in real arithmetic is swapped in only
while exporting, so the export's self-check and `verify` compare it with the original code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config

from moetrt.export.demo_models import init_demo_weights
from moetrt.export.export_friendly import polar_free_rotary_forward, real_apply_rotary_emb
from moetrt.export.onnx_export import export_onnx
from moetrt.passes.pipeline import fuse_file
from moetrt.verify.model import verify


def _tiny_deepseek_v2() -> torch.nn.Module:
    config = DeepseekV2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=8,
    )
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    init_demo_weights(model, config, seed=1)
    return model


def test_real_rotary_equals_the_complex_one() -> None:
    model = _tiny_deepseek_v2()
    rotary = model.model.rotary_emb
    positions = torch.arange(11)[None].expand(2, 11)
    x = torch.randn(2, 11, 64)
    complex_freqs = rotary(x, positions)
    real_freqs = polar_free_rotary_forward(rotary, x, positions)
    torch.testing.assert_close(real_freqs, torch.view_as_real(complex_freqs), rtol=1e-6, atol=1e-6)
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    q, k = torch.randn(2, 4, 11, 8), torch.randn(2, 1, 11, 8)
    for want, got in zip(apply_rotary_emb(q, k, complex_freqs), real_apply_rotary_emb(q, k, real_freqs)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_deepseek_v2_exports_fuses_and_verifies(tmp_path: Path, dtype: str) -> None:
    model_dir = tmp_path / "tiny-deepseek-v2"
    _tiny_deepseek_v2().save_pretrained(model_dir)
    exported, fused = tmp_path / "m.onnx", tmp_path / "f.onnx"
    result = export_onnx(str(model_dir), exported, dtype=dtype)  # self-check on: a mismatch would raise
    assert result.num_moe_blocks == 2
    assert fuse_file(exported, fused).num_fused == 2
    report = verify(fused)
    assert report.passed, report.format_table()


def _tiny_longcat_flash() -> torch.nn.Module:
    from transformers import LongcatFlashConfig

    config = LongcatFlashConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_hidden_size=64,
        expert_ffn_hidden_size=32,
        num_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        zero_expert_num=4,
        moe_topk=3,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        qk_head_dim=24,
        v_head_dim=16,
        head_dim=8,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    init_demo_weights(model, config, seed=2)
    return model


def test_zero_compute_experts_export_and_say_why_they_stay_unfused(tmp_path: Path) -> None:
    """LongCat-Flash's router also picks identity (zero-compute) experts; its experts loop is data-dependent.
    The gather-form stand-in exports; the op has no identity experts, so the block stays unfused, explained."""
    model = _tiny_longcat_flash()
    ids = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    router = model.model.layers[0].mlp.router
    with torch.no_grad():
        chosen = router(model.model.embed_tokens(ids))[2]
    assert (chosen >= 8).any() and (chosen < 8).any()  # both kinds of expert are picked
    model_dir = tmp_path / "tiny-longcat"
    model.save_pretrained(model_dir)
    exported, fused = tmp_path / "m.onnx", tmp_path / "f.onnx"
    export_onnx(str(model_dir), exported)  # its self-check compares with the original loop
    result = fuse_file(exported, fused, explain=True)
    assert result.num_fused == 0 and result.unfused_candidates
    assert all("TopK" in c.check for c in result.unfused_candidates)
    assert verify(exported, shapes=[(1, 5), (3, 17)]).passed
