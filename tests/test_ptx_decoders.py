"""The PTX 4-bit decoders of triton_common (int4 and e2m1 codes to bf16 / fp16 bits), run on the CPU by a small
model of the few PTX instructions they use, over every byte: each output lane must hold the right code's
exact value in the right place.

The CPU interpreter cannot run inline PTX, so the kernels' interpreter tests take the decoders' Triton form;
this test checks the PTX text the compiled kernels carry (the GPU tests run it on the device)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moetrt.kernels import triton_common as tc
from moetrt.op.quant import e2m1_table

MASK32 = 0xFFFFFFFF


def _prmt(a: int, b: int, selector: int) -> int:
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        assert nibble < 8, "sign-replicate mode is not used by the decoders"
        out |= source[nibble] << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) of float32 values, rounded to nearest even (torch's conversion)."""
    bits = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    return bits.view(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16).double().numpy()


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    """fma.rn.bf16x2 on two lanes: a * b + c rounded once to bf16. The cases the decoders make have products
    exact in float32 (a few significant bits), so rounding float32 to bf16 is the one rounding; the model
    asserts that rather than assume it. Past float32's range (and so bf16's) the result is inf."""
    lanes = np.array([[x & 0xFFFF, x >> 16] for x in (a, b, c)], dtype=np.uint16)
    exact = _bf16_values(lanes[0]) * _bf16_values(lanes[1]) + _bf16_values(lanes[2])
    inside = np.abs(exact) < 2.0**128
    assert np.array_equal(exact[inside].astype(np.float32).astype(np.float64), exact[inside]), "not exact"
    out = _bf16_bits(np.where(inside, exact, np.copysign(np.inf, exact)))
    return int(out[0]) | (int(out[1]) << 16)


def run_ptx(ptx: str, inputs: dict[str, int]) -> dict[str, int]:
    """Run the decoders' straight-line PTX on 32-bit integers: registers by name ($0 .. $4 included)."""
    regs = dict(inputs)

    def value(operand: str) -> int:
        operand = operand.strip()
        if operand in regs:
            return regs[operand]
        return int(operand, 0) & MASK32

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [x.strip() for x in rest.split(",")]
        v = [value(x) for x in args]
        if op == "mov.b32":
            regs[dst] = v[0]
        elif op == "prmt.b32":
            regs[dst] = _prmt(v[0], v[1], v[2])
        elif op == "lop3.b32":
            regs[dst] = _lop3(v[0], v[1], v[2], v[3])
        elif op == "and.b32":
            regs[dst] = v[0] & v[1]
        elif op == "shr.u32":
            regs[dst] = v[0] >> v[1]
        elif op == "shl.b32":
            regs[dst] = (v[0] << v[1]) & MASK32
        elif op == "mul.lo.u32":
            regs[dst] = (v[0] * v[1]) & MASK32
        elif op == "fma.rn.bf16x2":
            regs[dst] = _fma_bf16x2(v[0], v[1], v[2])
        else:
            raise AssertionError(f"instruction {op!r} is not modelled: extend run_ptx")
    return regs


