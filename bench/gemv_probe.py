"""One-token expert GEMVs on CUDA cores (no tensor cores, no shared-memory staging), T = 1: a design probe.

The decode step's expert work as matrix-vector products for the K routed slots (given expert ids) and the
shared expert: a gate_up kernel (program = slot x N tile; gate and up rows in one [2 BN, H] tile, whole rows per
program, each code decoded in registers and multiplied with an FMA) and a down kernel (program = H tile; the
sum over slots in slot order, optionally unrolled so every slot's loads are in flight together). Every variant
is checked against a float32 torch reference on the same dequantized weights (bf16 tolerance; exit 1 on a
failure); on a GPU each is timed whole and per kernel (CUDA-graph replay, L2 flushed) with its bytes per
second. Measured against the launcher's tensor-core kernels in docs/kernels.md (decode section).

    PYTHONPATH=src python3 bench/gemv_probe.py --shapes qwen3_next --formats native,fp8_block,int4,mxfp4
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/gemv_probe.py --shapes tiny --quick    # the CPU check
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl

from moetrt.core.tolerances import tolerance
from moetrt.kernels.triton_common import (
    FP4_FP16_SCALE,
    INT_MAGIC_VALUE,
    e2m1_unscaled,
    e8m0_value,
    expert_tables,
    int_plus_magic,
)


@triton.jit
def _nibble(word, i: tl.constexpr, off, WFMT: tl.constexpr):
    """Nibble i of each 32-bit word of 4-bit codes as float32: int4 code - zero, or the e2m1
    value over FP4_FP16_SCALE."""
    q = (word >> (4 * i)) & 15
    if WFMT == 2:
        val = int_plus_magic(q) - off
    else:
        val = e2m1_unscaled(q)
    return val


@triton.jit
def _row_products(
    w_ptr, s_ptr, z_ptr, v_ptr, rows, C: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, WFMT: tl.constexpr,
    WB: tl.constexpr, HAS_ZERO: tl.constexpr,
):  # fmt: skip
    """[BR] float32: sum_k W[rows, k] * v[k] of one expert's table ([R, C], native or quantized codes)."""
    if WFMT == 0:
        acc = tl.zeros((BR, BK), dtype=tl.float32)
    elif WFMT == 1:
        acc = tl.zeros((BR,), dtype=tl.float32)
    else:
        acc = tl.zeros((BR, BK // 8), dtype=tl.float32)
    for k0 in range(0, C, BK):
        if WFMT == 0:
            ks = k0 + tl.arange(0, BK)
            v = tl.load(v_ptr + ks).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * C + ks[None, :]).to(tl.float32)
            acc += w * v[None, :]
        elif WFMT == 1:
            ks = k0 + tl.arange(0, BK)
            NG: tl.constexpr = BK // WB
            KS: tl.constexpr = (C + WB - 1) // WB
            g = k0 // WB + tl.arange(0, NG)
            sc = tl.load(s_ptr + (rows // WB)[:, None] * KS + g[None, :])
            v = tl.load(v_ptr + ks).to(tl.float32)
            code = tl.load(w_ptr + rows[:, None] * C + ks[None, :])
            prod = code.to(tl.float8e4nv, bitcast=True).to(tl.float32) * v[None, :]
            acc += tl.sum(tl.sum(tl.reshape(prod, (BR, NG, WB)), axis=2) * sc, axis=1)
        else:
            NW: tl.constexpr = BK // 8
            cw = k0 // 8 + tl.arange(0, NW)
            word = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (C // 8) + cw[None, :])
            g = (cw * 8) // WB
            sc = tl.load(s_ptr + rows[:, None] * (C // WB) + g[None, :])
            if WFMT == 2:
                if HAS_ZERO:
                    z = tl.load(z_ptr + rows[:, None] * (C // WB) + g[None, :]).to(tl.float32)
                    off = INT_MAGIC_VALUE + z
                else:
                    off = INT_MAGIC_VALUE + 8.0
            else:
                sc = e8m0_value(sc.to(tl.int32)) * FP4_FP16_SCALE
                off = 0.0
            # the 8 codes of a word (one run, op.quant): nibble i holds k = 8c + i // 2 + 4 (i % 2); joined
            # so that k is the fastest index
            n0 = _nibble(word, 0, off, WFMT)
            n1 = _nibble(word, 1, off, WFMT)
            n2 = _nibble(word, 2, off, WFMT)
            n3 = _nibble(word, 3, off, WFMT)
            n4 = _nibble(word, 4, off, WFMT)
            n5 = _nibble(word, 5, off, WFMT)
            n6 = _nibble(word, 6, off, WFMT)
            n7 = _nibble(word, 7, off, WFMT)
            vals = tl.join(
                tl.join(tl.join(n0, n1), tl.join(n4, n5)), tl.join(tl.join(n2, n3), tl.join(n6, n7))
            )
            vals = tl.reshape(vals, (BR, BK))
            ks = k0 + tl.arange(0, BK)
            v = tl.load(v_ptr + ks).to(tl.float32)
            p = tl.sum(tl.reshape(vals * v[None, :], (BR, NW, 8)), axis=2)
            acc += p * sc
    if WFMT == 1:
        total = acc
    else:
        total = tl.sum(acc, axis=1)
    return total


@triton.jit
def _expert_products(
    w_ptr, s_ptr, z_ptr, v_ptr, e, rows, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    WFMT: tl.constexpr, WB: tl.constexpr, HAS_ZERO: tl.constexpr,
):  # fmt: skip
    """`_row_products` of expert e in the op's stacked tables ([E, R, C]): native weights, or quantized codes
    whose scales and zero points `triton_common.expert_tables` locates."""
    if WFMT == 0:
        w, s, z = w_ptr + e * (R * C), s_ptr, z_ptr
    else:
        w, s, z = expert_tables(w_ptr, s_ptr, z_ptr, e, R, C, WFMT, WB)
    return _row_products(w, s, z, v_ptr, rows, C, BR, BK, WFMT, WB, HAS_ZERO)


@triton.jit
def _weighted_slot(
    act_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, z_ptr, j, h, H: tl.constexpr, I: tl.constexpr,  # noqa: E741
    BH: tl.constexpr, BK: tl.constexpr, WFMT: tl.constexpr, WB: tl.constexpr, HAS_ZERO: tl.constexpr,
):  # fmt: skip
    """Slot j's down product over the H rows h, times its routing weight."""
    e = tl.load(ids_ptr + j).to(tl.int64)
    return tl.load(wts_ptr + j) * _expert_products(
        w_ptr, s_ptr, z_ptr, act_ptr + j * I, e, h, H, I, BH, BK, WFMT, WB, HAS_ZERO
    )


@triton.jit
def gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, act_ptr, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,  # noqa: E741
    BN: tl.constexpr, BK: tl.constexpr, WFMT: tl.constexpr, WB: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):  # fmt: skip
    """Program (slot, N tile): act[slot, n] = silu(W_gate[e] x) * (W_up[e] x) for BN columns; slot K: shared.
    Gate and up rows in one [2 BN, BK] tile, so both stream in one loop."""
    NT: tl.constexpr = I // BN
    pid = tl.program_id(0)
    slot = pid // NT
    r = tl.arange(0, 2 * BN)
    n0 = (pid % NT) * BN
    rows = tl.where(r < BN, n0 + r, I + n0 + r - BN)
    if slot < K:
        e = tl.load(ids_ptr + slot).to(tl.int64)
        y = _expert_products(w_ptr, s_ptr, z_ptr, x_ptr, e, rows, 2 * I, H, 2 * BN, BK, WFMT, WB, HAS_ZERO)
    else:
        y = _row_products(ws_ptr, ws_ptr, ws_ptr, x_ptr, rows, H, 2 * BN, BK, 0, 1, 0)
    y2 = tl.reshape(y, (2, BN))
    which = tl.arange(0, 2)[:, None]
    g = tl.sum(tl.where(which == 0, y2, 0.0), axis=0)
    u = tl.sum(tl.where(which == 1, y2, 0.0), axis=0)
    act = g * tl.sigmoid(g) * u
    tl.store(act_ptr + slot * I + n0 + tl.arange(0, BN), act.to(act_ptr.dtype.element_ty))


@triton.jit
def down_kernel(
    act_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, out_ptr, H: tl.constexpr, I: tl.constexpr,  # noqa: E741
    K: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, WFMT: tl.constexpr, WB: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_SHARED: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """Program (H tile): out[h] = sum_j w_j W_down[e_j][h] act_j (+ the shared expert's), slot order.
    UNROLL: the slots unrolled, so every slot's loads can be in flight together."""
    h = tl.program_id(0) * BH + tl.arange(0, BH)
    y = tl.zeros((BH,), dtype=tl.float32)
    if UNROLL:
        for j in tl.static_range(K):
            y += _weighted_slot(
                act_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, z_ptr, j, h, H, I, BH, BK, WFMT, WB, HAS_ZERO
            )
    else:
        for j in range(K):
            y += _weighted_slot(
                act_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, z_ptr, j, h, H, I, BH, BK, WFMT, WB, HAS_ZERO
            )
    if HAS_SHARED:
        y += _row_products(ws_ptr, ws_ptr, ws_ptr, act_ptr + K * I, h, I, BH, BK, 0, 1, 0)
    tl.store(out_ptr + h, y.to(out_ptr.dtype.element_ty))


FORMATS = {"native": 0, "fp8_block": 1, "int4": 2, "mxfp4": 3}
BLOCKS = {"native": 1, "fp8_block": 128, "int4": 128, "mxfp4": 32}
SHAPES = {
    "tiny": (256, 128, 16, 4, True),
    "qwen3_next": (2048, 512, 512, 10, True),
    "qwen3_30b": (2048, 768, 128, 8, False),
}


def make_case(shape: str, fmt: str, device: str):  # type: ignore[no-untyped-def]
    from moetrt.op import quant

    H, I, E, K, shared = SHAPES[shape]  # noqa: E741
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(H, generator=gen, device=device).to(torch.bfloat16)
    ids = torch.randperm(E, generator=gen, device=device)[:K].to(torch.int32)
    wts = torch.rand(K, generator=gen, device=device) / K
    w_gu = (torch.randn(E, 2 * I, H, generator=gen, device=device) * H**-0.5).to(torch.bfloat16)
    w_d = (torch.randn(E, H, I, generator=gen, device=device) * I**-0.5).to(torch.bfloat16)
    ws_gu = (torch.randn(2 * I, H, generator=gen, device=device) * H**-0.5).to(torch.bfloat16)
    ws_d = (torch.randn(H, I, generator=gen, device=device) * I**-0.5).to(torch.bfloat16)
    tables = {}
    if fmt == "native":
        tables = {"gu": (w_gu, w_gu, w_gu), "d": (w_d, w_d, w_d)}
        deq_gu, deq_d = w_gu.float(), w_d.float()
    else:
        zp = fmt == "int4"
        q_gu = quant.quantize(fmt, BLOCKS[fmt], w_gu, zp)
        q_d = quant.quantize(fmt, BLOCKS[fmt], w_d, zp)
        for name, q in (("gu", q_gu), ("d", q_d)):
            zero = q.zero if q.zero is not None else q.scale
            tables[name] = (q.codes, q.scale, zero)
        deq_gu = quant.dequantize(fmt, BLOCKS[fmt], q_gu, H)
        deq_d = quant.dequantize(fmt, BLOCKS[fmt], q_d, I)
    # float32 reference, the activation rounded to bf16 as the kernels store it
    acts = []
    for j in range(K + int(shared)):
        wgu = deq_gu[ids[j]] if j < K else ws_gu.float()
        gu = wgu @ x.float()
        g, u = gu[:I], gu[I:]
        acts.append((torch.nn.functional.silu(g) * u).to(torch.bfloat16).float())
    ref = sum(wts[j] * (deq_d[ids[j]] @ acts[j]) for j in range(K))
    if shared:
        ref = ref + ws_d.float() @ acts[K]
    moved = {k: tuple(t.to(device) for t in v) for k, v in tables.items()}
    count = 1 if fmt == "native" else 2  # native tables hold the weight three times over
    routed_bytes = sum(t.numel() * t.element_size() for name in ("gu", "d") for t in moved[name][:count])
    step_bytes = routed_bytes * K // E + (int(shared) * 3 * I * H * 2)
    return dict(
        x=x.to(device), ids=ids.to(device), wts=wts.to(device), tables=moved, ws_gu=ws_gu.to(device),
        ws_d=ws_d.to(device), ref=ref.to(device), dims=(H, I, K, shared), step_bytes=step_bytes,
    )  # fmt: skip


def launch(case, fmt: str, bn: int, bk: int, bh: int, bkd: int, warps: int, unroll: int):  # type: ignore[no-untyped-def]
    H, I, K, shared = case["dims"]  # noqa: E741
    wf, wb = FORMATS[fmt], BLOCKS[fmt]
    act = torch.empty((K + 1) * I, dtype=torch.bfloat16, device=case["x"].device)
    out = torch.empty(H, dtype=torch.bfloat16, device=case["x"].device)
    gu, d = case["tables"]["gu"], case["tables"]["d"]
    zero = int(fmt == "int4")

    def gate_up() -> None:
        gate_up_kernel[((K + int(shared)) * (I // bn),)](
            case["x"], case["ids"], gu[0], gu[1], gu[2], case["ws_gu"], act, H, I, K, bn, bk, wf, wb, zero,
            int(shared), num_warps=warps,
        )  # fmt: skip

    def down() -> None:
        down_kernel[(H // bh,)](
            act, case["ids"], case["wts"], d[0], d[1], d[2], case["ws_d"], out, H, I, K, bh, bkd, wf, wb, zero,
            int(shared), unroll, num_warps=warps,
        )  # fmt: skip

    def call() -> None:
        gate_up()
        down()

    return call, out, gate_up, down


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen3_next")
    parser.add_argument("--formats", default="native,fp8_block,int4,mxfp4")
    parser.add_argument("--quick", action="store_true", help="one small variant per format (the CPU check)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = 0
    for shape, fmt in itertools.product(args.shapes.split(","), args.formats.split(",")):
        case = make_case(shape, fmt, device)
        if args.quick:
            grid = [(16, 256, 16, 128, 4, 0), (8, 256, 8, 128, 4, 1)]
        else:
            H, I = case["dims"][:2]  # noqa: E741
            grid = [
                (bn, bk, bh, bkd, w, u)
                for bn in (1, 2, 4)
                for bk in (H,)
                for bh in (2, 4, 8)
                for bkd in (I,)
                for w in (4,)
                for u in (0, 1)
                if not (u and bh * bkd * case["dims"][2] > 65536)
            ]
        for bn, bk, bh, bkd, warps, unroll in grid:
            H, I = case["dims"][:2]  # noqa: E741
            if (
                (fmt == "fp8_block" and (bk < 128 or bkd < 128))
                or H % bk
                or I % bkd
                or bkd & (bkd - 1)
                or I % bn
                or H % bh
            ):
                continue  # the probe's kernels have no masks
            call, out, gate_up, down = launch(case, fmt, bn, bk, bh, bkd, warps, unroll)
            try:
                call()
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                print(
                    json.dumps(
                        {
                            "shape": shape,
                            "format": fmt,
                            "cfg": [bn, bk, bh, bkd, warps, unroll],
                            "error": str(exc)[:200],
                        }
                    )
                )
                failures += 1
                continue
            ref = case["ref"]
            err = float((out.float() - ref).norm() / ref.norm())
            row = {
                "shape": shape,
                "format": fmt,
                "cfg": [bn, bk, bh, bkd, warps, unroll],
                "rel_err": round(err, 5),
                "ok": err <= tolerance("bfloat16"),
            }
            failures += not row["ok"]
            if device == "cuda":
                from moetrt.tune.timing import time_graph

                reps = int(os.environ.get("REPEATS", "50"))
                us = time_graph(call, repeats=reps).median_us
                row.update(us=round(us, 2), tb_s=round(case["step_bytes"] / us / 1e6, 2))
                row.update(gate_up_us=round(time_graph(gate_up, repeats=reps).median_us, 2))
                row.update(down_us=round(time_graph(down, repeats=reps).median_us, 2))
            print(json.dumps(row), flush=True)
    if failures:
        raise SystemExit(f"{failures} variants failed or exceeded the bf16 tolerance")


if __name__ == "__main__":
    main()
