#!/usr/bin/env python3
"""Warp-specialised prefill grouped GEMMs on Hopper, written in Gluon: a design probe.

Triton 3.6 does not specialise the warps of a `tl` kernel's loop on Hopper (the probe's `tma_ws` forms in
bench/tma_probe.py: no partition at 8 warps, and the 4-warp kernel it did specialise never finished on the
H200). Gluon, Triton's lower-level language, states the partitions, shared buffers and barriers itself
(`gl.warp_specialize`), so a producer can keep the loads in flight while a consumer warp group only waits
on barriers and issues asynchronous wgmma:

- `down` (bf16): y[slot, h] = w[slot] * (act[row] @ W_down[e, h]) per (row block, H tile). A one-warp
  producer loads the act tile and the weight tile of each reduction step by TMA into a ring of STAGES
  buffers (`ready` barriers count the bytes); the consumer (the default partition, one or two warp groups)
  waits for a stage, multiplies it asynchronously, keeps one product in flight and hands the stage before
  it back (`empty`), then stores its weighted rows.
- `gate_up` (bf16): act[row, n] = silu(x[token] @ W_gate[e, n]) * (x[token] @ W_up[e, n]) per (row block,
  N tile). Hopper's TMA cannot gather rows, so a four-warp producer gathers the block's token rows of x
  with cp.async (each thread's copies arrive on the stage's barrier when they land) and loads the gate and
  up weight tiles by TMA; the consumer multiplies both and applies the activation. `gate_up/gluon_ws_rows`:
  x laid out by row first (a gather launch, timed apart), both operands by TMA from a one-warp producer.

Each kernel walks its tiles in a loop, the ring's position and phase running on across tiles, so a grid of
one program a tile and a persistent grid of one or two programs an SM (`_persist`, `_persist2`: the
producer loads a tile's first stages during the epilogue of the one before) run the same cubin.

Descriptors are built on the device (`tma.make_tensor_descriptor`, Triton's global scratch), as the
launcher's TMA kernels build theirs. Rows are laid out per expert in whole blocks of BM
(`tma_probe.padded_layout`). Each form is checked against a float32 torch reference (bf16 tolerance;
exit 1 on a failure) and, on a GPU, timed by CUDA-graph replay beside the launcher-style `tl` kernels of
bench/tma_probe.py on the same layout (`down/tma`, `gate_up/tma_w`), with TFLOP/s over the routed rows'
FLOPs.

    PYTHONPATH=src:bench python3 bench/ws_probe.py --shapes qwen3_30b,qwen3_next --tokens 4096
    PYTHONPATH=src:bench python3 bench/ws_probe.py --compile-only --sm 90   # no GPU: sm_90 cubins, partitions

The CPU interpreter runs no Gluon; `--compile-only` compiles each kernel ahead of time for an SM and reports
its partitions (from the TTGIR), registers, spills and shared memory. On a GPU every form first runs on the
tiny shape in a child process with a timeout (`--smoke-timeout`): a kernel whose barrier is never completed
cannot be stopped on the GPU, only its process killed, so a form that hangs or is wrong there is left out of
the full-width run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

#: Registers of each worker partition: the TMA-only producer needs a few scalars, the gathering one its row
#: pointers (a [BM, BK] tile over 128 threads: eight 16-byte copies a thread).
TMA_PRODUCER_REGS = gl.constexpr(24)
GATHER_PRODUCER_REGS = gl.constexpr(64)
GATHER_PRODUCER_WARPS = gl.constexpr(4)


@gluon.constexpr_function
def _mma_instr_n(BM, BN, num_warps):
    """The wgmma instruction's N for a [BM, BN] accumulator over num_warps warps along M (Gluon's wgmma
    tutorial's rule: the largest multiple of 8 up to 256 that divides BN and fits the warps' share)."""
    m_reps = -(-BM // 16)
    n_reps = -(-num_warps // m_reps)
    max_n = max(BN // n_reps, 8)
    n = 256
    while n > max_n or BN % n:
        n -= 8
    return n


@gluon.constexpr_function
def _acc_layout(BM, BN, num_warps):
    """The wgmma accumulator's layout: warps along M (one warp group, or two over 128 rows and more)."""
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, _mma_instr_n(BM, BN, num_warps), 16]
    )


