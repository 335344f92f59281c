"""Triton helpers shared by the prefill/decode kernels (triton_moe) and the small-T kernels (triton_decode)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moetrt.op import quant

NEG_INF = tl.constexpr(float("-inf"))
# Triton's CPU interpreter runs no inline PTX: decoders written in PTX take their Triton-operation form there
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A kernel's start under programmatic dependent launch (plan.PDL_MODES): wait for the previous kernel; mode 1
    lets the next one launch now, mode 2 as this kernel's programs exit (no trigger)."""
    if PDL:
        gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b in fp32; IEEE: exact fp32 products (the float32 kernels), else the tensor cores' default."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, accumulated in place (as `dot`)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def glu(g, u, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    # ACTIVATION: 0 silu_glu, 1 gelu_glu, 2 gelu_tanh_glu, 3 swiglu_clamped (same order as spec.ACTIVATIONS)
    if ACTIVATION == 0:
        out = g * tl.sigmoid(g) * u
    elif ACTIVATION == 1:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    elif ACTIVATION == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = g * tl.sigmoid(2.0 * z) * u  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = (uc + 1.0) * (gc * tl.sigmoid(gc * ALPHA))
    return out


@triton.jit
def select_experts(
    lg,
    corr_bias_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    SCORING_SIGMOID: tl.constexpr,
    TOPK_BEFORE: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCALE: tl.constexpr,
    HAS_CORR_BIAS: tl.constexpr,
    RT: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
):
    """Routing of RT rows of fp32 logits [RT, E_PAD] (bias added): scores, (grouped) top-k, correction
    bias, renorm, scaling. Returns expert ids [RT, K_PAD] (i32) and routing weights [RT, K_PAD] (fp32);
    columns past K are padding."""
    cols = tl.arange(0, E_PAD)
    col_ok = cols[None, :] < E
    lg = tl.where(col_ok, lg, NEG_INF)
    if TOPK_BEFORE:
        scores = lg
    elif SCORING_SIGMOID:
        scores = tl.sigmoid(lg)
    else:
        p = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    choice = scores
    if HAS_CORR_BIAS:
        choice = choice + tl.load(corr_bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok, choice, NEG_INF)

    if N_GROUP > 1:
        # group score = sum of the group's two best experts; keep the TOPK_GROUP best groups
        EPG: tl.constexpr = E // N_GROUP
        group_of = cols // EPG
        gcols = tl.arange(0, G_PAD)
        group_score = tl.full((RT, G_PAD), NEG_INF, tl.float32)
        for g in tl.static_range(N_GROUP):
            v = tl.where((group_of == g)[None, :] & col_ok, choice, NEG_INF)
            m1 = tl.max(v, axis=1)
            s = m1
            if EPG > 1:
                i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], E_PAD), axis=1)
                s = m1 + tl.max(tl.where(cols[None, :] == i1[:, None], NEG_INF, v), axis=1)
            group_score = tl.where(gcols[None, :] == g, s[:, None], group_score)
        keep_group = tl.zeros((RT, G_PAD), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            gm = tl.max(group_score, axis=1)
            gi = tl.min(tl.where(group_score == gm[:, None], gcols[None, :], G_PAD), axis=1)
            hit_g = gcols[None, :] == gi[:, None]
            keep_group = tl.where(hit_g, 1, keep_group)
            group_score = tl.where(hit_g, NEG_INF, group_score)
        keep = tl.zeros((RT, E_PAD), dtype=tl.int32)
        for g in tl.static_range(N_GROUP):
            kept = tl.max(tl.where(gcols[None, :] == g, keep_group, 0), axis=1)
            keep = tl.where((group_of == g)[None, :] & (kept[:, None] > 0), 1, keep)
        choice = tl.where(keep > 0, choice, NEG_INF)

    kcols = tl.arange(0, K_PAD)
    ids = tl.zeros((RT, K_PAD), dtype=tl.int32)
    wts = tl.zeros((RT, K_PAD), dtype=tl.float32)
    # One max-reduction per pick: the score's bits made order-preserving as an int32, in the high half of an
    # int64 whose low half is (E_PAD - 1 - expert), so the max is the best score and, among equal scores,
    # the lowest expert id (torch.topk's order on ties). Reductions are what this loop's time goes to.
    bits = choice.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = (ordered.to(tl.int64) << 32) | (E_PAD - 1 - cols[None, :]).to(tl.int64)
    for j in tl.static_range(K):
        best = tl.max(keys, axis=1)
        idx = (E_PAD - 1) - (best & 0xFFFFFFFF).to(tl.int32)
        hit = cols[None, :] == idx[:, None]
        if HAS_CORR_BIAS or N_GROUP > 1:
            w = tl.sum(tl.where(hit, scores, 0.0), axis=1)  # the weight is the score, not the choice value
        else:
            hi = (best >> 32).to(tl.int32)
            w = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        wts = tl.where(kcols[None, :] == j, w[:, None], wts)
        keys = tl.where(hit, -9223372036854775807, keys)
    k_ok = kcols[None, :] < K
    if TOPK_BEFORE:
        p = tl.where(k_ok, tl.exp(wts - tl.max(tl.where(k_ok, wts, NEG_INF), axis=1)[:, None]), 0.0)
        wts = p / tl.sum(p, axis=1)[:, None]
    else:
        if NORM_TOPK:
            wts = wts / (tl.sum(tl.where(k_ok, wts, 0.0), axis=1)[:, None] + 1e-20)
        wts = wts * SCALE
    return ids, wts


@triton.jit
def route_rows(
    T,
    row0,
    logits_ws_ptr,
    router_b_ptr,
    logits_out_ptr,
    gate_part_ptr,
    gate_ws_ptr,
    corr_bias_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    SCORING_SIGMOID: tl.constexpr,
    TOPK_BEFORE: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCALE: tl.constexpr,
    HAS_CORR_BIAS: tl.constexpr,
    HAS_ROUTER_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    OUT_LOGITS: tl.constexpr,
    SPLIT: tl.constexpr,
    RT: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
):
    """Routing of the RT tokens from row0 (the top-k kernels: this program's), shared by the top-k kernels and
    the routed path: logits (sum of the router's SPLIT slices + bias, written out on request), the
    shared-expert gate, `select_experts`, the slots' expert ids and weights stored. Returns (ids, slots, slot_mask), each [RT, K_PAD]; `slot_ranks` numbers the slots
    of each expert."""
    rows = row0 + tl.arange(0, RT)
    row_ok = rows < T
    cols = tl.arange(0, E_PAD)
    lmask = row_ok[:, None] & (cols[None, :] < E)
    lg = tl.zeros((RT, E_PAD), dtype=tl.float32)
    # .cg (L2, not L1): the router kernel's last program reads what its other programs just wrote
    for sl in tl.static_range(SPLIT):
        lg += tl.load(
            logits_ws_ptr + sl * T * E + rows[:, None] * E + cols[None, :],
            mask=lmask,
            other=0.0,
            cache_modifier=".cg",
        )
    if HAS_ROUTER_BIAS:
        lg += tl.load(router_b_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    if OUT_LOGITS:
        out_ptrs = logits_out_ptr + rows[:, None] * E + cols[None, :]
        tl.store(out_ptrs, lg.to(logits_out_ptr.dtype.element_ty), mask=lmask)
    if HAS_SHARED:
        if HAS_SHARED_GATE:
            g_acc = tl.zeros((RT,), dtype=tl.float32)
            for sl in tl.static_range(SPLIT):
                g_acc += tl.load(gate_part_ptr + sl * T + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            gate = tl.sigmoid(g_acc)
        else:
            gate = tl.full((RT,), 1.0, tl.float32)
        tl.store(gate_ws_ptr + rows, gate, mask=row_ok)
    ids, wts = select_experts(
        lg,
        corr_bias_ptr,
        E,
        K,
        SCORING_SIGMOID,
        TOPK_BEFORE,
        NORM_TOPK,
        N_GROUP,
        TOPK_GROUP,
        SCALE,
        HAS_CORR_BIAS,
        RT,
        E_PAD,
        K_PAD,
        G_PAD,
    )
    kcols = tl.arange(0, K_PAD)
    slot_mask = row_ok[:, None] & (kcols[None, :] < K)
    slots = rows[:, None] * K + kcols[None, :]
    ids = tl.minimum(tl.maximum(ids, 0), E - 1)  # NaN logits must not index out of bounds
    tl.store(topk_ids_ptr + slots, ids, mask=slot_mask)
    tl.store(topk_w_ptr + slots, wts, mask=slot_mask)
    return ids, slots, slot_mask


@triton.jit
def slot_ranks(counts_ptr, ids, slot_mask):
    """Each slot's rank among its expert's slots (any order), from an atomic on the expert's counter."""
    return tl.atomic_add(counts_ptr + ids, 1, mask=slot_mask, sem="relaxed", scope="gpu")


@triton.jit
def reduce_h_tile_when_last(
    yw_ptr,
    out_ptr,
    htickets_ptr,
    pid_h,
    h,
    h_ok,
    T,
    K: tl.constexpr,
    H: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
    NTH: tl.constexpr,
):
    """The down kernels' fused reduction: the last program to finish H tile `pid_h` (ticket counter, after
    this CTA's stores) sums each token's K slot rows and its shared row of yw into the output, in slot order
    (deterministic, no float atomics). NTH: the grid's H tiles (programs per tile = programs / NTH)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(htickets_ptr + pid_h, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) // NTH - 1:
        tl.debug_barrier()
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            mask = (t < T)[:, None] & h_ok[None, :]
            acc = tl.zeros((BT, BH), dtype=tl.float32)
            for j in tl.static_range(K):
                acc += tl.load(
                    yw_ptr + (t * K + j)[:, None] * H + h[None, :], mask=mask, other=0.0, volatile=True
                ).to(tl.float32)
            if HAS_SHARED:
                acc += tl.load(
                    yw_ptr + (T * K + t)[:, None] * H + h[None, :], mask=mask, other=0.0, volatile=True
                ).to(tl.float32)
            tl.store(out_ptr + t[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# Weight decoding for quantized experts. Each decoder turns codes into float32 with a few integer operations
# and no float conversion of an integer: e4m3 and e2m1 codes are moved into the bits of an fp16 number (their
# exponent bias is made up by a power of two folded into the group's scale), int4 codes are OR-ed into the
# mantissa of 2^23. fp16 -> fp32 is exact for every code, subnormals included, and runs on every SM.
FP8_FP16_SCALE = tl.constexpr(256.0)  # 2^(15 - 7): fp16's exponent bias over e4m3's
FP4_FP16_SCALE = tl.constexpr(16384.0)  # 2^(15 - 1): fp16's exponent bias over e2m1's
INT_MAGIC = tl.constexpr(0x4B000000)  # the bits of 2^23: OR-ing an integer below 2^23 into them adds it
INT_MAGIC_VALUE = tl.constexpr(8388608.0)
FP8_E4M3_MAX = tl.constexpr(quant.FP8_E4M3_MAX)  # fp8 activations' scale is amax / this
NIBBLE_RUN = tl.constexpr(quant.NIBBLE_RUN)  # 4-bit codes' byte order (op.quant)


@triton.jit
def _fp16_bits_to_f32(bits):
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e4m3_unscaled(code):
    """e4m3fn codes (int32 0..255) as float32 / FP8_FP16_SCALE: sign to bit 15, exponent and mantissa below."""
    return _fp16_bits_to_f32(((code & 0x80) << 8) | ((code & 0x7F) << 7))


@triton.jit
def e2m1_unscaled(code):
    """e2m1 codes (int32 0..15) as float32 / FP4_FP16_SCALE (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives)."""
    return _fp16_bits_to_f32(((code & 8) << 12) | ((code & 7) << 9))


@triton.jit
def e8m0_value(exponent):
    """2^(e - 127) of e8m0 scale bytes (int32 1..254) from bits (0: 2^-127, as a subnormal)."""
    return tl.where(exponent == 0, 5.877471754111438e-39, (exponent << 23).to(tl.float32, bitcast=True))


@triton.jit
def int_plus_magic(code):
    """Integer codes (int32 0..2^23) as float32 2^23 + code: one OR, no int-to-float conversion."""
    return (code | INT_MAGIC).to(tl.float32, bitcast=True)


@triton.constexpr_function
def is_bf16(dtype):
    return dtype == tl.bfloat16


@triton.constexpr_function
def is_half(dtype):
    """bf16 or fp16: the types the PTX decoders below write."""
    return dtype == tl.bfloat16 or dtype == tl.float16


# 16-bit magic numbers of the PTX int4 decoder: OR-ing a code below 2^7 (bf16) or 2^10 (fp16) into the bits of
# 2^7 / 2^10 adds it, and the two halves of a 32-bit register hold two such numbers
NIBBLE_MAGIC_BF16 = tl.constexpr(128.0)
NIBBLE_MAGIC_FP16 = tl.constexpr(1024.0)
# The start of the 4-bit decoders: the four bytes b0..b3 of $4 to two pairs of 16-bit lanes, t0 = b0 | b1 << 16
# and t1 = b2 | b3 << 16
_LANES_HEAD = """{{
.reg .b32 {registers};
mov.b32 z, 0;
prmt.b32 t0, $4, z, 0x5140;
prmt.b32 t1, $4, z, 0x7362;
"""
# int4: after the lanes, each lane's low nibble ($0, $1) and high nibble ($2, $3) OR-ed into the magic number's
# bits: 2 PRMT, 2 SHF and 4 LOP3 for
# eight codes (the Triton form: about 5 instructions a code, measured in the sm_90 SASS of gate_up).
_NIBBLES_PTX = (
    _LANES_HEAD.format(registers="t0, t1, z")
    + """lop3.b32 $0, t0, 0x000F000F, MAGIC, 0xea;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0xea;
shr.u32 t0, t0, 4;
shr.u32 t1, t1, 4;
lop3.b32 $2, t0, 0x000F000F, MAGIC, 0xea;
lop3.b32 $3, t1, 0x000F000F, MAGIC, 0xea;
}"""
)
NIBBLES_PTX_BF16 = tl.constexpr(_NIBBLES_PTX.replace("MAGIC", "0x43004300"))
NIBBLES_PTX_FP16 = tl.constexpr(_NIBBLES_PTX.replace("MAGIC", "0x64006400"))


@triton.jit
def int4_values(byte, zero, OUT: tl.constexpr):
    """(low nibble - zero, high nibble - zero) of uint8 codes, exact in OUT (zero: [1, 1] or the rows' zero
    points [BR, 1], in fp32). Compiled bf16 / fp16: the PTX decoder above gives magic + code in OUT and one
    packed subtraction of magic + zero follows. float32, and the interpreter (which holds bf16 as raw bits and
    does no bf16 arithmetic): ((2^23 + code) - (2^23 + zero)) in float32, one OR and one subtraction."""
    if INTERPRETED or not is_half(OUT):
        code = byte.to(tl.int32)
        offset = zero + INT_MAGIC_VALUE
        low = (int_plus_magic(code & 15) - offset).to(OUT)
        high = (int_plus_magic(code >> 4) - offset).to(OUT)
    elif is_bf16(OUT):
        low, high = tl.inline_asm_elementwise(
            NIBBLES_PTX_BF16, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
        )
        offset = (zero + NIBBLE_MAGIC_BF16).to(OUT)
        low, high = low - offset, high - offset
    else:
        low, high = tl.inline_asm_elementwise(
            NIBBLES_PTX_FP16, "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
        )
        offset = (zero + NIBBLE_MAGIC_FP16).to(OUT)
        low, high = low - offset, high - offset
    return low, high


# e2m1 codes to the sign, exponent and mantissa bits of a 16-bit float, the lanes laid out as the int4 decoder
# lays them. bf16: sign (bit 3) to bit 15 and the three other bits to bits 6..8 by one multiply of the masked
# nibble (m * 0x1040 = m << 6 + m << 12: the two copies do not overlap, so no carry), then one mask; the high
# nibbles masked in place and multiplied by 0x104 (1.5 instructions a code). The value is the code's times
# 2^-126, its e = 0 codes subnormal, so callers multiply by a power of two (exact: bf16 arithmetic keeps
# subnormals). fp16: sign to bit 15, the other bits to 9..11, the value over FP4_FP16_SCALE (`e2m1_unscaled`).
# bf16, one output register: (masked nibbles) * multiplier, then the sign / exponent / mantissa mask
_E2M1_LANE_BF16 = """and.b32 a, {src}, {nibbles};
mul.lo.u32 a, a, {multiplier};
and.b32 {dst}, a, 0x81C081C0;
"""
# fp16, one output register (from lanes with the nibble in bits 0..3): magnitude bits to 9..11, sign to 15
_E2M1_LANE_FP16 = """and.b32 a, {src}, 0x00070007;
shl.b32 a, a, 9;
shl.b32 b, {src}, 12;
lop3.b32 {dst}, b, 0x80008000, a, 0xea;
"""
E2M1_PTX_BF16 = tl.constexpr(
    _LANES_HEAD.format(registers="t0, t1, a, z")
    + "".join(
        _E2M1_LANE_BF16.format(src=src, nibbles=nibbles, multiplier=multiplier, dst=dst)
        for src, nibbles, multiplier, dst in (
            ("t0", "0x000F000F", "0x1040", "$0"),
            ("t1", "0x000F000F", "0x1040", "$1"),
            ("t0", "0x00F000F0", "0x104", "$2"),
            ("t1", "0x00F000F0", "0x104", "$3"),
        )
    )
    + "}"
)
E2M1_PTX_FP16 = tl.constexpr(
    _LANES_HEAD.format(registers="t0, t1, h0, h1, a, b, z")
    + "shr.u32 h0, t0, 4;\nshr.u32 h1, t1, 4;\n"
    + "".join(
        _E2M1_LANE_FP16.format(src=src, dst=dst)
        for src, dst in (("t0", "$0"), ("t1", "$1"), ("h0", "$2"), ("h1", "$3"))
    )
    + "}"
)
E2M1_BF16_SCALE = tl.constexpr(2.0**126)  # the bf16 decoder's bits times this: the e2m1 value


@triton.jit
def e2m1_values(byte, OUT: tl.constexpr):
    """(low nibble, high nibble) of uint8 e2m1 codes as their values over FP4_FP16_SCALE, exact in OUT. Compiled
    bf16 / fp16: the PTX decoders above (bf16: one packed multiply by a power of two follows); float32 and the
    interpreter: the bit form (`e2m1_unscaled`)."""
    if INTERPRETED or not is_half(OUT):
        code = byte.to(tl.int32)
        low, high = e2m1_unscaled(code & 15).to(OUT), e2m1_unscaled(code >> 4).to(OUT)
    elif is_bf16(OUT):
        low, high = tl.inline_asm_elementwise(
            E2M1_PTX_BF16, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
        )
        FACTOR: tl.constexpr = E2M1_BF16_SCALE / FP4_FP16_SCALE
        low, high = low * FACTOR, high * FACTOR
    else:
        low, high = tl.inline_asm_elementwise(
            E2M1_PTX_FP16, "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
        )
    return low, high


@triton.jit
def _group_values(s_ptr, rows, row_ok, k0, GROUPS: tl.constexpr, BK: tl.constexpr, WB: tl.constexpr, other):
    """The values of a table [R, GROUPS] (one per WB reduction elements: scales, zero points) that the
    [rows, k0 : k0 + BK] tile uses: [BR] when a group spans the tile, [BR, BK / WB] when the tile spans
    whole groups, else (a group size that does not nest with the tile) one per element, [BR, BK]."""
    if WB % BK == 0:
        return tl.load(s_ptr + rows * GROUPS + k0 // WB, mask=row_ok, other=other)
    elif BK % WB == 0:
        NG: tl.constexpr = BK // WB
        g = k0 // WB + tl.arange(0, NG)
        return tl.load(
            s_ptr + rows[:, None] * GROUPS + g[None, :],
            mask=row_ok[:, None] & (g < GROUPS)[None, :],
            other=other,
        )
    else:
        g = (k0 + tl.arange(0, BK)) // WB
        return tl.load(
            s_ptr + rows[:, None] * GROUPS + g[None, :],
            mask=row_ok[:, None] & (g < GROUPS)[None, :],
            other=other,
        )


@triton.jit
def _broadcast_groups(value, BR: tl.constexpr, BK: tl.constexpr, WB: tl.constexpr):
    """Group values from `_group_values` spread over the [BR, BK] tile."""
    if WB % BK == 0:
        return tl.broadcast_to(value[:, None], (BR, BK))
    elif BK % WB == 0:
        NG: tl.constexpr = BK // WB
        return tl.reshape(tl.broadcast_to(value[:, :, None], (BR, NG, WB)), (BR, BK))
    else:
        return value


@triton.jit
def fp8_values(
    w_ptr, rows, row_ok, k0, K: tl.constexpr, BK: tl.constexpr, FP8_CVT: tl.constexpr, OUT: tl.constexpr
):
    """An fp8 tile [rows, BK] before its scale, exact in OUT: the e4m3 values (over FP8_FP16_SCALE when decoded
    from bits). FP8_CVT: the SM's e4m3 conversion (core.devices.has_fp8_conversion) instead of the bits."""
    ks = k0 + tl.arange(0, BK)
    code = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0)
    if FP8_CVT:
        value = code.to(tl.float8e4nv, bitcast=True).to(OUT)
    else:
        value = e4m3_unscaled(code.to(tl.int32)).to(OUT)
    return value


@triton.jit
def nibbles_in_k_order(low, high, BR: tl.constexpr, BK: tl.constexpr):
    """The [BR, BK] tile of 4-bit values from the decoded low and high nibbles [BR, BK / 2] of its bytes, stored
    in runs of NIBBLE_RUN (op.quant): byte 4r + j holds k = 8r + j and 8r + 4 + j. Each thread's four bytes of a
    32-bit word are one run, and in the sm_90 code the decoders' packed registers go to the mma as they are."""
    HALF: tl.constexpr = NIBBLE_RUN // 2
    low = tl.reshape(low, (BR, BK // NIBBLE_RUN, HALF))
    high = tl.reshape(high, (BR, BK // NIBBLE_RUN, HALF))
    return tl.reshape(tl.permute(tl.join(low, high), (0, 1, 3, 2)), (BR, BK))


@triton.jit
def nibble_bytes(w_ptr, rows, row_ok, k0, K: tl.constexpr, BK: tl.constexpr):
    """The uint8 bytes [rows, BK / 2] of a 4-bit tile [rows, BK from k0] in a table of [R, K / 2] bytes (two codes
    a byte in runs of NIBBLE_RUN, op.quant)."""
    KH: tl.constexpr = K // 2
    kb = k0 // 2 + tl.arange(0, BK // 2)
    return tl.load(
        w_ptr + rows[:, None] * KH + kb[None, :], mask=row_ok[:, None] & (kb < KH)[None, :], other=0
    )


@triton.jit
def nibble_values(
    w_ptr,
    z_ptr,
    rows,
    row_ok,
    k0,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    OUT: tl.constexpr,
):
    """A 4-bit tile [rows, BK] before its scale, exact in OUT: int4 code - zero (-15..15; the tile inside one
    group when HAS_ZERO, else zero 8), mxfp4 the e2m1 value over FP4_FP16_SCALE (`int4_values`,
    `e2m1_values`: PTX in compiled bf16 / fp16 kernels, bit arithmetic otherwise)."""
    byte = nibble_bytes(w_ptr, rows, row_ok, k0, K, BK)
    if WFMT == 2:
        if HAS_ZERO:
            zero = tl.load(z_ptr + rows * (K // WB) + k0 // WB, mask=row_ok, other=0).to(tl.float32)[:, None]
        else:
            zero = tl.full((1, 1), 8.0, tl.float32)  # symmetric: zero point 8
        low, high = int4_values(byte, zero, OUT)
    else:
        low, high = e2m1_values(byte, OUT)
    return nibbles_in_k_order(low, high, BR, BK)


@triton.jit
def weight_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    rows,
    row_ok,
    k0,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    OUT: tl.constexpr,
    FP8_CVT: tl.constexpr = 0,
):
    """One expert's weight tile [BR rows, BK of the reduction from k0], dequantized to OUT, from its table at
    w_ptr ([R, K] codes, or [R, K/2] bytes of two 4-bit codes in runs of NIBBLE_RUN) with its scales (and zero
    points). WFMT as spec.WEIGHT_FORMATS: 1 fp8_block (scale [ceil(R/WB), ceil(K/WB)]), 2 int4 (scale and zero
    [R, K/WB]; zero 8 without zero points), 3 mxfp4 (e8m0 scale bytes [R, K/32]).

    The codes are decoded as in the scaled form (`fp8_values`: from bits, or by the SM's e4m3 conversion with
    FP8_CVT, about a third of the instructions; `nibble_values`); scales (and zero points) are read once per
    group and turned into one factor (and one offset) per group before they are spread over the tile (where
    tile and group sizes nest, as powers of two do). mxfp4 in compiled bf16 folds each group's scale into the
    decoder instead (`mxfp4_tile_bf16`)."""
    if WFMT == 3 and is_bf16(OUT) and not INTERPRETED:  # the interpreter does no bf16 arithmetic
        return mxfp4_tile_bf16(w_ptr, s_ptr, rows, row_ok, k0, K, BR, BK, WB)  # masked codes decode to 0
    ks = k0 + tl.arange(0, BK)
    mask = row_ok[:, None] & (ks < K)[None, :]
    if WFMT == 1:
        KS: tl.constexpr = (K + WB - 1) // WB
        factor = _group_values(s_ptr, rows // WB, row_ok, k0, KS, BK, WB, 0.0)
        if not FP8_CVT:  # the bit decoder's values are over FP8_FP16_SCALE
            factor = factor * FP8_FP16_SCALE
        value = fp8_values(w_ptr, rows, row_ok, k0, K, BK, FP8_CVT, tl.float32) * _broadcast_groups(
            factor, BR, BK, WB
        )
    else:
        # the codes' values as in the scaled form (int4: code - 8), then the groups' zero points and scales
        value = nibble_values(w_ptr, z_ptr, rows, row_ok, k0, K, BR, BK, WFMT, WB, 0, tl.float32)
        KG: tl.constexpr = K // WB
        if WFMT == 2:
            if HAS_ZERO:  # (code - 8) - (zero - 8): small integers, exact
                zero = _group_values(z_ptr, rows, row_ok, k0, KG, BK, WB, 0).to(tl.float32)
                value = value - _broadcast_groups(zero - 8.0, BR, BK, WB)
            value = value * _broadcast_groups(
                _group_values(s_ptr, rows, row_ok, k0, KG, BK, WB, 0.0), BR, BK, WB
            )
        else:
            exponent = _group_values(s_ptr, rows, row_ok, k0, KG, BK, WB, 127).to(tl.int32)
            value = value * _broadcast_groups(e8m0_value(exponent) * FP4_FP16_SCALE, BR, BK, WB)
    return tl.where(mask, value, 0.0).to(OUT)


# mxfp4 in bf16 with each group's e8m0 scale folded into the decoder: the e2m1 bits as the bf16 decoder above places
# them (the value times 2^-126), then two packed multiplies by factors F1 = 2^(h - 1) and F2 = 2^(s - h), h = s >> 1,
# whose product is 2^(s - 1): each is a normal bf16 for every s in 0..254 (2^(s - 1) alone leaves bf16's range
# from s = 129 on), so both products are exact (the first may be subnormal: bf16 arithmetic keeps subnormals). $5..$8 and
# $9..$12 are F1 and F2 of the four bytes of $4, each as a bf16 pair of two equal halves; the pair of two lanes is
# the low half of one and the high half of the next. fma with -0 as the addend: the product itself, its sign kept,
# on every SM with bf16 tensor cores (mul.bf16x2 needs SM 9.0).
E2M1_SCALED_PTX_BF16 = tl.constexpr(
    _LANES_HEAD.format(registers="t0, t1, a, z, nz, g01, g23, k01, k23")
    + """mov.b32 nz, 0x80008000;
prmt.b32 g01, $5, $6, 0x7610;
prmt.b32 g23, $7, $8, 0x7610;
prmt.b32 k01, $9, $10, 0x7610;
prmt.b32 k23, $11, $12, 0x7610;
"""
    + "".join(
        _E2M1_LANE_BF16.format(src=src, nibbles=nibbles, multiplier=multiplier, dst=dst)
        + f"fma.rn.bf16x2 {dst}, {dst}, g{pair}, nz;\nfma.rn.bf16x2 {dst}, {dst}, k{pair}, nz;\n"
        for src, nibbles, multiplier, dst, pair in (
            ("t0", "0x000F000F", "0x1040", "$0", "01"),
            ("t1", "0x000F000F", "0x1040", "$1", "23"),
            ("t0", "0x00F000F0", "0x104", "$2", "01"),
            ("t1", "0x00F000F0", "0x104", "$3", "23"),
        )
    )
    + "}"
)
# a biased exponent times this: 2^(exponent - 127) in both bf16 halves of a 32-bit word
BF16_PAIR_EXPONENT = tl.constexpr(0x00800080)


@triton.jit
def mxfp4_tile_bf16(
    w_ptr, s_ptr, rows, row_ok, k0, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, WB: tl.constexpr
):
    """`weight_tile` of mxfp4 codes in bf16 with each group's scale folded into the decoder
    (`E2M1_SCALED_PTX_BF16`): the two factors are made once per group and row, then spread over the group's
    bytes, and every byte's codes are multiplied by its own group's factors. Exact for every code and e8m0
    exponent (a weight past bf16's range, 6 * 2^127, is inf, as `op.quant.dequantize`'s cast to bf16), so the
    tile equals the float32 form's, and it may span scale groups with no per-group product or sum."""
    KG: tl.constexpr = K // WB
    s = _group_values(s_ptr, rows, row_ok, k0, KG, BK, WB, 127).to(tl.int32)
    h = s >> 1
    f1 = _broadcast_groups((h + 126) * BF16_PAIR_EXPONENT, BR, BK // 2, WB // 2)  # 2^(h - 1)
    f2 = _broadcast_groups((s - h + 127) * BF16_PAIR_EXPONENT, BR, BK // 2, WB // 2)  # 2^(s - h)
    low, high = tl.inline_asm_elementwise(
        E2M1_SCALED_PTX_BF16,
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [nibble_bytes(w_ptr, rows, row_ok, k0, K, BK), f1, f2],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )
    return nibbles_in_k_order(low, high, BR, BK)


@triton.jit
def expert_tables(
    w_ptr, s_ptr, z_ptr, e, R: tl.constexpr, C: tl.constexpr, WFMT: tl.constexpr, WB: tl.constexpr
):
    """Expert e's quantized weight [R rows, C reduction] in the op's stacked inputs: its codes (fp8 codes, or two
    4-bit codes per byte), its scales (fp8: [ceil(R / WB), ceil(C / WB)] blocks, 4-bit: [R, C / WB] groups)
    and its zero points ([R, C / WB]), as spec.scale_shape lays them out."""
    CC: tl.constexpr = C if WFMT == 1 else C // 2
    SC: tl.constexpr = ((R + WB - 1) // WB) * ((C + WB - 1) // WB) if WFMT == 1 else R * (C // WB)
    e64 = e.to(tl.int64)
    return w_ptr + e64 * (R * CC), s_ptr + e64 * SC, z_ptr + e64 * (R * (C // WB))


@triton.jit
def fp8_codes(w_ptr, rows, row_ok, k0, K: tl.constexpr, BK: tl.constexpr):
    """An fp8 tile [rows, BK] as Triton's e4m3 type, for the fp8 tensor cores (no conversion), loaded through an
    e4m3 pointer: no bitcast stands between the load and the tensor cores, so the tile can go from the load
    pipeline's shared memory straight into the MMA. `fp8_values` loads its own bytes: below SM 8.9 Triton
    refuses the e4m3 type even as a pointer or bitcast target."""
    ks = k0 + tl.arange(0, BK)
    return tl.load(
        w_ptr.to(tl.pointer_type(tl.float8e4nv)) + rows[:, None] * K + ks[None, :],
        mask=row_ok[:, None] & (ks < K)[None, :],
        other=0.0,
    )


@triton.jit
def row_scales(
    s_ptr,
    rows,
    row_ok,
    k0,
    K: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    FP8_CVT: tl.constexpr,
):
    """[rows] float32: the factor of each row of a tile inside one scale group (`fp8_values`, `nibble_values`):
    its group's scale, times the power of two that the arithmetic decoders leave out."""
    if WFMT == 1:
        KS: tl.constexpr = (K + WB - 1) // WB
        scale = tl.load(s_ptr + (rows // WB) * KS + k0 // WB, mask=row_ok, other=0.0)
        if not FP8_CVT:
            scale = scale * FP8_FP16_SCALE
    elif WFMT == 2:
        scale = tl.load(s_ptr + rows * (K // WB) + k0 // WB, mask=row_ok, other=0.0)
    else:
        exponent = tl.load(s_ptr + rows * (K // WB) + k0 // WB, mask=row_ok, other=127).to(tl.int32)
        scale = e8m0_value(exponent) * FP4_FP16_SCALE
    return scale
