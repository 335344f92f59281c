"""`triton_common`'s tile loaders under Triton's CPU interpreter: every code of every format, decoded exactly.

A small kernel dequantizes a whole [R, K] table tile by tile with `weight_tile` (to float32), and the result
must equal `op.quant.dequantize` exactly; where a tile lies in one scale group, so must the form the expert
GEMMs then use: `fp8_values` / `nibble_values` (exact in float32, bf16 and fp16) times `row_scales`, fp8
also through Triton's e4m3 conversion. The decoders are integer tricks (codes moved into fp16 bits, int4
codes OR-ed into 2^23), so any slip in a shift or a mask shows as a wrong value, not as rounding. Tiles and
groups nest in most cases and do not in others (group 12 or block 24 against tiles of 16 or 32), so every
branch of the group-value loads runs. The interpreter runs in a child process, as in test_kernels.py.
"""

from __future__ import annotations

import json

import pytest
import triton
import triton.language as tl
from moetrt_testing.interpreter import run_in_interpreter

from moetrt.kernels.triton_common import fp8_values, nibble_values, row_scales, weight_tile

# (weight format, block, zero points, rows, K, tile rows, tile K): tiles smaller than, equal to and larger
# than the group; K and rows not multiples of the tile where the format allows it
CASES = [
    ("fp8_block", 16, False, 40, 64, 16, 32),
    ("fp8_block", 16, False, 24, 48, 32, 16),
    ("fp8_block", 24, False, 30, 50, 16, 32),
    ("int4", 16, False, 24, 64, 16, 32),
    ("int4", 32, True, 20, 96, 16, 16),
    ("int4", 12, True, 16, 48, 16, 32),
    ("mxfp4", 32, False, 24, 128, 16, 64),
    ("mxfp4", 32, False, 20, 64, 32, 16),
    ("int4", 32, True, 16, 64, 16, 32),
    ("mxfp4", 32, False, 16, 96, 32, 32),
]


def _case_id(case: tuple[object, ...]) -> str:
    fmt, block, zero, rows, k, br, bk = case
    return f"{fmt}-B{block}{'-zero' if zero else ''}-{rows}x{k}-tile{br}x{bk}"


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_weight_tile_decodes_every_code_exactly(case: tuple[object, ...], results: dict) -> None:
    result = results[_case_id(case)]
    assert "error" not in result, result.get("error")
    assert result["codes_seen"] == result["codes_possible"], "the table did not hold every code"
    assert result["mismatches"] == 0, f"{result['mismatches']} values differ, first: {result['first']}"
    fmt, block, _, _, _, _, bk = case
    cvts = (0, 1) if fmt == "fp8_block" else (0,)
    forms = [f"values_cvt{c}_{v}" for c in cvts for v in ("float32", "bfloat16", "float16")]
    forms = forms if block % bk == 0 else []
    assert [name for name in result if name.startswith("values_")] == forms
    for name in forms:
        assert result[name]["mismatches"] == 0, f"{name}: {result[name]}"
    if fmt == "fp8_block":
        assert result["per_weight_cvt1"]["mismatches"] == 0, (
            f"per weight, e4m3 conversion: {result['per_weight_cvt1']}"
        )