@gluon.jit
def _init_ring(ready, empty, STAGES: gl.constexpr, READY_ARRIVALS: gl.constexpr):
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=READY_ARRIVALS)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()  # the initialised barriers, before another partition or the TMA unit uses them


# ---------------------------------------------------------------------------------------------------- down


@gluon.jit
def _down_producer(
    a_desc, w_desc, a_bufs, w_bufs, ready, empty, block_expert_ptr, num_tiles, H: gl.constexpr,
    I: gl.constexpr, BM: gl.constexpr, BH: gl.constexpr, BK: gl.constexpr,  # noqa: E741
):  # fmt: skip
    STAGES: gl.constexpr = a_bufs.shape[0]
    NT: gl.constexpr = H // BH
    c = 0  # reduction steps issued so far: the ring's position and phase run on across tiles
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        b = tile // NT
        w_row = gl.load(block_expert_ptr + b) * H + (tile % NT) * BH
        for i in range(I // BK):
            s = c % STAGES
            # a fresh barrier counts as having completed the phase before its first: the first STAGES waits pass
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [b * BM, i * BK], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [w_row, i * BK], ready.index(s), w_bufs.index(s))
            c += 1


@gluon.jit
def _down_consumer(
    a_bufs, w_bufs, ready, empty, y_ptr, row_slot_ptr, row_w_ptr, num_tiles, H: gl.constexpr,
    I: gl.constexpr, BM: gl.constexpr, BH: gl.constexpr, BK: gl.constexpr, num_warps: gl.constexpr,  # noqa: E741
):  # fmt: skip
    STAGES: gl.constexpr = a_bufs.shape[0]
    NT: gl.constexpr = H // BH
    layout: gl.constexpr = _acc_layout(BM, BH, num_warps)
    c = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        acc = gl.zeros((BM, BH), gl.float32, layout)
        for _i in range(I // BK):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
            # one product in flight: the one before has read its stage, which goes back to the producer (the
            # previous tile's last stage too: the producer loads the next tile's first ones meanwhile)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=c > 0)
            c += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        rows = (tile // NT) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        h = (tile % NT) * BH + gl.arange(0, BH, layout=gl.SliceLayout(0, layout))
        slot = gl.load(row_slot_ptr + rows)
        wt = gl.load(row_w_ptr + rows)
        y = (acc * wt[:, None]).to(y_ptr.dtype.element_ty)
        gl.store(y_ptr + slot[:, None] * H + h[None, :], y, mask=(slot >= 0)[:, None])


@gluon.jit
def down_ws(
    act_ptr, w_ptr, y_ptr, block_expert_ptr, row_slot_ptr, row_w_ptr, R, num_tiles, E: gl.constexpr,
    H: gl.constexpr, I: gl.constexpr, BM: gl.constexpr, BH: gl.constexpr, BK: gl.constexpr,  # noqa: E741
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """Tiles (row block, H tile), the H tiles of a block one after another: one a program, or a persistent
    grid looping over them (the producer then loads a tile's first stages during the previous one's epilogue)."""
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, BK], gl.bfloat16)
    a_desc = tma.make_tensor_descriptor(act_ptr, [R, I], [I, 1], [BM, BK], a_layout)
    w_desc = tma.make_tensor_descriptor(w_ptr, [E * H, I], [I, 1], [BH, BK], w_layout)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], a_layout)
    w_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BH, BK], w_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    _init_ring(ready, empty, STAGES, 1)
    gl.warp_specialize(
        [
            (
                _down_consumer,
                (a_bufs, w_bufs, ready, empty, y_ptr, row_slot_ptr, row_w_ptr, num_tiles, H, I, BM, BH, BK,
                 num_warps),
            ),
            (
                _down_producer,
                (a_desc, w_desc, a_bufs, w_bufs, ready, empty, block_expert_ptr, num_tiles, H, I, BM, BH, BK),
            ),
        ],
        [1],
        [TMA_PRODUCER_REGS],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- gate_up


@gluon.jit
def _gate_up_producer(
    x_ptr, row_token_ptr, w_desc, x_bufs, g_bufs, u_bufs, ready, empty, block_expert_ptr, num_tiles,
    H: gl.constexpr, I: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,  # noqa: E741
):  # fmt: skip
    STAGES: gl.constexpr = x_bufs.shape[0]
    NT: gl.constexpr = I // BN
    VEC: gl.constexpr = 8  # bf16 elements a 16-byte copy moves
    gather: gl.constexpr = gl.BlockedLayout(
        [1, VEC], [32 // (BK // VEC), BK // VEC], [GATHER_PRODUCER_WARPS, 1], [1, 0]
    )
    ks = gl.arange(0, BK, layout=gl.SliceLayout(0, gather))
    c = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        b = tile // NT
        w_row = gl.load(block_expert_ptr + b) * (2 * I) + (tile % NT) * BN
        token = gl.load(row_token_ptr + b * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, gather)))
        row_ptrs = x_ptr + token.to(gl.int64)[:, None] * H + ks[None, :]
        row_ok = (token >= 0)[:, None]  # broadcast along the row: whole 16-byte copies
        for i in range(H // BK):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [w_row, i * BK], ready.index(s), g_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [w_row + I, i * BK], ready.index(s), u_bufs.index(s))
            # padding rows (token -1) are zero-filled; each thread's copies arrive on the barrier as they land
            async_copy.async_copy_global_to_shared(x_bufs.index(s), row_ptrs + i * BK, mask=row_ok)
            async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
            c += 1


@gluon.jit
def _gate_up_consumer(
    x_bufs, g_bufs, u_bufs, ready, empty, act_ptr, num_tiles, H: gl.constexpr, I: gl.constexpr,  # noqa: E741
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    STAGES: gl.constexpr = x_bufs.shape[0]
    NT: gl.constexpr = I // BN
    layout: gl.constexpr = _acc_layout(BM, BN, num_warps)
    c = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        acc_g = gl.zeros((BM, BN), gl.float32, layout)
        acc_u = gl.zeros((BM, BN), gl.float32, layout)
        for _i in range(H // BK):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            fence_async_shared()  # rows gathered by cp.async (generic proxy); wgmma reads by the async one
            x = x_bufs.index(s)
            acc_g = warpgroup_mma(x, g_bufs.index(s).permute((1, 0)), acc_g, is_async=True)
            acc_u = warpgroup_mma(x, u_bufs.index(s).permute((1, 0)), acc_u, is_async=True)
            acc_g, acc_u = warpgroup_mma_wait(num_outstanding=2, deps=(acc_g, acc_u))
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=c > 0)
            c += 1
        acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, acc_u))
        act = (acc_g / (1.0 + gl.exp(-acc_g)) * acc_u).to(act_ptr.dtype.element_ty)
        rows = (tile // NT) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        n = (tile % NT) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        gl.store(act_ptr + rows[:, None] * I + n[None, :], act)


@gluon.jit
def _gate_up_ring(BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
    """gate_up's shared ring: x, gate and up tiles of each stage."""
    x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)
    x_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], x_layout)
    g_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], w_layout)
    u_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], w_layout)
    return x_bufs, g_bufs, u_bufs


