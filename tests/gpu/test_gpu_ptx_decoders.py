"""GPU: the PTX 4-bit decoders (triton_common.int4_values, e2m1_values) over every byte, compiled and run on the
device, against op.quant's values (the CPU runs the same PTX text through a model: tests/test_ptx_decoders.py)."""

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