def _tables(fmt: str, block: int, zero: bool, rows: int, k: int):  # type: ignore[no-untyped-def]
    """Random codes covering every code of the format (NaN codes of e4m3 left out), scales, zero points."""
    import torch

    from moetrt.op.quant import QuantizedWeight, pack_nibbles
    from moetrt.op.spec import scale_shape

    gen = torch.Generator().manual_seed(rows * 1000 + k)
    if fmt == "fp8_block":
        valid = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
        codes = valid[torch.randint(0, len(valid), (rows, k), generator=gen)]
        codes.view(-1)[: len(valid)] = valid
        scale = torch.rand(scale_shape(fmt, block, rows, k), generator=gen) * 4 + 0.01
        return QuantizedWeight(codes, scale), len(valid), codes.unique().numel()
    nibbles = torch.randint(0, 16, (rows, k), generator=gen, dtype=torch.uint8)
    nibbles.view(-1)[:16] = torch.arange(16, dtype=torch.uint8)
    packed = pack_nibbles(nibbles)
    groups = (rows, k // block)
    if fmt == "int4":
        scale = torch.rand(groups, generator=gen) * 0.5 + 0.001
        zero_points = torch.randint(0, 16, groups, generator=gen, dtype=torch.uint8) if zero else None
        return QuantizedWeight(packed, scale, zero_points), 16, nibbles.unique().numel()
    exponent = torch.randint(100, 150, groups, generator=gen, dtype=torch.uint8)
    return QuantizedWeight(packed, exponent), 16, nibbles.unique().numel()


@triton.jit
def tile_kernel(
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    R: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    FP8_CVT: tl.constexpr,
    VALUES: tl.constexpr,
):
    """The [R, K] table in float32, tile by tile, in one of the expert GEMMs' two forms: PER_WEIGHT
    `weight_tile`, else (tiles inside one scale group) values (in VALUES, then float32) times row factors."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < R
    k0 = tl.program_id(1) * BK
    if PER_WEIGHT:
        tile = weight_tile(
            w_ptr, s_ptr, z_ptr, rows, row_ok, k0, K, BR, BK, WFMT, WB, HAS_ZERO, tl.float32, FP8_CVT
        )
    else:
        if WFMT == 1:
            values = fp8_values(w_ptr, rows, row_ok, k0, K, BK, FP8_CVT, VALUES)
        else:
            values = nibble_values(w_ptr, z_ptr, rows, row_ok, k0, K, BR, BK, WFMT, WB, HAS_ZERO, VALUES)
        tile = values.to(tl.float32) * row_scales(s_ptr, rows, row_ok, k0, K, WFMT, WB, FP8_CVT)[:, None]
    ks = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None] * K + ks[None, :], tile, mask=row_ok[:, None] & (ks < K)[None, :])


def _compare(got, expected) -> dict[str, object]:  # type: ignore[no-untyped-def]
    differ = (got != expected).nonzero()
    first = None
    if len(differ):
        r, c = differ[0].tolist()
        first = {"at": [r, c], "got": got[r, c].item(), "expected": expected[r, c].item()}
    return {"mismatches": len(differ), "first": first}


def _tile(case: tuple, q, per_weight: int, fp8_cvt: int = 0, values: str = "float32"):  # type: ignore[no-untyped-def]
    """The case's table in float32 through `tile_kernel` in one form."""
    import torch

    from moetrt.op.spec import WEIGHT_FORMATS

    fmt, block, zero, rows, k, br, bk = case
    got = torch.full((rows, k), float("nan"))
    zeros = q.zero if q.zero is not None else q.codes
    tile_kernel[(triton.cdiv(rows, br), triton.cdiv(k, bk))](
        q.codes, q.scale, zeros, got, rows, k, br, bk, WEIGHT_FORMATS.index(fmt), block, int(zero), per_weight,
        fp8_cvt, getattr(tl, values),
    )  # fmt: skip
    return got


def _child() -> None:
    from moetrt.kernels.torch_ops import _interpreter_fixes
    from moetrt.op.quant import dequantize

    _interpreter_fixes()

    out: dict[str, dict[str, object]] = {}
    for case in CASES:
        fmt, block, zero, rows, k, _, bk = case
        try:
            q, possible, seen = _tables(fmt, block, zero, rows, k)
            expected = dequantize(fmt, block, q, k)
            result = _compare(_tile(case, q, 1), expected) | {"codes_possible": possible, "codes_seen": seen}
            if fmt == "fp8_block":  # per weight through the SM's e4m3 conversion as well
                result["per_weight_cvt1"] = _compare(_tile(case, q, 1, 1), expected)
            if block % bk == 0:  # the tile lies in one group: the scales-on-the-product form as well
                for fp8_cvt in (0, 1) if fmt == "fp8_block" else (0,):
                    for values in ("float32", "bfloat16", "float16"):
                        result[f"values_cvt{fp8_cvt}_{values}"] = _compare(
                            _tile(case, q, 0, fp8_cvt, values), expected
                        )
            out[_case_id(case)] = result
        except Exception as err:  # reported per case by the parent
            out[_case_id(case)] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(out))


if __name__ == "__main__":
    _child()