@gluon.jit
def gate_up_ws(
    x_ptr, w_ptr, act_ptr, block_expert_ptr, row_token_ptr, num_tiles, E: gl.constexpr, H: gl.constexpr,
    I: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,  # noqa: E741
    num_warps: gl.constexpr,
):  # fmt: skip
    """Tiles (row block, N tile), the N tiles of a block one after another (its gathered rows then hit L2):
    one a program, or a persistent grid looping over them."""
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)
    w_desc = tma.make_tensor_descriptor(w_ptr, [E * 2 * I, H], [H, 1], [BN, BK], w_layout)
    x_bufs, g_bufs, u_bufs = _gate_up_ring(BM, BN, BK, STAGES)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # a stage is ready after the TMA bytes (one arrival with their count) and every gathering thread's copies
    _init_ring(ready, empty, STAGES, 1 + 32 * GATHER_PRODUCER_WARPS)
    gl.warp_specialize(
        [
            (_gate_up_consumer, (x_bufs, g_bufs, u_bufs, ready, empty, act_ptr, num_tiles, H, I, BM, BN, BK,
                                 num_warps)),
            (
                _gate_up_producer,
                (x_ptr, row_token_ptr, w_desc, x_bufs, g_bufs, u_bufs, ready, empty, block_expert_ptr, num_tiles,
                 H, I, BM, BN, BK),
            ),
        ],
        [GATHER_PRODUCER_WARPS],
        [GATHER_PRODUCER_REGS],
    )  # fmt: skip


