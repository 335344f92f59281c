"""Stored-quantized experts read into the op's layouts: the config classification and each format's reader.

Checkpoint tensors are made here in each format's stored layout (names as the released checkpoints use them);
where transformers has its own dequantizer of the format (FP8, MXFP4) that is the reference, otherwise the
format's formula on the values the test packed.
"""

from __future__ import annotations

import pytest
import torch

from moetrt.core.errors import MoetrtError
from moetrt.export.quantized_checkpoint import (
    AWQ_ORDER,
    checkpoint_quantization,
    expert_layers,
    read_experts,
)
from moetrt.op.quant import dequantize, quantize
from moetrt.op.spec import FP8_BLOCK, INT4, MXFP4

E, H, I = 3, 64, 32  # noqa: E741


def test_configs_are_named_or_refused_with_what_is_read() -> None:
    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    q = checkpoint_quantization({"quantization_config": fp8})
    assert q is not None and (q.weight_format, q.block, q.zero_point) == (FP8_BLOCK, 128, False)
    q = checkpoint_quantization({"quantization_config": {"quant_method": "mxfp4"}})
    assert q is not None and (q.weight_format, q.block) == (MXFP4, 32)
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False}
    q = checkpoint_quantization({"quantization_config": gptq})
    assert q is not None and (q.weight_format, q.block, q.zero_point) == (INT4, 128, True)
    q = checkpoint_quantization({"quantization_config": {**gptq, "sym": True}})
    assert q is not None and not q.zero_point
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}
    q = checkpoint_quantization({"quantization_config": awq})
    assert q is not None and (q.weight_format, q.block, q.zero_point) == (INT4, 64, True)
    assert checkpoint_quantization({"model_type": "qwen3_moe"}) is None
    refused = [
        ({**fp8, "weight_block_size": None}, "per-tensor"),
        ({**fp8, "weight_block_size": [1, 128]}, "non-square"),
        ({**gptq, "desc_act": True}, "act-order"),
        ({**gptq, "bits": 8}, "8 bits"),
        ({**gptq, "checkpoint_format": "gptq_v2"}, "gptq_v2"),
        ({**awq, "version": "gemv"}, "gemv"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ]
    for quant, words in refused:
        with pytest.raises(MoetrtError, match=words) as err:
            checkpoint_quantization({"quantization_config": quant})
        assert "GPTQ 4-bit" in str(err.value) and "--weights" in err.value.hint


def _store(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def test_fp8_block_experts_keep_their_codes_and_scales() -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    block = 16
    gen = torch.Generator().manual_seed(0)
    stored: dict[str, torch.Tensor] = {}
    dense = {}
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = torch.randn(*shape, generator=gen) * 0.05
            q = quantize(FP8_BLOCK, block, w[None])
            prefix = f"model.layers.2.mlp.experts.{e}.{name}"
            stored |= _store(
                prefix, {"weight": q.codes[0].view(torch.float8_e4m3fn), "weight_scale_inv": q.scale[0]}
            )
            # the independent reference: transformers' own FP8 dequantizer of the stored pair
            dense[(e, name)] = Fp8Dequantize(None)._dequantize_one(
                q.codes[0].view(torch.float8_e4m3fn), q.scale[0], torch.float32
            )
    stored["model.layers.2.mlp.gate.weight"] = torch.randn(E, H)
    quant = checkpoint_quantization(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [block, block]}}
    )
    assert quant is not None
    assert expert_layers(sorted(stored)) == {"model.layers.2.mlp": E}
    experts = read_experts(quant, stored.__getitem__, set(stored), "model.layers.2.mlp", E)
    assert experts.gate_up.codes.dtype == torch.uint8 and experts.gate_up.codes.shape == (E, 2 * I, H)
    assert experts.gate_up.scale.shape == (E, 2 * I // block, H // block)
    gate_up = dequantize(FP8_BLOCK, block, experts.gate_up, H)
    down = dequantize(FP8_BLOCK, block, experts.down, I)
    for e in range(E):
        assert torch.equal(gate_up[e], torch.cat([dense[(e, "gate_proj")], dense[(e, "up_proj")]]))
        assert torch.equal(down[e], dense[(e, "down_proj")])


def test_fp8_gate_rows_off_the_block_grid_are_refused() -> None:
    stored = {}
    for name, rows in (("gate_proj", 8), ("up_proj", 8), ("down_proj", H)):
        q = quantize(FP8_BLOCK, 16, torch.randn(1, rows, H if rows == 8 else 8))
        stored |= _store(
            f"m.experts.0.{name}",
            {"weight": q.codes[0].view(torch.float8_e4m3fn), "weight_scale_inv": q.scale[0]},
        )
    quant = checkpoint_quantization(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    )
    assert quant is not None
    with pytest.raises(MoetrtError, match="whole 16-row blocks"):
        read_experts(quant, stored.__getitem__, set(stored), "m", 1)


def _pack_words(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] 4-bit fields -> int32 words, field j in bits 4j..4j+3."""
    word = torch.zeros(fields.shape[:-1], dtype=torch.int64)
    for j in range(8):
        word |= fields[..., j].long() << (4 * j)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("zero_point", [True, False])
def test_int4_experts_unpack_to_the_stored_values(method: str, zero_point: bool) -> None:
    group = 16
    gen = torch.Generator().manual_seed(1)
    stored: dict[str, torch.Tensor] = {}
    expected = {}
    for e in range(E):
        for name, (n, k) in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            codes = torch.randint(0, 16, (k, n), generator=gen)  # [K, N], as the checkpoints orient it
            zeros = (
                torch.randint(3, 13, (k // group, n), generator=gen)
                if zero_point
                else torch.full((k // group, n), 8)
            )
            scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3).half()
            expected[(e, name)] = (
                (codes - zeros.repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
            ).t()
            if method == "gptq":  # qweight packed along K; qzeros along N, storing zero - 1
                qweight = _pack_words(codes.view(k // 8, 8, n).permute(0, 2, 1))
                qzeros = _pack_words((zeros - 1).view(k // group, n // 8, 8))
            else:  # AWQ: both packed along N, field j holding column AWQ_ORDER[j] of its 8
                order = list(AWQ_ORDER)
                qweight = _pack_words(codes.view(k, n // 8, 8)[:, :, order])
                qzeros = _pack_words(zeros.view(k // group, n // 8, 8)[:, :, order])
            stored |= _store(
                f"model.layers.0.block_sparse_moe.experts.{e}.{name}",
                {"qweight": qweight, "qzeros": qzeros, "scales": scales},
            )
    config = {"quant_method": method, "bits": 4, "group_size": group, "desc_act": False, "version": "gemm"}
    config |= {"sym": not zero_point} if method == "gptq" else {"zero_point": True}
    quant = checkpoint_quantization({"quantization_config": config})
    assert quant is not None
    experts = read_experts(quant, stored.__getitem__, set(stored), "model.layers.0.block_sparse_moe", E)
    if method == "awq" and not zero_point:
        assert experts.gate_up.zero is not None  # AWQ keeps its zero points even when they are all 8
    gate_up = dequantize(INT4, group, experts.gate_up, H)
    down = dequantize(INT4, group, experts.down, I)
    for e in range(E):
        torch.testing.assert_close(
            gate_up[e], torch.cat([expected[(e, "w1")], expected[(e, "w3")]]), rtol=0, atol=0
        )
        torch.testing.assert_close(down[e], expected[(e, "w2")], rtol=0, atol=0)


def test_gpt_oss_mxfp4_experts_match_transformers_dequantizer() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(2)
    layer = "model.layers.1.mlp"
    stored = {}
    for which, (n, k) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        stored[f"{layer}.experts.{which}_blocks"] = torch.randint(
            0, 256, (E, n, k // 32, 16), generator=gen, dtype=torch.uint8
        )
        stored[f"{layer}.experts.{which}_scales"] = torch.randint(
            118, 130, (E, n, k // 32), generator=gen, dtype=torch.uint8
        )
    quant = checkpoint_quantization({"quantization_config": {"quant_method": "mxfp4"}})
    assert quant is not None
    assert expert_layers(sorted(stored)) == {layer: 0}
    experts = read_experts(quant, stored.__getitem__, set(stored), layer, E)
    # transformers' GPT-OSS weights: [E, H, 2I] with gate / up interleaved along 2I, and [E, I, H]
    hf_gate_up = convert_moe_packed_tensors(
        stored[f"{layer}.experts.gate_up_proj_blocks"],
        stored[f"{layer}.experts.gate_up_proj_scales"],
        dtype=torch.float32,
    )
    hf_down = convert_moe_packed_tensors(
        stored[f"{layer}.experts.down_proj_blocks"],
        stored[f"{layer}.experts.down_proj_scales"],
        dtype=torch.float32,
    )
    gate_up = dequantize(MXFP4, 32, experts.gate_up, H)
    assert torch.equal(gate_up[:, :I], hf_gate_up[..., 0::2].transpose(1, 2))
    assert torch.equal(gate_up[:, I:], hf_gate_up[..., 1::2].transpose(1, 2))
    assert torch.equal(dequantize(MXFP4, 32, experts.down, I), hf_down.transpose(1, 2))


def test_unknown_expert_layout_is_named() -> None:
    quant = checkpoint_quantization(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    )
    assert quant is not None
    with pytest.raises(MoetrtError, match="gate_proj, w1"):
        read_experts(quant, {}.__getitem__, set(), "model.layers.0.mlp", 1)
