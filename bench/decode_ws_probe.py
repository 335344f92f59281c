#!/usr/bin/env python3
"""Decode gate_up with its weight tiles streamed by a TMA producer warp, in Gluon: a probe (bf16 and int4).

At one token a step the expert GEMMs only stream weights, and one launch does not reach the copy rate: the 66 MB
of Qwen3-Next's experts at T = 1 take 25.0 µs in the fused experts kernel, 26.9 µs as the GEMMs' tiles read by
pointer and 21.9 µs as the same tiles read by TMA, with nothing computed (bench/stream_probe.py; docs/kernels.md,
"The one-token step against what one launch can stream"). TMA weight loads inside the launcher's `tl` decode
kernels were slower, not faster: the waits on their barriers sit in the same warps as the products. Here a
producer warp of its own keeps the ring full:

- the producer (one warp, few registers) loads each reduction step's gate and up weight tiles of the program's
  expert by TMA into a ring of STAGES buffers in shared memory, through a descriptor built on the device;
  `ready` counts their bytes, `empty` is handed back by the consumer; the bytes in flight are the ring's, not
  the consumer's registers';
- the consumer (the default partition: a warp per 16 weight rows) stages the block's 8 token rows of x in shared
  memory once (`int4_decode_probe._x_layout`) and, with int4 weights, the tile's group scales; each step it
  waits for a stage, reads its tiles into registers and hands the stage back at once (mma.sync reads registers),
  then multiplies W @ x.T on mma.m16n8k16 (the tokens the mma's N = 8 side): bf16 tiles as the first operand by
  ldmatrix, int4 code words in the layout whose decoded registers are the first operand as they are
  (`int4_decode_probe._code_layout`, `_weight_tile`), scaled per weight row on each group's product;
- then the activation (SiLU-GLU) and the [8, BN] store.

    PYTHONPATH=src:bench python3 bench/decode_ws_probe.py --compile-only --sm 90     # no GPU needed
    PYTHONPATH=src:bench python3 bench/decode_ws_probe.py --shapes qwen3_next,qwen3_30b --tokens 1,8,64

The layout and the reference are int4_decode_probe's (rows per expert in blocks of 8; no shared expert), so its
rows and these compare form for form in one run: int4 in registers (`int4_decode_probe.py`) against int4 from
the ring (`int4/ws`), and `bf16/ws` against the launcher's bf16 gate_up (`bench/stage_times.py --alone`) and the
TMA read rate above. On a GPU every form first runs on the tiny shape in a child process with a timeout
(`--smoke-timeout`, as bench/ws_probe.py does): a barrier never completed cannot be stopped on the GPU, only its
process killed, so a form that hangs or is wrong there is left out. Each row is checked against the float32
reference on the same (dequantized) weights, bf16 tolerance, exit 1 on a failure, and timed by CUDA-graph replay
with the L2 flushed; `weights_GBps` is the stored weight bytes of the routed experts over the time.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch
import triton
from int4_decode_probe import GROUP, SHAPES, TOKENS, _code_layout, _weight_tile, _x_layout
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from ws_probe import TMA_PRODUCER_REGS, compile_for, error_line, kernel_summary

#: reduction elements a step: one int4 scale group; bf16 tiles 128 bytes wide (TMA's widest swizzle)
STEP_K = {"int4": GROUP, "bf16": 64}
ROWS = gl.constexpr(TOKENS)  # a block's token rows, inside the kernels


@gluon.constexpr_function
def _plain(n):
    """A plain shared layout of n (a power of two) values: a [STEPS, n] buffer of them is `.index`ed by step."""
    return gl.SharedLinearLayout(offset_bases=[[1 << i] for i in range(n.bit_length() - 1)])


@gluon.constexpr_function
def _x_smem_layout(BK, INT4):
    """x's shared layout: int4's operand pairs k with k + 32 (`_x_layout`); bf16's is ldmatrix's own."""
    if INT4:
        return _x_layout(BK)
    return gl.NVMMASharedLayout.get_default_for([TOKENS, BK], gl.bfloat16)


@gluon.jit
def _producer(
    w_desc, g_bufs, u_bufs, ready, empty, block_expert_ptr, H: gl.constexpr, I: gl.constexpr,  # noqa: E741
    BN: gl.constexpr, BK: gl.constexpr,
):  # fmt: skip
    """Each step's gate and up tiles of the program's expert, by TMA, into the ring (stored columns a step:
    BK weights, or BK / 2 bytes of int4 codes)."""
    STAGES: gl.constexpr = g_bufs.shape[0]
    COLS: gl.constexpr = g_bufs.shape[2]
    NT: gl.constexpr = I // BN
    row = gl.load(block_expert_ptr + gl.program_id(0) // NT) * (2 * I) + (gl.program_id(0) % NT) * BN
    for i in range(H // BK):
        s = i % STAGES
        # a fresh barrier counts as having completed the phase before its first: the first STAGES waits pass
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), 2 * w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [row, i * COLS], ready.index(s), g_bufs.index(s))
        tma.async_copy_global_to_shared(w_desc, [row + I, i * COLS], ready.index(s), u_bufs.index(s))


@gluon.jit
def _consumer(
    g_bufs, u_bufs, ready, empty, x_ptr, scales_ptr, act_ptr, block_expert_ptr, row_token_ptr,
    H: gl.constexpr, I: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, INT4: gl.constexpr,  # noqa: E741
    num_warps: gl.constexpr,
):  # fmt: skip
    STAGES: gl.constexpr = g_bufs.shape[0]
    STEPS: gl.constexpr = H // BK
    NT: gl.constexpr = I // BN
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8]
    )
    # int4: eight consecutive k a thread (one word of codes); bf16: two, as ldmatrix gives them
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8 if INT4 else 2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8 if INT4 else 2)
    b = gl.program_id(0) // NT
    n0 = (gl.program_id(0) % NT) * BN
    # the block's token rows of x, all of H, into shared memory once (the producer fills the ring meanwhile)
    XROWS: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, num_warps], [1, 0])
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [STEPS, ROWS, BK], _x_smem_layout(BK, INT4))
    token = gl.load(row_token_ptr + b * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, XROWS)))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, XROWS))
    x_ptrs = x_ptr + token.to(gl.int64)[:, None] * H + xk[None, :]
    for i in range(STEPS):
        x_smem.index(i).store(gl.load(x_ptrs + i * BK, mask=(token >= 0)[:, None], other=0.0))
    if INT4:
        # the tile's group scales, a step's [BN] of them a row of shared memory ([STEPS, BN] each)
        g_row = gl.load(block_expert_ptr + b) * (2 * I) + n0
        s_ptrs = scales_ptr + (g_row + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))).to(gl.int64) * STEPS
        sg_smem = gl.allocate_shared_memory(gl.float32, [STEPS, BN], _plain(BN))
        su_smem = gl.allocate_shared_memory(gl.float32, [STEPS, BN], _plain(BN))
        for j in range(STEPS):
            sg_smem.index(j).store(gl.load(s_ptrs + j))
            su_smem.index(j).store(gl.load(s_ptrs + I * STEPS + j))
    gl.thread_barrier()
    acc_g = gl.zeros((BN, ROWS), gl.float32, mma)
    acc_u = gl.zeros((BN, ROWS), gl.float32, mma)
    zero = gl.zeros((BN, ROWS), gl.float32, mma)
    for i in range(STEPS):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        if INT4:
            g = g_bufs.index(s).load(_code_layout(BN, BK, num_warps))
            u = u_bufs.index(s).load(_code_layout(BN, BK, num_warps))
        else:
            g = g_bufs.index(s).load(A)
            u = u_bufs.index(s).load(A)
        # the tiles are in registers (mma.sync reads those): the stage goes back to the producer now
        mbarrier.arrive(empty.index(s), count=1)
        xt = x_smem.index(i).permute((1, 0)).load(B)
        if INT4:
            s_g = sg_smem.index(i).load(gl.SliceLayout(1, mma))
            s_u = su_smem.index(i).load(gl.SliceLayout(1, mma))
            acc_g += mma_v2(_weight_tile(g, BN, BK, A), xt, zero) * s_g[:, None]
            acc_u += mma_v2(_weight_tile(u, BN, BK, A), xt, zero) * s_u[:, None]
        else:
            acc_g = mma_v2(g, xt, acc_g)
            acc_u = mma_v2(u, xt, acc_u)
    act = (acc_g / (1.0 + gl.exp(-acc_g)) * acc_u).to(act_ptr.dtype.element_ty)
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    out_rows = b * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, mma))
    gl.store(act_ptr + out_rows[None, :] * I + n[:, None], act)


@gluon.jit
def gate_up_decode_ws(
    w_ptr, scales_ptr, x_ptr, act_ptr, block_expert_ptr, row_token_ptr, E: gl.constexpr, H: gl.constexpr,
    I: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, INT4: gl.constexpr,  # noqa: E741
    num_warps: gl.constexpr,
):  # fmt: skip
    """act[row, n] = silu(x[token] @ Wg[e, n]) * (x[token] @ Wu[e, n]) for one (block of 8 rows, N tile).
    w: [E * 2I, H] bf16 or [E * 2I, H / 2] int4 codes in runs of 8 (gate rows, then up rows, of each expert);
    scales [E * 2I, H / BK] fp32 (int4; one group a step)."""
    if INT4:
        tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK // 2], gl.uint8)
        w_desc = tma.make_tensor_descriptor(w_ptr, [E * 2 * I, H // 2], [H // 2, 1], [BN, BK // 2], tile)
        g_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], tile)
        u_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], tile)
    else:
        tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)
        w_desc = tma.make_tensor_descriptor(w_ptr, [E * 2 * I, H], [H, 1], [BN, BK], tile)
        g_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], tile)
        u_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, BK], tile)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()  # the initialised barriers, before the other partition or the TMA unit uses them
    gl.warp_specialize(
        [
            (_consumer, (g_bufs, u_bufs, ready, empty, x_ptr, scales_ptr, act_ptr, block_expert_ptr,
                         row_token_ptr, H, I, BN, BK, INT4, num_warps)),
            (_producer, (w_desc, g_bufs, u_bufs, ready, empty, block_expert_ptr, H, I, BN, BK)),
        ],
        [1],
        [TMA_PRODUCER_REGS],
    )  # fmt: skip


#: (BN: weight rows of gate and of up a program, warps: one per 16 of them, stages: the ring's depth). Fewer rows a
#: program make more programs (Qwen3-Next at T = 1, BN 64: 80 programs for 132 SMs), a deeper ring more bytes in
#: flight per program; maxnreg: the register limit the partitions share (128: two programs an SM; None: the
#: compiler's, 255 at four consumer warps, one program an SM).
CONFIGS = [
    dict(BN=64, warps=4, stages=4, maxnreg=128),
    dict(BN=64, warps=4, stages=8, maxnreg=128),
    dict(BN=64, warps=4, stages=4, maxnreg=None),
    dict(BN=128, warps=8, stages=4, maxnreg=None),
]
FORMS = ("bf16/ws", "int4/ws")


def signature(form: str, E: int, H: int, I: int, cfg: dict) -> tuple[dict, dict]:  # noqa: E741
    """The kernel's runtime parameter types and constexprs for a form and config (the AOT compile's inputs)."""
    fmt = form.split("/")[0]
    types = {"w_ptr": "*u8" if fmt == "int4" else "*bf16", "scales_ptr": "*fp32", "x_ptr": "*bf16",
             "act_ptr": "*bf16", "block_expert_ptr": "*i32", "row_token_ptr": "*i32"}  # fmt: skip
    constexprs = dict(E=E, H=H, I=I, BN=cfg["BN"], BK=STEP_K[fmt], STAGES=cfg["stages"], INT4=fmt == "int4")
    return types, {**constexprs, "num_warps": cfg["warps"]}


def fits(H: int, I: int, cfg: dict) -> bool:  # noqa: E741
    """Whether a config's tiles divide the shape (the probe has no masks along H and I)."""
    return I % cfg["BN"] == 0 and H % max(STEP_K.values()) == 0