@gluon.jit
def _gate_up_rows_producer(
    x_desc, w_desc, x_bufs, g_bufs, u_bufs, ready, empty, block_expert_ptr, num_tiles, H: gl.constexpr,
    I: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,  # noqa: E741
):  # fmt: skip
    STAGES: gl.constexpr = x_bufs.shape[0]
    NT: gl.constexpr = I // BN
    c = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):  # this program's tiles
        b = tile // NT
        w_row = gl.load(block_expert_ptr + b) * (2 * I) + (tile % NT) * BN
        for i in range(H // BK):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [b * BM, i * BK], ready.index(s), x_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [w_row, i * BK], ready.index(s), g_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [w_row + I, i * BK], ready.index(s), u_bufs.index(s))
            c += 1


@gluon.jit
def gate_up_ws_rows(
    xg_ptr, w_ptr, act_ptr, block_expert_ptr, R, num_tiles, E: gl.constexpr, H: gl.constexpr,
    I: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,  # noqa: E741
    num_warps: gl.constexpr,
):  # fmt: skip
    """gate_up_ws with x's rows laid out by row beforehand (xg [R, H]: a gather launch, timed on its own), so a
    one-warp producer loads both operands by TMA: what the gathering producer costs, by difference."""
    x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)
    x_desc = tma.make_tensor_descriptor(xg_ptr, [R, H], [H, 1], [BM, BK], x_layout)
    w_desc = tma.make_tensor_descriptor(w_ptr, [E * 2 * I, H], [H, 1], [BN, BK], w_layout)
    x_bufs, g_bufs, u_bufs = _gate_up_ring(BM, BN, BK, STAGES)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    _init_ring(ready, empty, STAGES, 1)
    gl.warp_specialize(
        [
            (_gate_up_consumer, (x_bufs, g_bufs, u_bufs, ready, empty, act_ptr, num_tiles, H, I, BM, BN, BK,
                                 num_warps)),
            (
                _gate_up_rows_producer,
                (x_desc, w_desc, x_bufs, g_bufs, u_bufs, ready, empty, block_expert_ptr, num_tiles, H, I, BM, BN,
                 BK),
            ),
        ],
        [1],
        [TMA_PRODUCER_REGS],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ ahead of time


def compile_for(
    kernel, sm: int, constexprs: dict, signature: dict, num_warps: int, maxnreg: int | None = None
):
    """A Gluon kernel compiled for `sm` with no GPU (Gluon's AST source, as kernels/aot.py compiles `tl` ones);
    maxnreg: the register limit its partitions share (None: the compiler's)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    # pointers 16-byte aligned, as Triton's launcher specialises them on a GPU (torch allocations are)
    attrs = {
        (kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v[0] == "*"
    }
    source = GluonASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                            constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                            attrs=attrs)  # fmt: skip
    options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
    return triton.compile(source, target=GPUTarget("cuda", sm, 32), options=options)


def kernel_summary(compiled) -> dict:
    """Worker partitions (warps and registers of each, from the TTGIR), registers a thread and spills of the
    cubin (cuobjdump), shared memory and global scratch (the device-built descriptors)."""
    from sass_stats import kernel_stats

    ttgir = compiled.asm["ttgir"]
    regs = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    stats = kernel_stats(compiled.asm["cubin"])
    return {
        "warp_specialized": "ttg.warp_specialize" in ttgir,
        "worker_warps": [int(w) for w in re.findall(r"\) num_warps\((\d+)\) \{", ttgir)],
        "worker_registers": [int(r) for r in regs.group(1).split(",")] if regs else [],
        "registers": stats["registers"],
        "spill": stats["stack"] + stats["local"],
        "shared": compiled.metadata.shared,
        "global_scratch": compiled.metadata.global_scratch_size,
        "num_warps": compiled.metadata.num_warps,
        "wgmma": stats["opcodes"].get("HGMMA", 0),
    }


SHAPES = {"tiny": (8, 2, 256, 128), "qwen3_30b": (128, 8, 2048, 768), "qwen3_next": (512, 10, 2048, 512)}
#: Each form's tiles: (BM, BN of gate_up, BK of gate_up, BH and BKD of down), the consumer's warps (one or two
#: warp groups along M), the ring's stages and the kernel's register limit (the partitions share it: a
#: worker's registers are taken from the consumer's). Three stages of 128 x 64 tiles fit two programs an SM.
CONFIGS = [
    dict(BM=128, BN=64, BK=64, BH=128, BKD=64, warps=4, stages=4, maxnreg=168),
    dict(BM=128, BN=64, BK=64, BH=128, BKD=64, warps=4, stages=3, maxnreg=168),
    dict(BM=128, BN=128, BK=64, BH=256, BKD=64, warps=8, stages=3, maxnreg=160),
    dict(BM=64, BN=128, BK=64, BH=128, BKD=64, warps=4, stages=4, maxnreg=168),
]


def fits(H: int, I: int, cfg: dict) -> bool:  # noqa: E741
    """Whether a config's tiles divide the shape (the probe has no masks along H and I)."""
    return not (I % cfg["BN"] or H % cfg["BH"] or H % cfg["BK"] or I % cfg["BKD"])


def _signatures(E: int, H: int, I: int, cfg: dict):  # noqa: E741
    """Each Gluon kernel's runtime parameter types and constexprs at a config (the AOT compile's inputs)."""
    tiles = dict(E=E, H=H, I=I, BM=cfg["BM"], STAGES=cfg["stages"], num_warps=cfg["warps"])
    down = (
        {"act_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "block_expert_ptr": "*i32",
         "row_slot_ptr": "*i32", "row_w_ptr": "*fp32", "R": "i32", "num_tiles": "i32"},
        {**tiles, "BH": cfg["BH"], "BK": cfg["BKD"]},
    )  # fmt: skip
    gate_up = (
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "act_ptr": "*bf16", "block_expert_ptr": "*i32",
         "row_token_ptr": "*i32", "num_tiles": "i32"},
        {**tiles, "BN": cfg["BN"], "BK": cfg["BK"]},
    )  # fmt: skip
    gate_up_rows = (
        {"xg_ptr": "*bf16", "w_ptr": "*bf16", "act_ptr": "*bf16", "block_expert_ptr": "*i32", "R": "i32",
         "num_tiles": "i32"},
        gate_up[1],
    )  # fmt: skip
    return {
        "down/gluon_ws": (down_ws, *down),
        "gate_up/gluon_ws": (gate_up_ws, *gate_up),
        "gate_up/gluon_ws_rows": (gate_up_ws_rows, *gate_up_rows),
    }


