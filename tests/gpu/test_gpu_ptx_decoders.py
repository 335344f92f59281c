"""GPU: the PTX 4-bit decoders (triton_common.int4_values, e2m1_values) over every byte and the mxfp4 tile with its
scales folded into the decoder (mxfp4_tile_bf16) over every e8m0 scale, compiled and run on the device, against
op.quant's values (the CPU runs the same PTX text through a model: tests/test_ptx_decoders.py)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from moetrt.kernels import triton_common as tc
from moetrt.op.quant import e2m1_table

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@triton.jit
def _decode_kernel(
    byte_ptr, low_ptr, high_ptr, R: tl.constexpr, C: tl.constexpr, E2M1: tl.constexpr, OUT: tl.constexpr
):
    offsets = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    byte = tl.load(byte_ptr + offsets)
    if E2M1:
        low, high = tc.e2m1_values(byte, OUT)
    else:
        low, high = tc.int4_values(byte, tl.full((1, 1), 8.0, tl.float32), OUT)
    tl.store(low_ptr + offsets, low)
    tl.store(high_ptr + offsets, high)


@pytest.mark.parametrize("shape", [(16, 16), (64, 32)])  # few and many bytes per thread
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("e2m1", [False, True])
def test_ptx_decoders_give_every_code_exactly(shape: tuple[int, int], dtype: torch.dtype, e2m1: bool) -> None:
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows)
    data = torch.randint(0, 256, (rows * cols,), generator=gen, dtype=torch.uint8)
    data[:256] = torch.arange(256, dtype=torch.uint8)[torch.randperm(256, generator=gen)]
    data = data.reshape(rows, cols).cuda()
    low = torch.empty(rows, cols, dtype=dtype, device="cuda")
    high = torch.empty_like(low)
    out = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    _decode_kernel[(1,)](data, low, high, rows, cols, int(e2m1), out)
    codes = data.long().cpu()
    if e2m1:  # values over FP4_FP16_SCALE, as the scaled form multiplies them
        table = torch.from_numpy(e2m1_table()).to(torch.float64) / tc.FP4_FP16_SCALE.value
        want_low, want_high = table[codes % 16], table[codes // 16]
    else:  # symmetric int4: code - 8
        want_low, want_high = (codes % 16 - 8).double(), (codes // 16 - 8).double()
    torch.testing.assert_close(low.cpu().double(), want_low, rtol=0, atol=0)
    torch.testing.assert_close(high.cpu().double(), want_high, rtol=0, atol=0)


@triton.jit
def _mxfp4_tile_kernel(
    codes_ptr, scale_ptr, out_ptr, R, BR: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, WB: tl.constexpr
):
    rows = tl.arange(0, BR)
    row_ok = rows < R
    for k0 in range(0, K, BK):
        tile = tc.mxfp4_tile_bf16(codes_ptr, scale_ptr, rows, row_ok, k0, K, BR, BK, WB)
        ks = k0 + tl.arange(0, BK)
        tl.store(out_ptr + rows[:, None] * K + ks[None, :], tile)


@pytest.mark.parametrize("bk", [16, 32, 64, 128, 256])  # inside a group, one group, tiles across 2-8 groups
@pytest.mark.parametrize("rows", [32, 20])  # 20: the tile's last 12 rows masked, so they must come out as 0
def test_mxfp4_tile_with_folded_scales_equals_dequantize_for_every_scale(bk: int, rows: int) -> None:
    from moetrt.op.quant import QuantizedWeight, dequantize
    from moetrt.op.spec import MXFP4

    br, k, group = 32, 256, 32
    gen = torch.Generator().manual_seed(bk + rows)
    codes = torch.randint(0, 256, (br, k // 2), generator=gen, dtype=torch.uint8)
    scale = torch.cat([torch.arange(255), torch.randint(0, 255, (br * k // group - 255,), generator=gen)])
    scale = scale[torch.randperm(scale.numel(), generator=gen)].to(torch.uint8).reshape(br, k // group)
    out = torch.full((br, k), float("nan"), dtype=torch.bfloat16, device="cuda")
    _mxfp4_tile_kernel[(1,)](codes.cuda(), scale.cuda(), out, rows, br, k, bk, group)
    want = dequantize(MXFP4, group, QuantizedWeight(codes=codes, scale=scale), k)  # float32; 6 * 2^127: inf
    want[rows:] = 0.0
    got = out.cpu().double()
    torch.testing.assert_close(got, want.to(torch.bfloat16).double(), rtol=0, atol=0, equal_nan=False)
    assert torch.equal(torch.signbit(got[:rows]), torch.signbit(want[:rows]))  # -0 codes keep their sign
