"""The quantized formats' arithmetic: layouts, exact code values, round trips and their error, and the
attribute contract that refuses blocks a reduction cannot hold."""

from __future__ import annotations

import pytest
import torch

from moetrt.op.quant import (
    QuantizedWeight,
    dequantize,
    e2m1_table,
    fp8_e4m3_table,
    pack_nibbles,
    pairs_to_runs,
    quantize,
    unpack_nibbles,
)
from moetrt.op.spec import FP8_BLOCK, INT4, MXFP4, MoEAttributes, scale_shape

#: (format, block, zero point, relative error bound of a round trip of N(0, 1) weights)
CASES = [
    (FP8_BLOCK, 128, False, 0.04),
    (FP8_BLOCK, 32, False, 0.04),
    (INT4, 32, False, 0.15),
    (INT4, 32, True, 0.12),
    (INT4, 128, False, 0.16),
    (MXFP4, 32, False, 0.15),
]


@pytest.mark.parametrize(("fmt", "block", "zero", "bound"), CASES)
def test_round_trip_error_and_stability(fmt: str, block: int, zero: bool, bound: float) -> None:
    weight = torch.randn(3, 96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    stored = quantize(fmt, block, weight, zero)
    assert stored.codes.dtype == torch.uint8
    assert stored.codes.shape == (3, 96, 256 if fmt == FP8_BLOCK else 128)
    assert tuple(stored.scale.shape[1:]) == scale_shape(fmt, block, 96, 256)
    assert (stored.zero is not None) == zero
    back = dequantize(fmt, block, stored, 256)
    error = float((back - weight).norm() / weight.norm())
    assert 0 < error <= bound, error
    again = quantize(fmt, block, back, zero)  # values on the grid quantize to the same codes
    assert torch.equal(again.codes, stored.codes)


def test_code_values_are_the_formats() -> None:
    table = fp8_e4m3_table()
    assert table[0x38] == 1.0 and table[0x7E] == 448.0 and table[0xB8] == -1.0
    assert list(e2m1_table()[:8]) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    # runs of 8 codes: byte j < 4 holds k = j (low nibble) and k = 4 + j (high nibble)
    codes = torch.tensor([[[0x51, 0x62, 0x73, 0x84]]], dtype=torch.uint8)
    assert unpack_nibbles(codes).tolist() == [[[1, 2, 3, 4, 5, 6, 7, 8]]]
    mx = QuantizedWeight(codes, torch.tensor([[[127, 128]]], dtype=torch.uint8))
    assert dequantize(MXFP4, 4, mx, 8).tolist() == [[[0.5, 1.0, 1.5, 2.0, 6.0, 8.0, 12.0, -0.0]]]
    int4 = QuantizedWeight(codes, torch.tensor([[[2.0]]]), torch.tensor([[[1]]], dtype=torch.uint8))
    assert dequantize(INT4, 8, int4, 8).tolist() == [[[0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]]]
    symmetric = QuantizedWeight(torch.tensor([[[0xF0, 0, 0, 0]]], dtype=torch.uint8), torch.tensor([[[0.5]]]))
    assert dequantize(INT4, 8, symmetric, 8).tolist() == [[[-4.0, -4.0, -4.0, -4.0, 3.5, -4.0, -4.0, -4.0]]]


def test_nibble_runs_round_trip_and_reorder_checkpoint_pairs() -> None:
    generator = torch.Generator().manual_seed(5)
    values = torch.randint(0, 16, (3, 5, 48), generator=generator, dtype=torch.uint8)
    packed = pack_nibbles(values)
    assert packed.shape == (3, 5, 24)
    assert torch.equal(unpack_nibbles(packed), values)
    # a byte j of k = 2j, 2j + 1 (GPTQ / AWQ fields, GPT-OSS blocks) reorders to the same codes
    pairs = values[..., 0::2] | (values[..., 1::2] << 4)
    assert torch.equal(pairs_to_runs(pairs), packed)
    assert not torch.equal(pairs, packed)


def test_fp8_blocks_cover_ragged_edges() -> None:
    weight = torch.randn(2, 130, 70, generator=torch.Generator().manual_seed(2))
    stored = quantize(FP8_BLOCK, 64, weight)
    assert tuple(stored.scale.shape) == (2, 3, 2)
    assert float((dequantize(FP8_BLOCK, 64, stored, 70) - weight).norm() / weight.norm()) < 0.04


def test_attributes_refuse_what_the_layout_cannot_hold() -> None:
    attrs = MoEAttributes(8, 2, 64, 32, weight_format=INT4, weight_block=32, has_weight_zero_point=True)
    assert attrs.present_inputs()[-4:] == (
        "expert_gate_up_scale",
        "expert_down_scale",
        "expert_gate_up_zero",
        "expert_down_zero",
    )
    assert attrs.input_shapes()["expert_down_weight"] == (8, 64, 16)
    for bad in (
        {"weight_format": "int3", "weight_block": 32},
        {"weight_format": MXFP4, "weight_block": 16},
        {"weight_format": INT4, "weight_block": 48},  # does not divide 32
        {"weight_format": FP8_BLOCK, "weight_block": 128, "has_weight_zero_point": True},
        {"weight_block": 32},  # a block for native weights
    ):
        with pytest.raises(ValueError, match="invalid MoE attributes"):
            MoEAttributes(8, 2, 64, 32, **bad)  # type: ignore[arg-type]
    # groups of 2 divide 36, but the codes' runs of 8 do not
    with pytest.raises(ValueError, match="runs of 8, which do not divide the reduction 36"):
        MoEAttributes(8, 2, 36, 32, weight_format=INT4, weight_block=2)
    native = MoEAttributes(8, 2, 64, 32)
    assert MoEAttributes.from_onnx_attributes(native.to_onnx_attributes()) == native
    assert MoEAttributes.from_onnx_attributes(attrs.to_onnx_attributes()) == attrs