def _lanes(words: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit lanes of 32-bit words, low lane first, as `dtype` values in float64."""
    halves = [h for w in words for h in (w & 0xFFFF, w >> 16)]
    bits = torch.tensor(np.array(halves, dtype=np.uint16).view(np.int16))
    return bits.view(dtype).to(torch.float64)


def _decode_every_byte(ptx: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-nibble values, high-nibble values) the decoder gives each of the 256 bytes, fed four to a word
    in every position of the word."""
    low = torch.empty(256, dtype=torch.float64)
    high = torch.empty(256, dtype=torch.float64)
    for first in range(0, 256, 4):
        data = [(first + 1 + 37 * i) % 256 for i in range(4)]  # four different bytes in one word
        regs = run_ptx(ptx, {"$4": sum(b << (8 * i) for i, b in enumerate(data))})
        lows, highs = _lanes([regs["$0"], regs["$1"]], dtype), _lanes([regs["$2"], regs["$3"]], dtype)
        for i, b in enumerate(data):  # output element i is input byte i
            low[b], high[b] = lows[i], highs[i]
    return low, high


def test_the_model_refuses_an_instruction_it_does_not_know() -> None:
    with pytest.raises(AssertionError, match="not modelled"):
        run_ptx("add.u32 $0, $4, 1;", {"$4": 1})


@pytest.mark.parametrize(
    ("ptx", "dtype", "magic"),
    [(tc.NIBBLES_PTX_BF16, torch.bfloat16, tc.NIBBLE_MAGIC_BF16), (tc.NIBBLES_PTX_FP16, torch.float16, tc.NIBBLE_MAGIC_FP16)],
)  # fmt: skip
def test_int4_decoder_gives_magic_plus_each_nibble(ptx: object, dtype: torch.dtype, magic: object) -> None:
    low, high = _decode_every_byte(ptx.value, dtype)  # type: ignore[attr-defined]
    codes = torch.arange(256, dtype=torch.float64)
    torch.testing.assert_close(low, magic.value + codes % 16, rtol=0, atol=0)  # type: ignore[attr-defined]
    torch.testing.assert_close(high, magic.value + codes // 16, rtol=0, atol=0)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("ptx", "dtype", "factor"),
    [(tc.E2M1_PTX_BF16, torch.bfloat16, tc.E2M1_BF16_SCALE.value), (tc.E2M1_PTX_FP16, torch.float16, tc.FP4_FP16_SCALE.value)],
)  # fmt: skip
def test_e2m1_decoder_gives_each_code_times_a_power_of_two(
    ptx: object, dtype: torch.dtype, factor: float
) -> None:
    low, high = _decode_every_byte(ptx.value, dtype)  # type: ignore[attr-defined]
    table = torch.from_numpy(e2m1_table()).to(torch.float64)
    codes = torch.arange(256)
    torch.testing.assert_close(low * factor, table[codes % 16], rtol=0, atol=0)
    torch.testing.assert_close(high * factor, table[codes // 16], rtol=0, atol=0)
    # the sign of -0 survives (its code is 8)
    assert torch.signbit(low[8]) and torch.signbit(high[0x80])


def test_decoders_use_only_the_lanes_they_name() -> None:
    # every output register is written, and no other named register leaks into the outputs
    for ptx in (tc.NIBBLES_PTX_BF16, tc.NIBBLES_PTX_FP16, tc.E2M1_PTX_BF16, tc.E2M1_PTX_FP16):
        written = set(re.findall(r"^\s*\w[\w.]*\s+(\$\d)", ptx.value, flags=re.M))
        assert written == {"$0", "$1", "$2", "$3"}


def _factor_pair(exponent: int) -> int:
    """2^exponent as a bf16 in both halves of a 32-bit word (exponent inside bf16's normal range)."""
    bits = int(_bf16_bits(np.array([2.0**exponent]))[0])
    assert _bf16_values(np.array([bits]))[0] == 2.0**exponent
    return bits | (bits << 16)


def test_scaled_e2m1_decoder_gives_every_code_times_its_own_scale_exactly() -> None:
    # every byte in every lane, every e8m0 exponent 0..254 in every lane: each code's value times 2^(s - 127),
    # exact in bf16 (a power of two times e2m1 values stays inside bf16's range up to 6 * 2^127, which
    # overflows to inf in both the reference and the decoder's second product)
    table = e2m1_table().astype(np.float64)
    gen = np.random.default_rng(0)
    exponents = np.concatenate([np.arange(255), gen.integers(0, 255, 2 * 255)])
    for first in range(0, len(exponents), 4):
        lanes = exponents[first : first + 4]
        if len(lanes) < 4:
            lanes = np.concatenate([lanes, exponents[: 4 - len(lanes)]])
        data = [int(b) for b in gen.integers(0, 256, 4)]
        inputs = {"$4": sum(b << (8 * i) for i, b in enumerate(data))}
        for lane, s in enumerate(int(x) for x in lanes):  # F1 = 2^(h - 1), F2 = 2^(s - h), h = s >> 1
            inputs[f"${5 + lane}"] = _factor_pair((s >> 1) - 1)
            inputs[f"${9 + lane}"] = _factor_pair(s - (s >> 1))
        regs = run_ptx(tc.E2M1_SCALED_PTX_BF16.value, inputs)
        got = _bf16_values(
            np.array([h for r in ("$0", "$1", "$2", "$3") for h in (regs[r] & 0xFFFF, regs[r] >> 16)])
        )
        want = []
        for nibble in (0, 4):  # $0 $1: the low nibbles of bytes 0..3, $2 $3: the high ones
            for lane, b in enumerate(data):
                want.append(table[(b >> nibble) & 15] * 2.0 ** (int(lanes[lane]) - 127))
        want = np.array(want)  # 6 * 2^127 and past: inf, as bf16 rounds it
        want_bf16 = _bf16_values(
            _bf16_bits(np.where(np.abs(want) < 2.0**128, want, np.copysign(np.inf, want)))
        )
        np.testing.assert_array_equal(got, want_bf16)
        assert np.array_equal(np.signbit(got), np.signbit(want_bf16))  # -0 keeps its sign


def test_scaled_decoder_factors_stay_normal_bf16_for_every_scale() -> None:
    # why two factors: 2^(s - 1) alone is past bf16's largest exponent (127) from s = 129 on
    for s in range(255):
        h = s >> 1
        assert -126 <= h - 1 <= 127 and -126 <= s - h <= 127 and (h - 1) + (s - h) == s - 1
    assert 254 - 1 > 127
