#!/usr/bin/env python3
"""Decode expert GEMMs with weight tiles streamed by a TMA producer warp, in Gluon: a probe (bf16, int4, mxfp4).

At one token a step the expert GEMMs only stream weights, and one launch does not reach the copy rate: the 66 MB
of Qwen3-Next's experts at T = 1 take 25.0 µs in the fused experts kernel, 26.9 µs as the GEMMs' tiles read by
pointer and 21.9 µs as the same tiles read by TMA, with nothing computed (bench/stream_probe.py; docs/kernels.md,
"The one-token step against what one launch can stream"); at T = 8 the down projection streams at ~84 % of the
copy rate where gate_up reaches ~98 % (the stage times there over the expected bytes: 80 slots hit ~74 of 512
experts). TMA weight loads inside the launcher's `tl` decode kernels were slower,
not faster: the waits on their barriers sit in the same warps as the products. Here a producer warp of its own
keeps a ring full:

- the producer (one warp, 24 registers) loads each reduction step's weight tiles (gate_up: the gate and the up
  tile; down: one) of the tile's expert by TMA into a ring of STAGES buffers in shared memory, through a
  descriptor built on the device; `ready` counts their bytes, `empty` is handed back by the consumer, so the
  bytes in flight are the ring's, not the consumer's registers';
- the consumer (the default partition: a warp per 16 weight rows) stages the block's 8 input rows (gate_up: x
  of its tokens; down: its activation rows) in shared memory and, with int4 weights, the tile's group scales;
  each step it waits for a stage, reads its tiles into registers, hands the stage back at once (mma.sync reads
  registers) and multiplies W @ in.T on mma.m16n8k16 (the tokens the mma's N = 8 side): bf16 tiles as the first
  operand by ldmatrix, 4-bit code words in the layout whose decoded registers are the first operand as they are
  (`int4_decode_probe._code_layout`): int4 scaled per weight row on each group's product (`_weight_tile`),
  mxfp4 with each group's e8m0 exponent folded into the decoder as the launcher folds it (`_e2m1_tile`; an mma
  of this operand pairs k with k + 32, so two groups meet in one product);
- then gate_up's activation (SiLU-GLU) and [8, BN] store, or down's rows times their routing weights, stored per
  slot (the sum over a token's slots, fused into the launcher's down_rows at decode, is not part of the probe);
- every program walks its tiles in a loop with the ring's position and phase running on across them, so one
  cubin runs one program a tile or a persistent grid of one program an SM (`_persist`): down's reduction is
  short (I = 512: 4 steps of 128), and there the producer loads the next tile's steps during this one's.

    PYTHONPATH=src:bench python3 bench/decode_ws_probe.py --compile-only --sm 90     # no GPU needed
    PYTHONPATH=src:bench python3 bench/decode_ws_probe.py --shapes qwen3_next,qwen3_30b --tokens 1,8,64

The layout and gate_up's reference are int4_decode_probe's (rows per expert in blocks of 8; no shared expert),
so its rows and these compare in one run: int4 gate_up with its words loaded into registers
(`int4_decode_probe.py`) against the ring (`int4/gate_up`). Beside the bf16 forms the same GEMMs run in the
launcher kernels' form (`bf16/gate_up_tl`, `bf16/down_tl`: bench/tma_probe.py's pointer-load `tl` kernels on
16-row blocks, `tl.dot`'s least M, judged by the same references); `bench/stage_times.py --alone` times the
launcher's own stages. On a GPU every form first runs on the tiny shape in a child process with a timeout
(`--smoke-timeout`, bench/ws_probe.py's smoke pass): a barrier never completed cannot be stopped on the GPU, only
its process killed, so a form that hangs or is wrong there is left out. Each row is checked against the float32
reference on the same (dequantized) weights, bf16 tolerance, exit 1 on a failure, and timed by CUDA-graph replay
with the L2 flushed; `weights_GBps` is the routed experts' stored weight bytes over the time. Under
TRITON_INTERPRET=1 the baselines run on the CPU (the interpreter runs no Gluon):

    TRITON_INTERPRET=1 PYTHONPATH=src:bench python3 bench/decode_ws_probe.py --shapes tiny --tokens 1,24
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import triton
from int4_decode_probe import GROUP, SHAPES, TOKENS, _code_layout, _weight_tile, _x_layout, gate_up_reference
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from ws_probe import TMA_PRODUCER_REGS, compile_for, error_line, kernel_summary

from moetrt.kernels.triton_common import BF16_PAIR_EXPONENT, E2M1_SCALED_PTX_BF16
from moetrt.op.spec import MXFP4_GROUP

#: reduction elements a step: one int4 scale group; four mxfp4 groups (the k-width-8 operand needs 64 k at least,
#: and its mmas pair k with k + 32, so mxfp4's scales go into the decoder, not onto a product); bf16 tiles 128
#: bytes wide (TMA's widest swizzle)
STEP_K = {"int4": GROUP, "mxfp4": GROUP, "bf16": 64}
#: the kernels' weight format constexpr
FORMAT = {"bf16": 0, "int4": 1, "mxfp4": 2}
#: the launcher's folded mxfp4 decoder, for words whose four bytes share one scale group (runs of 8 codes lie in
#: one group of 32): a lane's factor pair is its first byte's, so the pairs of two bytes' factors (PRMT) go
_PAIRED_FACTORS = (
    "prmt.b32 g01, $5, $6, 0x7610;\nprmt.b32 g23, $7, $8, 0x7610;\n"
    "prmt.b32 k01, $9, $10, 0x7610;\nprmt.b32 k23, $11, $12, 0x7610;\n"
)
assert _PAIRED_FACTORS in E2M1_SCALED_PTX_BF16.value
E2M1_PTX = gl.constexpr(
    E2M1_SCALED_PTX_BF16.value.replace(
        _PAIRED_FACTORS, "mov.b32 g01, $5;\nmov.b32 g23, $5;\nmov.b32 k01, $9;\nmov.b32 k23, $9;\n"
    )
)
PAIR_EXPONENT = gl.constexpr(BF16_PAIR_EXPONENT.value)
MX_GROUP = gl.constexpr(MXFP4_GROUP)


@gluon.constexpr_function
def _row_major(*shape):
    """A plain row-major shared layout of one step's tile (sides powers of two), so that a [STEPS, *shape] buffer
    is `.index`ed by step (a layout of the whole buffer's rank keeps the step's dimension)."""
    bases = []
    for dim in reversed(range(len(shape))):
        for bit in range(shape[dim].bit_length() - 1):
            bases.append([1 << bit if d == dim else 0 for d in range(len(shape))])
    return gl.SharedLinearLayout(offset_bases=bases)


@gluon.constexpr_function
def _code_layout3(BN, BK, num_warps):
    """`int4_decode_probe._code_layout` with the byte columns split into (scale group, byte in the group):
    [BN, BK / 32, 16], so a group's values ([BN, BK / 32], its SliceLayout(2)) broadcast over its bytes in
    registers. The same bases, a byte column c read as (c // 16, c % 16)."""
    flat = _code_layout(BN, BK, num_warps)

    def split(bases):
        return [[row, col // 16, col % 16] for row, col in bases]

    return gl.DistributedLinearLayout(
        reg_bases=split(flat.reg_bases), lane_bases=split(flat.lane_bases), warp_bases=split(flat.warp_bases),
        block_bases=[], shape=[BN, BK // 32, 16],
    )  # fmt: skip


@gluon.jit
def _e2m1_tile(byte, exponent, BN: gl.constexpr, BK: gl.constexpr, A: gl.constexpr, num_warps: gl.constexpr):
    """The [BN, BK] bf16 values of a [BN, BK / 2] mxfp4 byte tile in runs of 8, as operand A, each group's e8m0
    exponent ([BN, BK / 32]) folded into the decoder as the launcher's `mxfp4_tile_bf16` folds it
    (`E2M1_SCALED_PTX_BF16`: two packed multiplies by 2^(h - 1) and 2^(e - h), h = e >> 1, exact for every e)."""
    L3: gl.constexpr = _code_layout3(BN, BK, num_warps)
    b3 = gl.convert_layout(gl.reshape(byte, (BN, BK // 32, 16)), L3, assert_trivial=True)
    e = exponent.to(gl.int32)
    h = e >> 1
    f1 = gl.expand_dims((h + 126) * PAIR_EXPONENT, 2).broadcast_to((BN, BK // 32, 16))
    f2 = gl.expand_dims((e - h + 127) * PAIR_EXPONENT, 2).broadcast_to((BN, BK // 32, 16))
    low, high = gl.inline_asm_elementwise(
        E2M1_PTX, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [b3, f1, f2], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
        pack=4,
    )  # fmt: skip
    low = gl.reshape(low, (BN, BK // 8, 4))
    high = gl.reshape(high, (BN, BK // 8, 4))
    w = gl.reshape(gl.permute(gl.join(low, high), (0, 1, 3, 2)), (BN, BK))  # k = 8 run + 4 half + j
    return gl.convert_layout(w, A, assert_trivial=True)


@gluon.constexpr_function
def _x_smem_layout(BK, FMT, ROWS):
    """x's shared layout: the 4-bit operand pairs k with k + 32 (`_x_layout`); bf16's is ldmatrix's own."""
    if FMT:
        return _x_layout(BK, ROWS)
    return gl.NVMMASharedLayout.get_default_for([ROWS, BK], gl.bfloat16)


@gluon.jit
def _producer(
    w_desc, g_bufs, u_bufs, ready, empty, block_expert_ptr, num_tiles, KD: gl.constexpr, ND: gl.constexpr,
    BN: gl.constexpr, BK: gl.constexpr, DOWN: gl.constexpr,
):  # fmt: skip
    """Each step's weight tiles of the tile's expert (gate_up: the gate and the up tile; down: one), by TMA, into
    the ring; stored columns a step: BK weights, or BK / 2 bytes of 4-bit codes. The ring's position and phase
    run on across the program's tiles, so the next tile's first stages load during this one's last steps."""
    STAGES: gl.constexpr = g_bufs.shape[0]
    COLS: gl.constexpr = g_bufs.shape[2]
    NT: gl.constexpr = ND // BN
    MATS: gl.constexpr = 1 if DOWN else 2
    c = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        row = gl.load(block_expert_ptr + tile // NT) * (MATS * ND) + (tile % NT) * BN
        for i in range(KD // BK):
            s = c % STAGES
            # a fresh barrier counts as having completed the phase before its first: the first STAGES waits pass
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), MATS * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [row, i * COLS], ready.index(s), g_bufs.index(s))
            if not DOWN:
                tma.async_copy_global_to_shared(w_desc, [row + ND, i * COLS], ready.index(s), u_bufs.index(s))
            c += 1


@gluon.jit
def _consumer(
    g_bufs, u_bufs, ready, empty, in_ptr, scales_ptr, out_ptr, block_expert_ptr, in_row_ptr, row_slot_ptr,
    row_w_ptr, num_tiles, KD: gl.constexpr, ND: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
    FMT: gl.constexpr, DOWN: gl.constexpr, ROWS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    STAGES: gl.constexpr = g_bufs.shape[0]
    STEPS: gl.constexpr = KD // BK
    NT: gl.constexpr = ND // BN
    MATS: gl.constexpr = 1 if DOWN else 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8]
    )
    # 4-bit codes: eight consecutive k a thread (one word of codes); bf16: two, as ldmatrix gives them
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8 if FMT else 2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8 if FMT else 2)
    XROWS: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, num_warps], [1, 0])
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [STEPS, ROWS, BK], _x_smem_layout(BK, FMT, ROWS))
    if FMT == 1:  # int4: a step's fp32 group scale per row
        sg_smem = gl.allocate_shared_memory(gl.float32, [STEPS, BN], _row_major(BN))
        su_smem = gl.allocate_shared_memory(gl.float32, [STEPS, BN], _row_major(BN))
    if FMT == 2:  # mxfp4: a step's BK / 32 e8m0 exponents per row
        G: gl.constexpr = BK // MX_GROUP
        EXP: gl.constexpr = gl.SliceLayout(2, _code_layout3(BN, BK, num_warps))
        sg_smem = gl.allocate_shared_memory(gl.uint8, [STEPS, BN, G], _row_major(BN, G))
        su_smem = gl.allocate_shared_memory(gl.uint8, [STEPS, BN, G], _row_major(BN, G))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, XROWS))
    zero = gl.zeros((BN, ROWS), gl.float32, mma)
    c = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        b = tile // NT
        n0 = (tile % NT) * BN
        gl.thread_barrier()  # every warp is done with the previous tile's rows before they are replaced
        # the block's input rows (gate_up: x of its tokens; down: its activation rows), all of the reduction,
        # into shared memory (the producer fills the ring meanwhile)
        in_row = gl.load(in_row_ptr + b * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, XROWS)))
        x_ptrs = in_ptr + in_row.to(gl.int64)[:, None] * KD + xk[None, :]
        for i in range(STEPS):
            x_smem.index(i).store(gl.load(x_ptrs + i * BK, mask=(in_row >= 0)[:, None], other=0.0))
        if FMT == 1:
            # the tile's group scales, a step's [BN] of them a row of shared memory ([STEPS, BN] each)
            w_row = gl.load(block_expert_ptr + b) * (MATS * ND) + n0
            s_ptrs = (
                scales_ptr + (w_row + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))).to(gl.int64) * STEPS
            )
            for j in range(STEPS):
                sg_smem.index(j).store(gl.load(s_ptrs + j))
                if not DOWN:
                    su_smem.index(j).store(gl.load(s_ptrs + ND * STEPS + j))
        if FMT == 2:
            # the tile's exponents, a step's [BN, BK / 32] of them a block of shared memory
            w_row = gl.load(block_expert_ptr + b) * (MATS * ND) + n0
            e_rows = (w_row + gl.arange(0, BN, layout=gl.SliceLayout(1, EXP))).to(gl.int64)
            e_ptrs = (
                scales_ptr
                + e_rows[:, None] * (KD // MX_GROUP)
                + gl.arange(0, G, layout=gl.SliceLayout(0, EXP))[None, :]
            )
            for j in range(STEPS):
                sg_smem.index(j).store(gl.load(e_ptrs + j * G))
                if not DOWN:
                    su_smem.index(j).store(gl.load(e_ptrs + ND * (KD // MX_GROUP) + j * G))
        gl.thread_barrier()
        acc_g = gl.zeros((BN, ROWS), gl.float32, mma)
        acc_u = gl.zeros((BN, ROWS), gl.float32, mma)
        for i in range(STEPS):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            if FMT:
                g = g_bufs.index(s).load(_code_layout(BN, BK, num_warps))
                if not DOWN:
                    u = u_bufs.index(s).load(_code_layout(BN, BK, num_warps))
            else:
                g = g_bufs.index(s).load(A)
                if not DOWN:
                    u = u_bufs.index(s).load(A)
            # the tiles are in registers (mma.sync reads those): the stage goes back to the producer now
            mbarrier.arrive(empty.index(s), count=1)
            xt = x_smem.index(i).permute((1, 0)).load(B)
            if FMT == 1:
                s_g = sg_smem.index(i).load(gl.SliceLayout(1, mma))
                acc_g += mma_v2(_weight_tile(g, BN, BK, A), xt, zero) * s_g[:, None]
                if not DOWN:
                    s_u = su_smem.index(i).load(gl.SliceLayout(1, mma))
                    acc_u += mma_v2(_weight_tile(u, BN, BK, A), xt, zero) * s_u[:, None]
            elif FMT == 2:
                acc_g = mma_v2(_e2m1_tile(g, sg_smem.index(i).load(EXP), BN, BK, A, num_warps), xt, acc_g)
                if not DOWN:
                    acc_u = mma_v2(_e2m1_tile(u, su_smem.index(i).load(EXP), BN, BK, A, num_warps), xt, acc_u)
            else:
                acc_g = mma_v2(g, xt, acc_g)
                if not DOWN:
                    acc_u = mma_v2(u, xt, acc_u)
            c += 1
        n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        rows = b * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, mma))
        if DOWN:  # each slot's weighted row (the sum over a token's slots is not part of the probe)
            slot = gl.load(row_slot_ptr + rows)
            y = (acc_g * gl.load(row_w_ptr + rows)[None, :]).to(out_ptr.dtype.element_ty)
            gl.store(out_ptr + slot.to(gl.int64)[None, :] * ND + n[:, None], y, mask=(slot >= 0)[None, :])
        else:
            act = (acc_g / (1.0 + gl.exp(-acc_g)) * acc_u).to(out_ptr.dtype.element_ty)
            gl.store(out_ptr + rows[None, :] * ND + n[:, None], act)


@gluon.jit
def decode_ws(
    w_ptr, scales_ptr, in_ptr, out_ptr, block_expert_ptr, in_row_ptr, row_slot_ptr, row_w_ptr, num_tiles,
    E: gl.constexpr, KD: gl.constexpr, ND: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
    STAGES: gl.constexpr, FMT: gl.constexpr, DOWN: gl.constexpr, ROWS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """Tiles (block of ROWS rows: 8, or 16 as the launcher's decode blocks, BN output columns), one a program or a persistent grid looping over them.
    gate_up (KD = H, ND = I): out[row, n] = silu(x[in_row] @ Wg[e, n]) * (x[in_row] @ Wu[e, n]), w [E * 2I, H]
    (gate rows, then up rows, of each expert); down (KD = I, ND = H): out[slot, h] = row_w * (act[in_row] @
    Wd[e, h]), w [E * H, I]. FMT 0: bf16 weights; 1: int4 codes [.., KD / 2] in runs of 8 with fp32 scales
    [.., KD / BK] (one group a step); 2: mxfp4 codes alike with e8m0 exponents [.., KD / 32]. in_row -1: a
    padding row (zeros)."""
    MATS: gl.constexpr = 1 if DOWN else 2
    if FMT:
        tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK // 2], gl.uint8)
        w_desc = tma.make_tensor_descriptor(
            w_ptr, [E * MATS * ND, KD // 2], [KD // 2, 1], [BN, BK // 2], tile
        )
        g_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], tile)
        u_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES if MATS == 2 else 1, BN, BK // 2], tile)
    else:
        tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)
        w_desc = tma.make_tensor_descriptor(w_ptr, [E * MATS * ND, KD], [KD, 1], [BN, BK], tile)
        g_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], tile)
        u_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES if MATS == 2 else 1, BN, BK], tile)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()  # the initialised barriers, before the other partition or the TMA unit uses them
    gl.warp_specialize(
        [
            (_consumer, (g_bufs, u_bufs, ready, empty, in_ptr, scales_ptr, out_ptr, block_expert_ptr, in_row_ptr,
                         row_slot_ptr, row_w_ptr, num_tiles, KD, ND, BN, BK, FMT, DOWN, ROWS, num_warps)),
            (_producer, (w_desc, g_bufs, u_bufs, ready, empty, block_expert_ptr, num_tiles, KD, ND, BN, BK, DOWN)),
        ],
        [1],
        [TMA_PRODUCER_REGS],
    )  # fmt: skip


#: (BN: weight rows a program (of gate and of up; of down), warps: one per 16 of them, stages: the ring's depth,
#: maxnreg: the register limit the partitions share; 128: two programs an SM, None: the compiler's, 255 at four
#: consumer warps, one program an SM). Fewer rows a program make more programs (Qwen3-Next gate_up at T = 1,
#: BN 64: 80 programs for 132 SMs), a deeper ring more bytes in flight per program. rows: a block's token rows,
#: the mma's N side: 8 (half the HMMAs at one token an expert), or 16 as the launcher's decode blocks hold them
#: (the same slots laid out again, `_sixteen_row_case`), the form a stage variant of the launchers would take.
CONFIGS = [
    dict(BN=64, warps=4, stages=4, maxnreg=128, rows=8),
    dict(BN=64, warps=4, stages=8, maxnreg=128, rows=8),
    dict(BN=64, warps=4, stages=4, maxnreg=None, rows=8),
    dict(BN=128, warps=8, stages=4, maxnreg=None, rows=8),
    dict(BN=64, warps=4, stages=4, maxnreg=128, rows=16),
]
#: "<weights>/<stage><grid>": grid "" is one program a tile, "_persist" one program an SM looping over tiles (the
#: ring runs on across a program's tiles: down's reduction, I = 512 or 768, is 4-12 steps a tile)
FORMS = tuple(
    f"{fmt}/{stage}{grid}"
    for stage in ("gate_up", "down")
    for fmt in ("bf16", "int4", "mxfp4")
    for grid in ("", "_persist")
)


#: the same GEMMs in the launcher kernels' form (`tl`, bench/tma_probe.py's pointer-load kernels on 16-row blocks,
#: the config's BN, BK 64), timed beside them in the same run; they also run under the CPU interpreter
BASELINE_FORMS = ("bf16/gate_up_tl", "bf16/down_tl")


def _parts(form: str) -> tuple[str, bool, bool]:
    """(weight format, down, persistent) of a form name."""
    fmt, rest = form.split("/")
    return fmt, rest.startswith("down"), rest.endswith("_persist")


def signature(form: str, E: int, H: int, I: int, cfg: dict) -> tuple[dict, dict]:  # noqa: E741
    """The kernel's runtime parameter types and constexprs for a form and config (the AOT compile's inputs)."""
    fmt, down, _persist = _parts(form)
    types = {"w_ptr": "*bf16" if fmt == "bf16" else "*u8", "scales_ptr": "*u8" if fmt == "mxfp4" else "*fp32",
             "in_ptr": "*bf16",
             "out_ptr": "*bf16", "block_expert_ptr": "*i32", "in_row_ptr": "*i32", "row_slot_ptr": "*i32",
             "row_w_ptr": "*fp32", "num_tiles": "i32"}  # fmt: skip
    KD, ND = (I, H) if down else (H, I)
    constexprs = dict(E=E, KD=KD, ND=ND, BN=cfg["BN"], BK=STEP_K[fmt], STAGES=cfg["stages"], FMT=FORMAT[fmt],
                      ROWS=cfg["rows"],
                      DOWN=down)  # fmt: skip
    return types, {**constexprs, "num_warps": cfg["warps"]}


def fits(H: int, I: int, cfg: dict) -> bool:  # noqa: E741
    """Whether a config's tiles divide the shape (the probe has no masks along H and I)."""
    return I % cfg["BN"] == 0 and H % cfg["BN"] == 0 and I % GROUP == 0 and H % GROUP == 0


def compile_only(shapes: list[str], sm: int) -> list[dict]:
    from int4_decode_probe import loop_stats

    rows = []
    for name in shapes:
        E, _K, H, I = SHAPES[name]  # noqa: E741
        for index, cfg in enumerate(CONFIGS):
            if not fits(H, I, cfg):
                continue
            for form in (f for f in FORMS if not f.endswith("_persist")):  # the same cubin runs either grid
                began = time.perf_counter()
                row = dict(shape=name, form=form, config=index, sm=sm, **cfg)
                try:
                    types, constexprs = signature(form, E, H, I, cfg)
                    compiled = compile_for(decode_ws, sm, constexprs, types, cfg["warps"], cfg["maxnreg"])
                    row.update(kernel_summary(compiled))
                    # the consumer's loop: a pass is one step, BK weights of each of its rows a thread
                    mats = 1 if _parts(form)[1] else 2
                    codes = mats * cfg["BN"] * STEP_K[_parts(form)[0]] // (32 * cfg["warps"])
                    row.update({f"loop_{k}": v for k, v in loop_stats(compiled.asm["cubin"], codes, innermost=True).items()
                                if k not in ("registers", "spill")})  # fmt: skip
                except Exception as exc:  # a form the compiler refuses: say so, keep going
                    row["error"] = error_line(exc)
                row["wall_s"] = round(time.perf_counter() - began, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def down_case(name: str, case: dict) -> dict:
    """Down's inputs beside int4_decode_probe's case: random bf16 down weights of the routed experts and their
    int4 codes, random activation rows per block row (padding rows zero), routing weights, and each slot's
    float32 reference weighted row on the bf16 and on the dequantized weights."""
    from moetrt.op.quant import dequantize, quantize

    E, _K, H, I = SHAPES[name]  # noqa: E741
    dev, row_slot = case["x"].device, case["row_slot"]
    gen = torch.Generator(device="cpu").manual_seed(len(case["hit"]))
    w = torch.zeros(E, H, I, device=dev, dtype=torch.bfloat16)
    for e in case["hit"]:
        w[e] = (torch.randn(H, I, generator=gen) / I**0.5).to(dev, torch.bfloat16)
    q = quantize("int4", GROUP, w)
    used = row_slot >= 0
    act = (torch.randn(row_slot.numel(), I, generator=gen) * used.cpu()[:, None]).to(dev, torch.bfloat16)
    slots = int(row_slot.max()) + 1
    topw = (torch.rand(slots, generator=gen) + 0.1).to(dev)
    row_w = torch.where(used, topw[row_slot.clamp(min=0)], 0.0)
    down = dict(w=w.view(E * H, I), codes=q.codes.view(E * H, I // 2), scales=q.scale.view(E * H, I // GROUP),
                act=act, in_row=torch.where(used, torch.arange(row_slot.numel(), device=dev), -1).to(torch.int32),
                row_slot=row_slot.to(torch.int32), row_w=row_w, slots=slots)  # fmt: skip
    down["ref_bf16"] = down_reference(case, down, w)
    down["ref_int4"] = down_reference(case, down, dequantize("int4", GROUP, q, I))
    return down


def down_reference(case: dict, down: dict, weights: torch.Tensor) -> torch.Tensor:
    """Each slot's float32 routing weight times its activation row through its block's expert of `weights`
    [E, H, I]."""
    row_slot = case["row_slot"]
    expert = case["block_expert"].long().repeat_interleave(TOKENS)
    ref = torch.zeros(down["slots"], weights.shape[1], device=row_slot.device)
    for r in (row_slot >= 0).nonzero().flatten().tolist():
        ref[row_slot[r]] = down["row_w"][r] * (down["act"][r].float() @ weights[expert[r]].float().T)
    return ref


def add_mxfp4(name: str, case: dict, down: dict) -> None:
    """The same bf16 weights of both GEMMs as mxfp4 codes (e2m1 in runs of 8, e8m0 exponents per 32, op.quant's
    round to nearest) and the references on their dequantized values: `codes_mxfp4`, `scales_mxfp4`,
    `ref_mxfp4` in each."""
    from moetrt.op.quant import dequantize, quantize

    E, _K, H, I = SHAPES[name]  # noqa: E741
    for part, weights, reference in (
        (case, case["w"], gate_up_reference),
        (down, down["w"].view(E, H, I), lambda c, w: down_reference(case, down, w)),
    ):
        q = quantize("mxfp4", MXFP4_GROUP, weights)
        k = weights.shape[-1]
        part["codes_mxfp4"] = q.codes.view(-1, k // 2)
        part["scales_mxfp4"] = q.scale.view(-1, k // MXFP4_GROUP)
        part["ref_mxfp4"] = reference(case, dequantize("mxfp4", MXFP4_GROUP, q, k))


def _sixteen_row_case(name: str, case: dict, down: dict) -> dict:
    """The same slots in blocks of 16 rows (`tl.dot`'s least M), for the baselines: the block table, each row's
    token, its down input row and routing weight, and each row's place in the 8-row layout's references."""
    from tma_probe import padded_layout

    E, K, _H, I = SHAPES[name]  # noqa: E741
    used8 = (case["row_slot"] >= 0).nonzero().flatten()
    row8_of_slot = torch.empty(down["slots"], dtype=torch.int64, device=used8.device)
    row8_of_slot[case["row_slot"][used8]] = used8
    block_expert, row_slot = padded_layout(case["ids"], E, 16)
    used = row_slot >= 0
    row8 = row8_of_slot[row_slot[used]]
    act = torch.zeros(row_slot.numel(), I, device=used.device, dtype=torch.bfloat16)
    act[used] = down["act"][row8]
    row_w = torch.zeros(row_slot.numel(), device=used.device)
    row_w[used] = down["row_w"][row8]
    return dict(block_expert=block_expert, row_slot=row_slot.to(torch.int32), used=used, row8=row8, act=act,
                row_w=row_w, row_token=torch.where(used, row_slot // K, -1).to(torch.int32),
                in_row=torch.where(used, torch.arange(row_slot.numel(), device=used.device), -1).to(torch.int32))  # fmt: skip


def run_shape(name: str, T: int, timing: bool, rows_out: list[dict], keep=None, dev: str = "cuda") -> bool:
    """Every (config, form) asked for on one shape and token count, against the reference on the same weights
    (dev "cpu": the `tl` baselines under the interpreter, which runs no Gluon)."""
    from int4_decode_probe import check_and_time, make_case
    from tma_probe import down_ptr, gate_up_gathered

    E, _K, H, I = SHAPES[name]  # noqa: E741
    case = make_case(name, T, dev)
    down = down_case(name, case)
    add_mxfp4(name, case, down)
    b16 = _sixteen_row_case(name, case, down)
    nb16 = b16["block_expert"].numel()
    used = case["row_slot"] >= 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    triton.set_allocator(lambda size, _align, _stream: torch.empty(size, dtype=torch.int8, device=dev))
    ok = True
    for index, cfg in enumerate(CONFIGS):
        for form in (*FORMS, *BASELINE_FORMS):
            if not fits(H, I, cfg) or (keep is not None and (index, form) not in keep):
                continue
            row = dict(shape=name, T=T, form=form, config=index, **cfg)
            if form in BASELINE_FORMS and cfg["rows"] != TOKENS:
                continue  # a baseline's tiles do not depend on the Gluon forms' rows: run once, with 8
            if form in BASELINE_FORMS:  # the launcher kernels' form: x @ W.T, 16-row blocks, pointer loads
                BN, BK, stages = cfg["BN"], STEP_K["bf16"], min(cfg["stages"], 4)
                if form == "bf16/down_tl":
                    out = torch.empty((down["slots"], H), device=dev, dtype=torch.bfloat16)
                    row["programs"] = nb16 * H // BN
                    call = functools.partial(
                        down_ptr[(row["programs"],)], b16["act"], down["w"], out, b16["block_expert"],
                        b16["block_expert"], b16["row_slot"], b16["row_w"], H, I, 16, BN, BK, stages, False, False,
                        num_warps=4,
                    )  # fmt: skip
                    rows, want = slice(None), down["ref_bf16"]
                    stored = len(case["hit"]) * H * 2 * I
                else:
                    out = torch.empty((nb16 * 16, I), device=dev, dtype=torch.bfloat16)
                    row["programs"] = nb16 * I // BN
                    call = functools.partial(
                        gate_up_gathered[(row["programs"],)], case["x"], case["w"], out, b16["block_expert"],
                        b16["block_expert"], b16["row_token"], H, I, 16, BN, BK, stages, False, False, False,
                        num_warps=4,
                    )  # fmt: skip
                    rows, want = b16["used"], case["ref_bf16"][b16["row8"]]
                    stored = len(case["hit"]) * 2 * I * 2 * H
                ok &= check_and_time(call, out, rows, want, stored, row, timing)
                rows_out.append(row)
                continue
            fmt, is_down, persist = _parts(form)
            _types, constexprs = signature(form, E, H, I, cfg)
            # blocks of 8 rows, or of 16 as the launcher's decode blocks (the same slots, `_sixteen_row_case`)
            blocks = case if cfg["rows"] == TOKENS else b16
            nblocks = blocks["block_expert"].numel()
            tiles = nblocks * constexprs["ND"] // cfg["BN"]
            part = down if is_down else case
            codes, scales = {"bf16": (None, "scales"), "int4": ("codes", "scales"),
                             "mxfp4": ("codes_mxfp4", "scales_mxfp4")}[fmt]  # fmt: skip
            weights = part[codes] if codes else part["w"].view(-1, I if is_down else H)
            # stored bytes a weight row: bf16, or 4-bit codes and their scales (int4: fp32 a 128, mxfp4: a byte a 32)
            k = I if is_down else H
            row_bytes = 2 * k if fmt == "bf16" else k // 2 + k // 32
            table = (blocks["block_expert"], blocks["row_token"])
            if is_down:
                down_in = (
                    down if cfg["rows"] == TOKENS else b16
                )  # the activation rows as the blocks hold them
                out = torch.empty((down["slots"], H), device=dev, dtype=torch.bfloat16)
                args = (weights, down[scales], down_in["act"], out, table[0], down_in["in_row"],
                        down_in["row_slot"], down_in["row_w"])  # fmt: skip
                rows, want = slice(None), down[f"ref_{fmt}"]
                stored = len(case["hit"]) * H * row_bytes
            else:
                out = torch.empty((nblocks * cfg["rows"], I), device=dev, dtype=torch.bfloat16)
                args = (weights, case[scales], case["x"], out, *table, table[1], down["row_w"])
                if cfg["rows"] == TOKENS:
                    rows, want = used, case[f"ref_{fmt}"][used]
                else:
                    rows, want = b16["used"], case[f"ref_{fmt}"][b16["row8"]]
                stored = len(case["hit"]) * 2 * I * row_bytes
            row["programs"] = min(tiles, sms) if persist else tiles
            call = functools.partial(
                decode_ws[(row["programs"],)], *args, tiles, **constexprs,  # num_warps: the kernel's and the launch's
                **({} if cfg["maxnreg"] is None else {"maxnreg": cfg["maxnreg"]}),
            )  # fmt: skip
            ok &= check_and_time(call, out, rows, want, stored, row, timing)
            rows_out.append(row)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_next,qwen3_30b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default="1,8,64", help="comma list of token counts")
    p.add_argument("--compile-only", action="store_true", help="compile for --sm and report; no GPU needed")
    p.add_argument("--sm", type=int, default=90, help="with --compile-only: the target SM (9.0 or later)")
    p.add_argument("--configs", default="", help="comma list of CONFIGS indices to run (default: all)")
    p.add_argument(
        "--forms",
        default="",
        help=f"comma list of forms to run (default: all; under TRITON_INTERPRET=1 the baselines): "
        f"{', '.join((*FORMS, *BASELINE_FORMS))}",
    )
    p.add_argument("--check-only", action="store_true", help="check against the reference, time nothing")
    p.add_argument(
        "--smoke-timeout", type=float, default=90.0,
        help="seconds a child process may take to run every form on the tiny shape first (0: no smoke pass); "
        "a form that hangs or is wrong there is left out of the full-width run",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="also write the rows to this .jsonl file")
    a = p.parse_args(argv)
    every = (*FORMS, *BASELINE_FORMS)
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES] + [f for f in a.forms.split(",") if f and f not in every]
    if unknown:
        print(f"error: unknown shape or form {unknown[0]}; shapes: {', '.join(SHAPES)}; forms: "
              f"{', '.join(every)}", file=sys.stderr)  # fmt: skip
        return 2
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    asked = [f for f in a.forms.split(",") if f] or (BASELINE_FORMS if interpreted else every)
    if a.compile_only:
        if a.sm < 90:
            print(f"error: TMA and warp specialisation need SM 9.0 or later, not {a.sm}", file=sys.stderr)
            return 2
        rows = compile_only(shapes, a.sm)
        ok = all("error" not in r and r["warp_specialized"] for r in rows)
    elif interpreted and set(asked) - set(BASELINE_FORMS):
        print("error: the CPU interpreter runs no Gluon; ask for the baselines only (--forms "
              f"{','.join(BASELINE_FORMS)}) or use --compile-only", file=sys.stderr)  # fmt: skip
        return 2
    elif not interpreted and (not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9):
        print("error: needs a Hopper or later GPU; use --compile-only --sm 90 without one, or TRITON_INTERPRET=1 "
              "for the baselines on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    else:
        if interpreted:  # the interpreter's bf16 products and casts, as the kernel tests run them
            from moetrt.kernels.torch_ops import _interpreter_fixes

            _interpreter_fixes()
        indices = [int(i) for i in a.configs.split(",") if i] or list(range(len(CONFIGS)))
        keep = {(i, f) for i in indices for f in asked}
        rows, ok = [], True
        if a.smoke_timeout > 0 and not interpreted:
            # of the pairs asked for, those that finished and were right on the tiny shape
            from ws_probe import run_child, smoke

            smoked, rows = smoke(
                a.smoke_timeout, functools.partial(run_child, script=__file__), len(CONFIGS), FORMS,
                BASELINE_FORMS, ["--shapes", "tiny", "--tokens", "8", "--check-only"],
            )  # fmt: skip
            keep &= smoked
            for row in rows:
                print(json.dumps(row), flush=True)
            ok = all(r.get("ok", True) for r in rows)
        for name in shapes:
            for t in (int(t) for t in a.tokens.split(",")):
                ok &= run_shape(
                    name, t, timing=not (a.check_only or interpreted), rows_out=rows, keep=keep,
                    dev="cpu" if interpreted else "cuda",
                )  # fmt: skip
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