def compile_only(shapes: list[str], sm: int) -> list[dict]:
    from int4_decode_probe import loop_stats

    rows = []
    for name in shapes:
        E, _K, H, I = SHAPES[name]  # noqa: E741
        for index, cfg in enumerate(CONFIGS):
            if not fits(H, I, cfg):
                continue
            for form in FORMS:
                began = time.perf_counter()
                row = dict(shape=name, form=form, config=index, sm=sm, **cfg)
                try:
                    types, constexprs = signature(form, E, H, I, cfg)
                    compiled = compile_for(
                        gate_up_decode_ws, sm, constexprs, types, cfg["warps"], cfg["maxnreg"]
                    )
                    row.update(kernel_summary(compiled))
                    # the consumer's loop: a pass is one step, gate and up rows of BK weights each a thread
                    codes = 2 * cfg["BN"] * STEP_K[form.split("/")[0]] // (32 * cfg["warps"])
                    row.update({f"loop_{k}": v for k, v in loop_stats(compiled.asm["cubin"], codes, innermost=True).items()
                                if k not in ("registers", "spill")})  # fmt: skip
                except Exception as exc:  # a form the compiler refuses: say so, keep going
                    row["error"] = error_line(exc)
                row["wall_s"] = round(time.perf_counter() - began, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def run_shape(name: str, T: int, timing: bool, rows_out: list[dict], keep=None) -> bool:
    """Every (config, form) asked for on one shape and token count, against the reference on the same weights."""
    from int4_decode_probe import check_and_time, make_case

    E, _K, H, I = SHAPES[name]  # noqa: E741
    case = make_case(name, T)
    nb = case["block_expert"].numel()
    triton.set_allocator(lambda size, _align, _stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    ok = True
    for index, cfg in enumerate(CONFIGS):
        for form in FORMS:
            if not fits(H, I, cfg) or (keep is not None and (index, form) not in keep):
                continue
            int4 = form.startswith("int4")
            row = dict(shape=name, T=T, form=form, config=index, **cfg)
            act = torch.empty((nb * TOKENS, I), device="cuda", dtype=torch.bfloat16)
            weights = case["codes"] if int4 else case["w"].view(E * 2 * I, H)
            call = functools.partial(
                gate_up_decode_ws[(nb * (I // cfg["BN"]),)],
                weights, case["scales"], case["x"], act, case["block_expert"], case["row_token"], E, H, I,
                cfg["BN"], STEP_K[form.split("/")[0]], cfg["stages"], int4, num_warps=cfg["warps"],
                **({} if cfg["maxnreg"] is None else {"maxnreg": cfg["maxnreg"]}),
            )  # fmt: skip
            stored = len(case["hit"]) * 2 * I * (H // 2 if int4 else 2 * H)
            ok &= check_and_time(call, act, case, "ref_int4" if int4 else "ref_bf16", stored, row, timing)
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
        "--forms", default="", help=f"comma list of forms to run (default: all): {', '.join(FORMS)}"
    )
    p.add_argument("--check-only", action="store_true", help="check against the reference, time nothing")
    p.add_argument(
        "--smoke-timeout", type=float, default=90.0,
        help="seconds a child process may take to run every form on the tiny shape first (0: no smoke pass); "
        "a form that hangs or is wrong there is left out of the full-width run",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="also write the rows to this .jsonl file")
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES] + [f for f in a.forms.split(",") if f and f not in FORMS]
    if unknown:
        print(f"error: unknown shape or form {unknown[0]}; shapes: {', '.join(SHAPES)}; forms: "
              f"{', '.join(FORMS)}", file=sys.stderr)  # fmt: skip
        return 2
    if a.compile_only:
        if a.sm < 90:
            print(f"error: TMA and warp specialisation need SM 9.0 or later, not {a.sm}", file=sys.stderr)
            return 2
        rows = compile_only(shapes, a.sm)
        ok = all("error" not in r and r["warp_specialized"] for r in rows)
    else:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            print(
                "error: needs a Hopper or later GPU; use --compile-only --sm 90 without one", file=sys.stderr
            )
            return 2
        from ws_probe import run_child, smoke

        indices = [int(i) for i in a.configs.split(",") if i] or list(range(len(CONFIGS)))
        keep = {(i, f) for i in indices for f in ([f for f in a.forms.split(",") if f] or FORMS)}
        rows, ok = [], True
        if (
            a.smoke_timeout > 0
        ):  # of the pairs asked for, those that finished and were right on the tiny shape
            smoked, rows = smoke(
                a.smoke_timeout, functools.partial(run_child, script=__file__), len(CONFIGS), FORMS, (),
                ["--shapes", "tiny", "--tokens", "8", "--check-only"],
            )  # fmt: skip
            keep &= smoked
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
