#!/usr/bin/env python3
"""int4 gate_up at decode with the weight tile as the tensor cores' first operand, written in Gluon: a probe.

The launcher's decode gate_up multiplies x @ W.T: the token rows (padded to 16) are the mma's first operand and
the decoded weights its second. In the sm_90 SASS of Qwen3-Next's int4 gate_up at T <= 64, 51 of the loop's 230
instructions a pass are register moves that put each HMMA's activation operand together from `LDS.128` results
(docs/kernels.md, quantized experts, "What is left"). This probe computes W @ x.T instead, on `mma.m16n8k16`:

- the decoded weight tile is the first operand (16 weight rows an mma), in the k-width-8 layout where a
  thread holds 8 consecutive k of a row: with 4-bit codes stored in runs of 8 (op.quant) that is one 32-bit
  word of codes, whose four decoded registers (`triton_common.NIBBLES_PTX_BF16`) are the operand as they are;
  the byte tile is loaded in the layout that makes this so (`_code_layout`), and
  `gl.convert_layout(..., assert_trivial=True)` refuses to compile if the decoded tile would need any data
  movement to become the operand;
- the tokens are the mma's N = 8 side: a block holds up to 8 rows of one expert (half the HMMAs of 16 padded
  rows at one token an expert);
- one scale group per reduction step (BK = the group, 128): the product of each step is scaled per weight row,
  the symmetric zero point (8) taken off in the decoder's packed subtraction, as the launcher's scaled tiles do;
- STEPS reduction steps' code words are loaded before the first of them is decoded (that many steps in
  flight, in registers); the block's token rows of x go to shared memory once (all of H: 32 KB at H 2048), laid
  out so that each mma's two token registers are adjacent (`_x_layout`), and each step reads its [BK, 8]
  operand from there in 16-byte loads.

`tl.dot` does not give this on sm_90: with the weight tile first and 64 rows it picks wgmma, whose register
operand the decoded tile reaches through shared memory, and with fewer rows it spreads the tokens over the warps,
each decoding the same weights. Gluon states the mma version and both layouts.

    PYTHONPATH=src:bench python3 bench/int4_decode_probe.py --compile-only --sm 90      # no GPU needed
    PYTHONPATH=src:bench python3 bench/int4_decode_probe.py --shapes qwen3_next,qwen3_30b --tokens 1,8,64

`--compile-only` compiles the probe kernel and the launcher's int4 gate_up for the same shape and decode bucket
and prints each loop's instructions a pass, a code, and its register moves. On a GPU each shape and token count
is checked against the float32 reference on the same dequantized weights (bf16 tolerance; exit 1 on a failure)
and timed by CUDA-graph replay with the L2 flushed; time the launcher's gate_up on the same shape with
`bench/stage_times.py --alone` in the same run to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from ws_probe import error_line

from moetrt.kernels.triton_common import NIBBLE_MAGIC_BF16, NIBBLES_PTX_BF16
from moetrt.op.spec import INT4_SYMMETRIC_ZERO

PTX = gl.constexpr(NIBBLES_PTX_BF16.value)
#: what the decoder's lanes hold beyond the code (the magic number), plus the symmetric zero point
OFFSET = gl.constexpr(NIBBLE_MAGIC_BF16.value + INT4_SYMMETRIC_ZERO)
TOKENS = 8  # rows of an expert block: the mma's N side
GROUP = 128  # int4 group size the probe takes; one group a reduction step


@gluon.constexpr_function
def _code_layout(BN, BK, num_warps):
    """The [BN, BK / 2] byte tile's layout whose decoded [BN, BK] tile is the k-width-8 first operand of
    mma.m16n8k16 with warps along the rows: a thread's four bytes (one word, 8 consecutive k in runs of 8) of
    row g and of row g + 8 per 32-wide k chunk, lanes 4 apart along k and 8 rows apart, warps 16 rows apart."""
    registers = [[0, 1], [0, 2], [8, 0]]
    col = 16
    while col < BK // 2:
        registers.append([0, col])
        col *= 2
    row = 16 * num_warps
    while row < BN:
        registers.append([row, 0])
        row *= 2
    lanes = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    warps = [[16 << i, 0] for i in range(int(math.log2(num_warps)))]
    return gl.DistributedLinearLayout(
        reg_bases=registers, lane_bases=lanes, warp_bases=warps, block_bases=[], shape=[BN, BK // 2]
    )


@gluon.constexpr_function
def _x_layout(BK, rows=8):
    """Shared-memory layout of a step's [rows tokens, BK] rows of x: in the k-width-8 operand an mma pairs k of two
    32-wide chunks (k and k + 32) in its two registers, so those pairs lie next to each other (offset bit 1 is
    k + 32, bits 2-5 are k + 2 .. k + 16) and a thread's operand registers for its mmas are one 32-byte run:
    16-byte loads whose registers the mmas take as they are. Tokens 8 and on (16 rows: the operand's last
    register basis) are runs of their own."""
    offsets = [[0, 1], [0, 32], [0, 2], [0, 4], [0, 8], [0, 16]]
    k = 64
    while k < BK:
        offsets.append([0, k])
        k *= 2
    token = 1
    while token < rows:
        offsets.append([token, 0])
        token *= 2
    return gl.SharedLinearLayout(offset_bases=offsets)


@gluon.jit
def _weight_tile(byte, BN: gl.constexpr, BK: gl.constexpr, A: gl.constexpr):
    """The decoded [BN, BK] bf16 tile (code - 8) of a [BN, BK / 2] byte tile in runs of 8, as operand A."""
    low, high = gl.inline_asm_elementwise(
        PTX, "=r,=r,=r,=r,r", [byte], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4
    )
    low = gl.reshape(low - OFFSET, (BN, BK // 8, 4))
    high = gl.reshape(high - OFFSET, (BN, BK // 8, 4))
    w = gl.reshape(gl.permute(gl.join(low, high), (0, 1, 3, 2)), (BN, BK))  # k = 8 run + 4 half + j
    return gl.convert_layout(w, A, assert_trivial=True)


@gluon.jit
def gate_up_int4_wfirst(
    codes_ptr, scales_ptr, x_ptr, act_ptr, block_expert_ptr, row_token_ptr, H: gl.constexpr,
    I: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STEPS: gl.constexpr, num_warps: gl.constexpr,  # noqa: E741
):  # fmt: skip
    """act[row, n] = silu(x[token] @ Wg[e, n]) * (x[token] @ Wu[e, n]) for one (block of 8 rows, N tile):
    codes [E * 2I, H / 2] (gate rows, then up rows, of each expert), scales [E * 2I, H / BK] fp32."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8]
    )
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    CODES: gl.constexpr = _code_layout(BN, BK, num_warps)
    NT: gl.constexpr = I // BN
    b = gl.program_id(0) // NT
    n0 = (gl.program_id(0) % NT) * BN
    e = gl.load(block_expert_ptr + b)
    g_row = e * (2 * I) + n0
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, CODES))
    cols = gl.arange(0, BK // 2, layout=gl.SliceLayout(0, CODES))
    g_ptrs = codes_ptr + (g_row + rows).to(gl.int64)[:, None] * (H // 2) + cols[None, :]
    u_ptrs = g_ptrs + I * (H // 2)
    srows = g_row + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    # the block's token rows of x, all of H, into shared memory once ([step, token, k]: 32 KB at H 2048), in
    # 16-byte vectors; each step then reads its [BK, 8] operand as one 16-byte load a thread
    XROWS: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, num_warps], [1, 0])
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [H // BK, 8, BK], _x_layout(BK))
    token = gl.load(row_token_ptr + b * 8 + gl.arange(0, 8, layout=gl.SliceLayout(1, XROWS)))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, XROWS))
    x_ptrs = x_ptr + token.to(gl.int64)[:, None] * H + xk[None, :]
    for i in range(H // BK):
        x_smem.index(i).store(gl.load(x_ptrs + i * BK, mask=(token >= 0)[:, None], other=0.0))
    gl.thread_barrier()
    acc_g = gl.zeros((BN, 8), gl.float32, mma)
    acc_u = gl.zeros((BN, 8), gl.float32, mma)
    zero = gl.zeros((BN, 8), gl.float32, mma)
    # STEPS reduction steps a pass, all their words loaded before any is decoded: that many steps' bytes in
    # flight. (Words carried from one pass to the next as uint8 values were unpacked byte by byte and packed
    # again for the decoder: 155 PRMT a pass instead of 32.)
    for k0 in range(0, H, STEPS * BK):
        g_bytes = ()
        u_bytes = ()
        for j in gl.static_range(STEPS):
            g_bytes += (gl.load(g_ptrs + (k0 + j * BK) // 2),)
            u_bytes += (gl.load(u_ptrs + (k0 + j * BK) // 2),)
        for j in gl.static_range(STEPS):
            step = k0 // BK + j
            xt = x_smem.index(step).permute((1, 0)).load(B)
            s_g = gl.load(scales_ptr + srows * (H // BK) + step)
            s_u = gl.load(scales_ptr + (srows + I) * (H // BK) + step)
            acc_g += mma_v2(_weight_tile(g_bytes[j], BN, BK, A), xt, zero) * s_g[:, None]
            acc_u += mma_v2(_weight_tile(u_bytes[j], BN, BK, A), xt, zero) * s_u[:, None]
    act = (acc_g / (1.0 + gl.exp(-acc_g)) * acc_u).to(act_ptr.dtype.element_ty)
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    out_rows = b * 8 + gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    gl.store(act_ptr + out_rows[None, :] * I + n[:, None], act)


SHAPES = {"tiny": (8, 2, 256, 128), "qwen3_next": (512, 10, 2048, 512), "qwen3_30b": (128, 8, 2048, 768)}
#: (BN, warps: 16 weight rows a warp; steps: reduction steps whose words are loaded together)
CONFIGS = [
    dict(BN=64, warps=4, steps=2),
    dict(BN=64, warps=4, steps=4),
    dict(BN=32, warps=2, steps=4),
    dict(BN=128, warps=8, steps=2),
]


def compile_for(sm: int, H: int, I: int, cfg: dict):  # noqa: E741
    """The probe kernel compiled for `sm` with no GPU (`ws_probe.compile_for`)."""
    from ws_probe import compile_for as compile_gluon

    signature = {"codes_ptr": "*u8", "scales_ptr": "*fp32", "x_ptr": "*bf16", "act_ptr": "*bf16",
                 "block_expert_ptr": "*i32", "row_token_ptr": "*i32"}  # fmt: skip
    constexprs = {
        "H": H,
        "I": I,
        "BN": cfg["BN"],
        "BK": GROUP,
        "STEPS": cfg["steps"],
        "num_warps": cfg["warps"],
    }
    return compile_gluon(gate_up_int4_wfirst, sm, constexprs, signature, cfg["warps"])


def loop_stats(cubin: bytes, codes_a_thread_a_pass: int, innermost: bool = False) -> dict:
    """The kernel's longest loop (innermost: the shortest loop that issues mmas, where a warp-specialised
    kernel's partitions sit in loops of their own around it): instructions a pass, register moves among them,
    instructions a code."""
    from sass_stats import kernel_stats

    stats = kernel_stats(cubin)
    if innermost:
        loop = min(
            (lp for lp in stats["loops"] if lp["opcodes"].get("HMMA")), key=lambda lp: lp["instructions"]
        )
    else:
        loop = max(stats["loops"], key=lambda lp: lp["instructions"])
    return {
        "registers": stats["registers"],
        "spill": stats["stack"] + stats["local"],
        "loop_instructions": loop["instructions"],
        "register_moves": loop["register_moves"],
        "hmma": loop["opcodes"].get("HMMA", 0),
        "instructions_a_code": round(loop["instructions"] / codes_a_thread_a_pass, 2),
    }


def launcher_gate_up(preset: str, bucket: int, sm: int, weights: str = "int4") -> dict:
    """The table's gate_up of 4-bit experts (int4 or mxfp4) for a preset and decode bucket, compiled as the
    launcher runs it, with its loop."""
    from moetrt.cli import resolve_attrs, with_weights
    from moetrt.kernels.aot import compile_kernels

    attrs = with_weights(resolve_attrs(preset, None), weights, None, False)
    bundle = compile_kernels(attrs, "bfloat16", sm, buckets=(bucket,))
    entry = bundle.buckets[str(bucket)]
    key = entry["variants"]["gate_up"]
    c = entry["constexprs"][key]
    codes = 2 * c["BN"] * c["BK"] // (32 * bundle.kernels[key].num_warps)  # gate and up rows, a thread
    return {"tiles": {k: c[k] for k in ("BM", "BN", "BK", "SK")}, "warps": bundle.kernels[key].num_warps,
            **loop_stats(bundle.kernels[key].cubin, codes)}  # fmt: skip


def compile_only(shapes: list[str], sm: int) -> list[dict]:
    rows = []
    for name in shapes:
        _E, _K, H, I = SHAPES[name]  # noqa: E741
        for cfg in CONFIGS:
            began = time.perf_counter()
            row = dict(shape=name, form="probe", sm=sm, **cfg)
            try:
                compiled = compile_for(sm, H, I, cfg)
                codes = (
                    2 * cfg["BN"] * GROUP * cfg["steps"] // (32 * cfg["warps"])
                )  # gate and up, a thread a pass
                row.update(loop_stats(compiled.asm["cubin"], codes))
            except Exception as exc:  # a layout the compiler refuses (assert_trivial): say so, keep going
                row["error"] = error_line(exc)
            row["wall_s"] = round(time.perf_counter() - began, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
        if name != "tiny":
            for bucket in (16, 64):
                row = dict(
                    shape=name, form=f"launcher T<={bucket}", sm=sm, **launcher_gate_up(name, bucket, sm)
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def make_case(name: str, T: int, dev: str = "cuda") -> dict:
    """Random bf16 experts (those no token picks stay zero) and their int4 codes (symmetric, groups of 128,
    op.quant), softmax top-k routing, rows per expert in blocks of 8 (`tma_probe.padded_layout`), and each
    block row's float32 reference on the bf16 weights (`ref_bf16`) and on the dequantized ones (`ref_int4`)."""
    from tma_probe import padded_layout

    from moetrt.op.quant import dequantize, quantize

    E, K, H, I = SHAPES[name]  # noqa: E741
    gen = torch.Generator(device="cpu").manual_seed(T)
    x = (torch.randn(T, H, generator=gen) * 0.5).to(dev, torch.bfloat16)
    _weights, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=gen), -1), K, dim=-1)
    ids = ids.to(dev)
    hit = sorted(set(ids.flatten().tolist()))
    w = torch.zeros(E, 2 * I, H, device=dev, dtype=torch.bfloat16)
    for e in hit:
        w[e] = (torch.randn(2 * I, H, generator=gen) / H**0.5).to(dev, torch.bfloat16)
    q = quantize("int4", GROUP, w)
    block_expert, row_slot = padded_layout(ids, E, TOKENS)
    row_token = torch.where(row_slot >= 0, row_slot // K, -1).to(torch.int32)
    case = dict(x=x, w=w, ids=ids, hit=hit, block_expert=block_expert, row_slot=row_slot, row_token=row_token,
                codes=q.codes.view(E * 2 * I, H // 2), scales=q.scale.view(E * 2 * I, H // GROUP))  # fmt: skip
    case["ref_bf16"] = gate_up_reference(case, w)
    case["ref_int4"] = gate_up_reference(case, dequantize("int4", GROUP, q, H))
    return case


def gate_up_reference(case: dict, weights: torch.Tensor) -> torch.Tensor:
    """Each block row's float32 silu(x @ Wg.T) * (x @ Wu.T) through its block's expert of `weights` [E, 2I, H]
    (zeros for padding rows)."""
    I = weights.shape[1] // 2  # noqa: E741
    xf, row_slot = case["x"].float(), case["row_slot"]
    ref = torch.zeros(row_slot.numel(), I, device=row_slot.device)
    for r in (row_slot >= 0).nonzero().flatten().tolist():
        e, t = int(case["block_expert"][r // TOKENS]), int(case["row_token"][r])
        g, u = xf[t] @ weights[e, :I].float().T, xf[t] @ weights[e, I:].float().T
        ref[r] = torch.nn.functional.silu(g) * u
    return ref


def check_and_time(call, out, rows, want, stored_bytes: int, row: dict, timing: bool) -> bool:
    """Runs `call` once, compares `out[rows]` with `want` (bf16 tolerance), then, if right and asked, times it
    by CUDA-graph replay with the L2 flushed; fills `row`. Whether it was right."""
    try:
        out.fill_(float("nan"))
        call()
        if out.is_cuda:
            torch.cuda.synchronize()
        got = out[rows].float()
        row["rel_err"] = float((got - want).norm() / want.norm())
        row["ok"] = bool(row["rel_err"] <= 1e-2)
        if timing and row["ok"]:
            from moetrt.tune.timing import time_graph

            row["us"] = time_graph(call, repeats=30).median_us
            row["weights_GBps"] = stored_bytes / row["us"] / 1e3
    except Exception as exc:  # a form the compiler or the GPU refuses: say so, keep going
        row["error"] = error_line(exc)
        row["ok"] = False
    print(json.dumps(row), flush=True)
    return row["ok"]


def run_shape(name: str, T: int, rows_out: list[dict], timing: bool) -> bool:
    """Every config on one shape and token count, against the reference on the dequantized weights."""
    _E, _K, H, I = SHAPES[name]  # noqa: E741
    case = make_case(name, T)
    nb = case["block_expert"].numel()
    ok = True
    for cfg in CONFIGS:
        row = dict(shape=name, T=T, form="probe", **cfg)
        act = torch.empty((nb * TOKENS, I), device="cuda", dtype=torch.bfloat16)

        def call(act=act, cfg=cfg) -> None:
            gate_up_int4_wfirst[(nb * (I // cfg["BN"]),)](
                case["codes"],
                case["scales"],
                case["x"],
                act,
                case["block_expert"],
                case["row_token"],
                H,
                I,
                cfg["BN"],
                GROUP,
                cfg["steps"],
                num_warps=cfg["warps"],
            )

        used = case["row_slot"] >= 0
        stored = len(case["hit"]) * 2 * I * H // 2
        ok &= check_and_time(call, act, used, case["ref_int4"][used], stored, row, timing)
        rows_out.append(row)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_next,qwen3_30b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default="1,8,64", help="comma list of token counts")
    p.add_argument("--compile-only", action="store_true", help="compile for --sm and compare loops; no GPU")
    p.add_argument("--sm", type=int, default=90, help="with --compile-only: the target SM (8.0 or later)")
    p.add_argument("--check-only", action="store_true", help="check against the reference, time nothing")
    p.add_argument("--out", default=None, help="also write the rows to this .jsonl file")
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]}; pick from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if a.compile_only:
        if a.sm < 80:
            print(f"error: mma.m16n8k16 in bf16 needs SM 8.0 or later, not {a.sm}", file=sys.stderr)
            return 2
        rows = compile_only(shapes, a.sm)
        ok = all("error" not in r for r in rows)
    else:
        if not torch.cuda.is_available():
            print("error: needs a CUDA GPU; use --compile-only --sm 90 without one", file=sys.stderr)
            return 2
        rows, ok = [], True
        for name in shapes:
            for t in (int(t) for t in a.tokens.split(",")):
                ok &= run_shape(name, t, rows, timing=not a.check_only)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