def error_line(exc: BaseException) -> str:
    """What a (compiler) error says is wrong: its root cause's last line that is not source or a caret."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip() and line.strip("^ ")]
    return f"{type(exc).__name__}: {lines[-1][:400]}" if lines else type(exc).__name__


def compile_only(shapes: list[str], sm: int) -> list[dict]:
    rows = []
    for name in shapes:
        E, _K, H, I = SHAPES[name]  # noqa: E741
        for cfg in filter(lambda c: fits(H, I, c), CONFIGS):
            for form, (kernel, signature, constexprs) in _signatures(E, H, I, cfg).items():
                began = time.perf_counter()
                row = dict(shape=name, form=form, sm=sm, **cfg)
                try:
                    compiled = compile_for(kernel, sm, constexprs, signature, cfg["warps"], cfg["maxnreg"])
                    row.update(kernel_summary(compiled))
                except Exception as exc:  # a form the compiler refuses: say so, keep going
                    row["error"] = error_line(exc)
                row["wall_s"] = round(time.perf_counter() - began, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- on a GPU


def run_shape(name: str, T: int, timing: bool, rows_out: list[dict], keep=None) -> bool:
    """One shape and token count: random bf16 weights, softmax top-k routing, the float32 reference of both
    GEMMs (the activation rounded to bf16 before down, as the kernels store it), then every config."""
    E, K, H, I = SHAPES[name]  # noqa: E741
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(T, H, generator=gen) * 0.5).to(dev, dt)
    w_gu = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dev, dt)
    w_d = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dev, dt)
    topw, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=gen), -1), K, dim=-1)
    ids, topw = ids.to(dev), topw.to(dev, torch.float32)
    xf, flat = x.float(), ids.flatten()
    act_ref = torch.empty(T * K, I, device=dev)
    y_ref = torch.empty(T * K, H, device=dev)
    for e in range(E):
        sl = (flat == e).nonzero().flatten()
        if sl.numel():
            xe = xf[sl // K]
            a = torch.nn.functional.silu(xe @ w_gu[e, :I].float().T) * (xe @ w_gu[e, I:].float().T)
            act_ref[sl] = a
            y_ref[sl] = (a.to(dt).float() @ w_d[e].float().T) * topw.flatten()[sl, None]
    ok = True
    triton.set_allocator(lambda size, _align, _stream: torch.empty(size, dtype=torch.int8, device=dev))
    for index, cfg in enumerate(CONFIGS):
        if fits(H, I, cfg) and (keep is None or any(k[0] == index for k in keep)):
            ok &= _run_config(name, T, index, x, w_gu, w_d, ids, topw, act_ref, y_ref, timing, rows_out, keep)
    return ok


def _run_config(name, T, index, x, w_gu, w_d, ids, topw, act_ref, y_ref, timing, rows_out, keep) -> bool:
    """Every form at one tile configuration: checked against the float32 reference, timed where it is right."""
    from tma_probe import down_tma, gate_up_gathered, gather_rows, padded_layout
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, K, H, I = SHAPES[name]  # noqa: E741
    cfg = CONFIGS[index]
    dev, dt = x.device, x.dtype
    flops = {"gate_up": 2 * T * K * H * 2 * I, "down": 2 * T * K * H * I}
    ok = True
    BM = cfg["BM"]
    block_expert, row_slot = padded_layout(ids, E, BM)
    R, nb = row_slot.numel(), block_expert.numel()
    row_token = torch.where(row_slot >= 0, row_slot // K, -1).to(torch.int32)
    row_w = torch.where(row_slot >= 0, topw.flatten()[row_slot.clamp(min=0)], 0.0)
    row_slot32 = row_slot.to(torch.int32)
    act = torch.empty(R, I, device=dev, dtype=dt)
    y = torch.empty(T * K, H, device=dev, dtype=dt)
    launch = dict(num_warps=cfg["warps"], maxnreg=cfg["maxnreg"])
    # the same tiles in the launcher kernels' form (Triton's software pipeline, no partitions), the baseline
    w_desc = TensorDescriptor.from_tensor(w_gu.view(E * 2 * I, H), [cfg["BN"], cfg["BK"]])
    a_desc = TensorDescriptor.from_tensor(act, [BM, cfg["BKD"]])
    wd_desc = TensorDescriptor.from_tensor(w_d.view(E * H, I), [cfg["BH"], cfg["BKD"]])
    plain = dict(num_warps=cfg["warps"])
    xg = torch.empty(R, H, device=dev, dtype=dt)  # x's rows laid out by row (gate_up/gluon_ws_rows)

    def gather() -> None:
        gather_rows[(R // 16,)](x, xg, row_token, H, 16, min(256, H), num_warps=4)

    gather()
    grid_gu, grid_d = (nb * (I // cfg["BN"]),), (nb * (H // cfg["BH"]),)
    forms = {
        "gate_up/tma_w": lambda: gate_up_gathered[grid_gu](
            x, w_desc, act, block_expert, block_expert, row_token, H, I, BM, cfg["BN"], cfg["BK"], cfg["stages"],
            True, False, False, **plain,
        ),
        "down/tma": lambda: down_tma[grid_d](
            a_desc, wd_desc, y, block_expert, row_slot32, row_w, H, I, BM, cfg["BH"], cfg["BKD"], cfg["stages"],
            False, **plain,
        ),
        "gather": gather,
    }  # fmt: skip
    # one program a tile, and persistent grids of one or two programs an SM (as shared memory allows)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for suffix, programs in (("", None), ("_persist", sms), ("_persist2", 2 * sms)):
        gu = min(grid_gu[0], programs or grid_gu[0])
        dn = min(grid_d[0], programs or grid_d[0])
        forms[f"gate_up/gluon_ws{suffix}"] = lambda gu=gu: gate_up_ws[(gu,)](
            x,
            w_gu,
            act,
            block_expert,
            row_token,
            grid_gu[0],
            E,
            H,
            I,
            BM,
            cfg["BN"],
            cfg["BK"],
            cfg["stages"],
            **launch,
        )
        forms[f"gate_up/gluon_ws_rows{suffix}"] = lambda gu=gu: gate_up_ws_rows[(gu,)](
            xg,
            w_gu,
            act,
            block_expert,
            R,
            grid_gu[0],
            E,
            H,
            I,
            BM,
            cfg["BN"],
            cfg["BK"],
            cfg["stages"],
            **launch,
        )
        forms[f"down/gluon_ws{suffix}"] = lambda dn=dn: down_ws[(dn,)](
            act, w_d, y, block_expert, row_slot32, row_w, R, grid_d[0], E, H, I, BM, cfg["BH"], cfg["BKD"],
            cfg["stages"], **launch,
        )  # fmt: skip
    if keep is not None:  # the forms asked for, or those that finished on the tiny shape (`smoke`)
        forms = {form: call for form, call in forms.items() if (index, form) in keep}
    for form, call in forms.items():
        row = dict(shape=name, T=T, form=form, config=index, **cfg)
        if form == "gather":  # what laying x out by row costs, beside the form that needs it
            if timing:
                from moetrt.tune.timing import time_graph

                row["us"] = time_graph(call, repeats=30).median_us
                print(json.dumps(row), flush=True)
                rows_out.append(row)
            continue
        try:
            if form.startswith("gate_up"):
                act.fill_(float("nan"))
                call()
                got, ref = act[row_slot >= 0].float(), act_ref[row_slot[row_slot >= 0]]
            else:
                act.zero_()
                act[row_slot >= 0] = act_ref[row_slot[row_slot >= 0]].to(dt)
                y.fill_(float("nan"))
                call()
                got, ref = y.float(), y_ref
            torch.cuda.synchronize()
            row["rel_err"] = float((got - ref).norm() / ref.norm())
            row["ok"] = bool(row["rel_err"] <= 1e-2)
            if timing and row["ok"]:
                from moetrt.tune.timing import time_graph

                row["us"] = time_graph(call, repeats=30).median_us
                row["tflops"] = flops[form.split("/")[0]] / row["us"] / 1e6
        except Exception as exc:  # a form the compiler or the GPU refuses: say so, keep going
            row["error"] = error_line(exc)
            row["ok"] = False
        ok &= row["ok"]
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return ok


#: Every form `_run_config` runs, by name; the Gluon ones are what the smoke pass guards.
BASELINE_FORMS = ("gate_up/tma_w", "down/tma", "gather")
GLUON_FORMS = tuple(
    f"{kernel}{grid}" for kernel in ("gate_up/gluon_ws", "gate_up/gluon_ws_rows", "down/gluon_ws")
    for grid in ("", "_persist", "_persist2")
)  # fmt: skip


def _json_rows(text: str | bytes | None) -> list[dict]:
    """The JSON rows a run printed (one a line), from text that may stop mid-line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def run_child(args: list[str], timeout: float, script: str = __file__) -> tuple[str, list[dict]]:
    """A probe script (this one by default) in a child process on the given arguments: ("ok" | "failed" |
    "hung", the rows it printed). A kernel that never finishes (a barrier that is never completed) cannot be
    stopped on the GPU; killing its process ends it, so a hang costs `timeout` seconds instead of the whole run."""
    import subprocess

    command = [sys.executable, script, *args, "--smoke-timeout", "0"]
    try:
        proc = subprocess.run(command, timeout=timeout, capture_output=True, text=True, check=False)
    except subprocess.TimeoutExpired as exc:  # the rows printed before the hang still count
        return "hung", _json_rows(exc.stdout)
    return ("ok" if proc.returncode == 0 else "failed"), _json_rows(proc.stdout)


