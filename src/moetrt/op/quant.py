"""Quantized expert weights: the formats the fused op carries, their layouts, and their arithmetic.

Every format keeps the expert weight in the op's canonical [E, N, K] orientation (N output features, K the
reduction, contiguous) as uint8 codes, with scales (and zero points) beside it. A weight's value is:

    fp8_block  codes [E, N, K]      e4m3fn bit patterns      scale float32 [E, ceil(N/B), ceil(K/B)]
               w[n, k] = fp8(code) * scale[n // B, k // B]               (B = weight_block, 128 as released)
    int4       codes [E, N, K/2]    two 4-bit codes a byte   scale float32 [E, N, K/G]   zero uint8 [E, N, K/G]
               w[n, k] = (code - zero) * scale[n, k // G]    (no zero input: zero = 8, symmetric)
    mxfp4      codes [E, N, K/2]    two e2m1 codes a byte    scale uint8 (e8m0) [E, N, K/32]
               w[n, k] = e2m1(code) * 2^(scale[n, k // 32] - 127)

fp8 activations (``activation_format`` fp8_block): the routed experts' inputs x [..., K] are quantized per row
and block of B along K, scale = amax / 448 (1 for an all-zero block), q = e4m3(x / scale) rounded to nearest
even, both divisions correctly rounded; the GEMMs multiply codes and apply the activation scale with the
weight's (`fp8_activations` gives q * scale, what the reference and the function body compute with).

Two codes share a byte, in runs of NIBBLE_RUN = 8 codes: byte 4r + j (j < 4) holds k = 8r + j in its low
nibble (bits 0-3) and k = 8r + 4 + j in its high nibble (bits 4-7). A 32-bit word is then 8 consecutive codes,
its low nibbles the first four: a decoded register holds two adjacent k, as a tensor-core operand takes them
(docs/kernels.md, "4-bit codes in runs of 8"). Checkpoints that pair k = 2j and 2j + 1 in byte j
(`pairs_to_runs`) are reordered byte by byte, never dequantized.
Quantizing (`quantize`) rounds to nearest with one scale per block or group (amax / the format's largest
code; MXFP4's shared exponent as the OCP MX specification derives it); `dequantize` is the exact inverse
mapping used by the reference, the function body's tables and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moetrt.op.spec import FP8_BLOCK, INT4, INT4_SYMMETRIC_ZERO, MXFP4, NIBBLE_RUN, scale_shape

FP8_E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127


def fp8_e4m3_table() -> np.ndarray:
    """float32 value of each e4m3fn code (0x7F and 0xFF are NaN)."""
    codes = torch.arange(256, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn).float().numpy()


def e2m1_table() -> np.ndarray:
    return np.asarray(E2M1_VALUES, dtype=np.float32)


@dataclass(frozen=True)
class QuantizedWeight:
    """One expert table in a quantized format: codes, scales, and zero points (int4 asymmetric only)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 bytes [..., K/2] in runs of NIBBLE_RUN -> the 4-bit codes [..., K] in k order."""
    half = NIBBLE_RUN // 2
    low, high = (codes & 0x0F).unflatten(-1, (-1, half)), (codes >> 4).unflatten(-1, (-1, half))
    return torch.cat([low, high], dim=-1).flatten(-2)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """4-bit codes [..., K] in k order (K a multiple of NIBBLE_RUN) -> uint8 bytes [..., K/2] in runs."""
    half = NIBBLE_RUN // 2
    runs = nibbles.to(torch.uint8).unflatten(-1, (-1, NIBBLE_RUN))
    return (runs[..., :half] | (runs[..., half:] << 4)).flatten(-2)


def pairs_to_runs(codes: torch.Tensor) -> torch.Tensor:
    """Bytes whose byte j holds k = 2j (low nibble) and 2j + 1 (high), as GPTQ / AWQ unpack to and GPT-OSS's
    MXFP4 blocks store them -> the op's runs of NIBBLE_RUN (a reorder of 4-bit fields, no value changes)."""
    # each run of 4 bytes p0..p3 holds (k0, k1) .. (k6, k7); byte j of the run takes k = j and 4 + j, by nibble
    # moves within the run (no [..., K] expansion: a checkpoint layer is held about twice, not three times)
    p0, p1, p2, p3 = codes.unflatten(-1, (-1, NIBBLE_RUN // 2)).unbind(-1)
    runs = (
        (p0 & 0x0F) | ((p2 & 0x0F) << 4),  # k0, k4
        (p0 >> 4) | (p2 & 0xF0),  # k1, k5
        (p1 & 0x0F) | ((p3 & 0x0F) << 4),  # k2, k6
        (p1 >> 4) | (p3 & 0xF0),  # k3, k7
    )
    return torch.stack(runs, dim=-1).flatten(-2)


def dequantize(weight_format: str, block: int, q: QuantizedWeight, k: int) -> torch.Tensor:
    """float32 [..., N, K] of codes [..., N, K or K/2] (any leading dims, e.g. the experts)."""
    if weight_format == FP8_BLOCK:
        values = q.codes.contiguous().view(torch.float8_e4m3fn).float()
        n = values.shape[-2]
        scale = q.scale.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
        return values * scale[..., :n, :k]
    nibbles = unpack_nibbles(q.codes)
    if weight_format == INT4:
        zero = (
            q.zero if q.zero is not None else torch.full_like(q.scale, INT4_SYMMETRIC_ZERO, dtype=torch.uint8)
        )
        zero = zero.float().repeat_interleave(block, dim=-1)
        return (nibbles.float() - zero) * q.scale.float().repeat_interleave(block, dim=-1)
    if weight_format == MXFP4:
        values = torch.from_numpy(e2m1_table()).to(nibbles.device)[nibbles.long()]
        exponent = q.scale.float() - E8M0_BIAS
        return values * torch.exp2(exponent).repeat_interleave(block, dim=-1)
    raise ValueError(f"unknown weight format {weight_format!r}")


def quantize(
    weight_format: str, block: int, weight: torch.Tensor, zero_point: bool = False
) -> QuantizedWeight:
    """Round-to-nearest quantization of float [..., N, K] weights, one scale per block or group."""
    w = weight.float()
    n, k = w.shape[-2:]
    if weight_format == FP8_BLOCK:
        rows, cols = scale_shape(FP8_BLOCK, block, n, k)
        padded = torch.nn.functional.pad(w, (0, cols * block - k, 0, rows * block - n))
        tiles = padded.unflatten(-1, (cols, block)).unflatten(-3, (rows, block))  # [..., R, B, C, B]
        amax = tiles.abs().amax(dim=(-3, -1))  # [..., R, C]
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
        full = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :n, :k]
        codes = (w / full).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return QuantizedWeight(codes.contiguous(), scale.contiguous())
    groups = w.unflatten(-1, (k // block, block))  # [..., N, K/G, G]
    if weight_format == INT4:
        if zero_point:
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
            scale = torch.where(high > low, (high - low) / 15, torch.ones_like(high))
            zero = (-low / scale).round().clamp(0, 15)
        else:
            amax = groups.abs().amax(dim=-1)
            scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
            zero = torch.full_like(scale, INT4_SYMMETRIC_ZERO)
        codes = (groups / scale[..., None] + zero[..., None]).round().clamp(0, 15).flatten(-2)
        stored_zero = zero.to(torch.uint8).contiguous() if zero_point else None
        return QuantizedWeight(pack_nibbles(codes).contiguous(), scale.contiguous(), stored_zero)
    if weight_format == MXFP4:
        amax = groups.abs().amax(dim=-1)
        # OCP MX: shared exponent = floor(log2(amax)) - emax of e2m1 (2); an all-zero group gets 2^-127.
        exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -E8M0_BIAS))
        exponent = exponent.clamp(-E8M0_BIAS, 127)
        scaled = groups / torch.exp2(exponent)[..., None]
        grid = torch.from_numpy(e2m1_table()[:8]).to(w.device)  # the non-negative codes 0..7
        nearest = (scaled.abs()[..., None] - grid).abs().argmin(dim=-1)  # saturates at 6
        codes = torch.where((scaled < 0) & (nearest > 0), nearest + 8, nearest).flatten(-2)  # zero is +0
        scale = (exponent + E8M0_BIAS).to(torch.uint8)
        return QuantizedWeight(pack_nibbles(codes).contiguous(), scale.contiguous())
    raise ValueError(f"cannot quantize to {weight_format!r}")


def fp8_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """float32 values of x [..., K] quantized to e4m3 per row and `block`-wide block of K (the last one may be
    shorter), scale = amax / 448: what the fp8 tensor-core GEMMs see of their activations."""
    # Both divisions correctly rounded to float32 (through float64), as the kernels' div_rn: CUDA's float32
    # division is not, and values of bf16 inputs often land exactly on a tie between two e4m3 numbers.
    v = x.double()
    k = v.shape[-1]
    cols = -(-k // block)
    padded = torch.nn.functional.pad(v, (0, cols * block - k)).unflatten(-1, (cols, block))
    amax = padded.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, (amax / FP8_E4M3_MAX).float().double(), torch.ones_like(amax))
    q = (padded / scale).float().to(torch.float8_e4m3fn).double()
    return (q * scale).float().flatten(-2)[..., :k]