def smoke(
    timeout: float,
    run_child=run_child,
    n_configs: int = len(CONFIGS),
    gluon_forms: tuple[str, ...] = GLUON_FORMS,
    baseline_forms: tuple[str, ...] = BASELINE_FORMS,
    tiny: tuple[str, ...] = ("--shapes", "tiny", "--tokens", "64", "--check-only"),
) -> tuple[set[tuple[int, str]], list[dict]]:
    """The (config, form) pairs to run at full width, and the tiny shape's rows: every pair is first checked on
    the tiny shape (`tiny`: the probe's arguments for it) in one child process; if it hangs, each Gluon pair it
    had not reported gets a child of its own, so a hanging form leaves out itself alone. Baseline forms always
    run; a Gluon form runs if it finished and matched the reference on the tiny shape. Rows carry "config" and
    "form"; the defaults are this probe's, bench/decode_ws_probe.py passes its own."""
    status, rows = run_child(list(tiny), timeout)
    if status == "hung":
        seen = {(r["config"], r["form"]) for r in rows}
        for index in range(n_configs):
            for form in gluon_forms:
                if (index, form) in seen:
                    continue
                status, got = run_child([*tiny, "--configs", str(index), "--forms", form], timeout)
                rows += got or [
                    dict(shape="tiny", form=form, config=index, ok=False, error=f"{status} (smoke)")
                ]
    keep = {(index, form) for index in range(n_configs) for form in baseline_forms}
    keep |= {(r["config"], r["form"]) for r in rows if r.get("ok")}
    return keep, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_30b,qwen3_next", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default="4096", help="comma list of token counts")
    p.add_argument("--compile-only", action="store_true", help="compile for --sm and report; no GPU needed")
    p.add_argument("--sm", type=int, default=90, help="with --compile-only: the target SM (9.0 or later)")
    p.add_argument("--out", default=None, help="also write the rows to this .jsonl file")
    p.add_argument("--configs", default="", help="comma list of CONFIGS indices to run (default: all)")
    p.add_argument(
        "--forms", default="", help=f"comma list of forms to run (default: all): {', '.join(GLUON_FORMS)}"
    )
    p.add_argument("--check-only", action="store_true", help="check against the reference, time nothing")
    p.add_argument(
        "--smoke-timeout", type=float, default=90.0,
        help="seconds a child process may take to run every form on the tiny shape first (0: no smoke pass); "
        "a form that hangs or is wrong there is left out of the full-width run",
    )  # fmt: skip
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]}; pick from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if a.compile_only:
        if a.sm < 90:
            print(f"error: warp specialisation in Gluon needs SM 9.0 or later, not {a.sm}", file=sys.stderr)
            return 2
        rows = compile_only(shapes, a.sm)
        ok = all("error" not in r and r["warp_specialized"] for r in rows)
    else:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            print(
                "error: needs a Hopper or later GPU; use --compile-only --sm 90 without one", file=sys.stderr
            )
            return 2
        rows = []
        ok = True
        keep = None
        if a.configs or a.forms:
            indices = [int(i) for i in a.configs.split(",") if i] or list(range(len(CONFIGS)))
            forms = [f for f in a.forms.split(",") if f] or [*BASELINE_FORMS, *GLUON_FORMS]
            keep = {(i, f) for i in indices for f in forms}
        if (
            a.smoke_timeout > 0
        ):  # of the forms asked for, those that finished and were right on the tiny shape
            smoked, rows = smoke(a.smoke_timeout)
            keep = smoked if keep is None else keep & smoked
            for row in rows:
                print(json.dumps(row), flush=True)
            ok = all(r.get("ok", True) for r in rows)
        for name in shapes:
            for t in (int(t) for t in a.tokens.split(",")):
                ok &= run_shape(name, t, timing=not a.check_only, rows_out=rows, keep=keep)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
