"""Prefill grouped GEMMs with Hopper's tensor-memory accelerator: a design probe.

The expert GEMMs of one prefill call (bf16), as the launcher's kernels compute them, in several forms:

- gate_up: act[row, n] = silu(x[token] @ W_gate[e, n]) * (x[token] @ W_up[e, n]) per (row block, N tile)
  - `ptr`: every tile by pointer loads (cp.async), the activation rows gathered by token, as today;
  - `tma_w`: the weight tiles by TMA (a host tensor descriptor over [E * 2I, H]), x still gathered by pointer;
  - `tma`: x laid out by row first (a gather kernel, timed with it), both operands by TMA;
  - `tma_ws`: `tma` with the K loop warp-specialised (a producer warp issues the TMA loads);
  - `ptr+tail`: pointer loads for the experts' full row blocks, and their last, partly filled blocks cut into
    TAIL_ROWS-row pieces multiplied weights first (W @ x.T: the tokens are wgmma's N side), so the tensor cores
    do not run on padding rows;
- down: y[slot, h] = w[slot] * (act[row] @ W_down[e, h]) per (row block, H tile), `ptr`, `ptr+tail`, `tma`,
  `tma_ws`.

Rows are laid out per expert in blocks of BM (each expert's rows padded to a whole block), so a block holds one
expert and a TMA box never mixes experts. Each form is checked against a float32 torch reference (bf16
tolerance; exit 1 on a failure) and, on a GPU, timed by CUDA-graph replay, with its TFLOP/s over the routed
rows' FLOPs (padding not counted).

    PYTHONPATH=src python3 bench/tma_probe.py --shapes qwen3_30b,qwen3_next --tokens 4096
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/tma_probe.py --shapes tiny --tokens 40   # the CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moetrt.kernels.triton_moe import grouped_tile

# default rows of the pieces the experts' last, partly filled blocks are cut into (a config's BT)
TAIL_ROWS = 32
SHAPES = {  # E, K, H, I
    "tiny": (8, 2, 128, 64),
    "qwen3_30b": (128, 8, 2048, 768),
    "qwen3_next": (512, 10, 2048, 512),
    "mixtral": (8, 2, 4096, 14336),
}


@triton.jit
def _silu_glu(g, u):
    # SiLU-GLU as the committed probe results were measured with; triton_common.glu (tl.sigmoid) is the same
    # function, but ptxas schedules the whole kernel differently with it (checked in the sm_90 SASS)
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _block_tile(NT: tl.constexpr, BN: tl.constexpr, block_expert_ptr, GM: tl.constexpr):
    """(row block, first column, expert) of this program, in the launcher kernels' order (grouped_tile: GM
    row blocks take each column tile in turn; with GM 1 a block's NT column tiles run together)."""
    b, pid_n = grouped_tile(tl.program_id(0), NT, GM)
    return b, pid_n * BN, tl.load(block_expert_ptr + b)


@triton.jit
def gate_up_gathered(
    x_ptr, w, act_ptr, block_expert_ptr, block_row0_ptr, row_token_ptr, H: tl.constexpr,
    I: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,  # noqa: E741
    W_TMA: tl.constexpr, ROW0_TABLE: tl.constexpr, W_FIRST: tl.constexpr, GM: tl.constexpr = 1,
):  # fmt: skip
    """gate_up with x's rows gathered by token (pointer loads). W_TMA: w is a tensor descriptor over the
    [E * 2I, H] weights, else their pointer. ROW0_TABLE: a block's first row comes from block_row0 (the
    ptr+tail form's lists of blocks and tail pieces), else it is b * BM. W_FIRST multiplies W @ x.T ([BN, BM]:
    the tokens are wgmma's N side, which may be as narrow as 8 rows) for the tail pieces."""
    b, n0, e = _block_tile(I // BN, BN, block_expert_ptr, GM)
    if ROW0_TABLE:
        rows = tl.load(block_row0_ptr + b) + tl.arange(0, BM)
    else:
        rows = b * BM + tl.arange(0, BM)
    token = tl.load(row_token_ptr + rows)
    row_ok = token >= 0
    n = n0 + tl.arange(0, BN)
    if W_TMA:
        w_row = e * (2 * I) + n0
    else:
        w_base = w + e.to(tl.int64) * (2 * I * H)
    if W_FIRST:
        acc_g = tl.zeros((BN, BM), tl.float32)
        acc_u = tl.zeros((BN, BM), tl.float32)
    else:
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
    for k0 in tl.range(0, H, BK, num_stages=STAGES):
        ks = k0 + tl.arange(0, BK)
        if W_TMA:
            wg = w.load([w_row, k0])
            wu = w.load([w_row + I, k0])
        else:
            wg = tl.load(w_base + n[:, None] * H + ks[None, :])
            wu = tl.load(w_base + (n + I)[:, None] * H + ks[None, :])
        xt = tl.load(x_ptr + token[:, None] * H + ks[None, :], mask=row_ok[:, None], other=0.0)
        if W_FIRST:
            acc_g = tl.dot(wg, tl.trans(xt), acc_g)
            acc_u = tl.dot(wu, tl.trans(xt), acc_u)
        else:
            acc_g = tl.dot(xt, tl.trans(wg), acc_g)
            acc_u = tl.dot(xt, tl.trans(wu), acc_u)
    if W_FIRST:
        acc_g, acc_u = tl.trans(acc_g), tl.trans(acc_u)
    act = _silu_glu(acc_g, acc_u).to(act_ptr.dtype.element_ty)
    # padding rows (token -1) get zeros: they belong to their block, and nothing reads them
    tl.store(act_ptr + rows[:, None] * I + n[None, :], act)


@triton.jit
def gate_up_tma(
    x_desc, w_desc, act_ptr, block_expert_ptr, H: tl.constexpr, I: tl.constexpr,  # noqa: E741
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr,
    GM: tl.constexpr = 1,
):  # fmt: skip
    b, n0, e = _block_tile(I // BN, BN, block_expert_ptr, GM)
    row0 = b * BM
    w_row = e * (2 * I) + n0
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k0 in tl.range(0, H, BK, num_stages=STAGES, warp_specialize=WS):
        xt = x_desc.load([row0, k0])
        wg = w_desc.load([w_row, k0])
        wu = w_desc.load([w_row + I, k0])
        acc_g = tl.dot(xt, tl.trans(wg), acc_g)
        acc_u = tl.dot(xt, tl.trans(wu), acc_u)
    act = _silu_glu(acc_g, acc_u).to(act_ptr.dtype.element_ty)
    rows = row0 + tl.arange(0, BM)
    n = n0 + tl.arange(0, BN)
    tl.store(act_ptr + rows[:, None] * I + n[None, :], act)


def split_tails(block_expert: torch.Tensor, row_slot: torch.Tensor, BM: int, BT: int):
    """The padded layout's full blocks (expert, first row) and its partly filled blocks cut into BT-row pieces
    that hold routed rows: ((expert, row0) of the full blocks, (expert, row0) of the tail pieces)."""
    filled = (row_slot.view(-1, BM) >= 0).sum(1)
    row0 = torch.arange(block_expert.numel(), device=row_slot.device) * BM
    full = filled == BM
    pieces = [(int(e), int(r) + j * BT) for e, r, f in zip(block_expert[~full], row0[~full], filled[~full])
              for j in range(-(-int(f) // BT))]  # fmt: skip
    to = dict(dtype=torch.int32, device=row_slot.device)
    tail_e = torch.tensor([p[0] for p in pieces], **to)
    tail_r = torch.tensor([p[1] for p in pieces], **to)
    return (block_expert[full].to(**to), row0[full].to(**to)), (tail_e, tail_r)


@triton.jit
def gather_rows(x_ptr, xg_ptr, row_token_ptr, H: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    token = tl.load(row_token_ptr + rows)
    for h0 in tl.range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        v = tl.load(x_ptr + token[:, None] * H + hs[None, :], mask=(token >= 0)[:, None], other=0.0)
        tl.store(xg_ptr + rows[:, None] * H + hs[None, :], v)


@triton.jit
def _store_weighted_rows(y, rows, h, row_slot_ptr, row_w_ptr, y_ptr, H: tl.constexpr):
    """y[slot, h] = weight * the block's products, for the block's routed rows (slot -1: padding)."""
    slot = tl.load(row_slot_ptr + rows)
    wt = tl.load(row_w_ptr + rows)
    tl.store(y_ptr + slot[:, None] * H + h[None, :], (y * wt[:, None]).to(y_ptr.dtype.element_ty),
             mask=(slot >= 0)[:, None])  # fmt: skip


@triton.jit
def down_ptr(
    act_ptr, w_ptr, y_ptr, block_expert_ptr, block_row0_ptr, row_slot_ptr, row_w_ptr, H: tl.constexpr,
    I: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,  # noqa: E741
    ROW0_TABLE: tl.constexpr, W_FIRST: tl.constexpr, GM: tl.constexpr = 1,
):  # fmt: skip
    """down by pointer loads; ROW0_TABLE and W_FIRST as in gate_up_gathered (the ptr+tail form)."""
    b, h0, e = _block_tile(H // BH, BH, block_expert_ptr, GM)
    if ROW0_TABLE:
        rows = tl.load(block_row0_ptr + b) + tl.arange(0, BM)
    else:
        rows = b * BM + tl.arange(0, BM)
    h = h0 + tl.arange(0, BH)
    w_base = w_ptr + e.to(tl.int64) * (H * I)
    if W_FIRST:
        y = tl.zeros((BH, BM), tl.float32)
    else:
        y = tl.zeros((BM, BH), tl.float32)
    for k0 in tl.range(0, I, BK, num_stages=STAGES):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(act_ptr + rows[:, None] * I + ks[None, :])
        if W_FIRST:
            w = tl.load(w_base + h[:, None] * I + ks[None, :])
            y = tl.dot(w, tl.trans(a), y)
        else:
            w = tl.load(w_base + h[None, :] * I + ks[:, None])
            y = tl.dot(a, w, y)
    if W_FIRST:
        y = tl.trans(y)
    _store_weighted_rows(y, rows, h, row_slot_ptr, row_w_ptr, y_ptr, H)


@triton.jit
def down_tma(
    a_desc, w_desc, y_ptr, block_expert_ptr, row_slot_ptr, row_w_ptr, H: tl.constexpr, I: tl.constexpr,  # noqa: E741
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr,
    GM: tl.constexpr = 1,
):  # fmt: skip
    b, h0, e = _block_tile(H // BH, BH, block_expert_ptr, GM)
    row0 = b * BM
    y = tl.zeros((BM, BH), tl.float32)
    for k0 in tl.range(0, I, BK, num_stages=STAGES, warp_specialize=WS):
        a = a_desc.load([row0, k0])
        w = w_desc.load([e * H + h0, k0])
        y = tl.dot(a, tl.trans(w), y)
    _store_weighted_rows(y, row0 + tl.arange(0, BM), h0 + tl.arange(0, BH), row_slot_ptr, row_w_ptr, y_ptr, H)


def padded_layout(ids: torch.Tensor, E: int, BM: int, GM: int = 1):
    """Rows per expert padded to whole blocks of BM, the blocks to whole groups of GM (empty blocks of the
    last expert, as the launchers' grids): (block_expert, row_slot [-1 for padding])."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    blocks = (counts + BM - 1) // BM
    block_expert = torch.repeat_interleave(torch.arange(E, device=ids.device), blocks)
    start = torch.cumsum(blocks, 0) * BM - blocks * BM
    row_slot = torch.full((int(blocks.sum()) * BM,), -1, dtype=torch.int64, device=ids.device)
    first = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    rank = torch.arange(flat.numel(), device=ids.device) - first[sorted_e]
    row_slot[start[sorted_e] + rank] = order
    extra = -block_expert.numel() % GM
    block_expert = torch.cat([block_expert, block_expert[-1:].repeat(extra)])
    row_slot = torch.cat([row_slot, row_slot.new_full((extra * BM,), -1)])
    return block_expert.to(torch.int32), row_slot


def run_config(
    name: str,
    T: int,
    cfg: dict,
    x,
    w_gu,
    w_d,
    ids,
    topw,
    act_ref,
    y_ref,
    timing: bool,
    rows_out: list[dict],
    only: set[str],
) -> bool:
    """Every form at one block configuration: checked, and timed where it is right."""
    E, K, H, I = SHAPES[name]  # noqa: E741
    dev, dt = x.device, x.dtype
    flops_gu = 2 * T * K * H * 2 * I
    flops_d = 2 * T * K * H * I
    ok = True
    BM, BN, BK, BH, BKD, W, S = (cfg[k] for k in ("BM", "BN", "BK", "BH", "BKD", "warps", "stages"))
    if I % BN or H % BH or H % BK or I % BKD:
        return True
    GM = cfg.get("GM", 1)
    block_expert, row_slot = padded_layout(ids, E, BM, GM)
    R = row_slot.numel()
    nb = block_expert.numel()
    row_token = torch.where(row_slot >= 0, row_slot // K, -1).to(torch.int32)
    row_w = torch.where(row_slot >= 0, topw.flatten()[row_slot.clamp(min=0)], 0.0)
    row_slot32 = row_slot.to(torch.int32)
    act = torch.empty(R, I, device=dev, dtype=dt)
    xg = torch.empty(R, H, device=dev, dtype=dt)
    y = torch.empty(T * K, H, device=dev, dtype=dt)
    w_desc = TensorDescriptor.from_tensor(w_gu.view(E * 2 * I, H), [BN, BK])
    x_desc = TensorDescriptor.from_tensor(xg, [BM, BK])
    a_desc = TensorDescriptor.from_tensor(act, [BM, BKD])
    wd_desc = TensorDescriptor.from_tensor(w_d.view(E * H, I), [BH, BKD])
    grid_gu = (nb * (I // BN),)
    grid_d = (nb * (H // BH),)
    common = dict(num_warps=W)

    bt = min(cfg.get("BT", TAIL_ROWS), BM)  # pieces inside their block
    (full_e, full_r), (tail_e, tail_r) = split_tails(block_expert, row_slot, BM, bt)

    def gathered(blocks, w, block_e, block_r, bm, w_tma, row0_table, w_first):
        # block_r (first rows) is read only with ROW0_TABLE; the lists of full blocks and tail pieces are not
        # padded to whole groups, so they run in GM 1 order
        gate_up_gathered[(blocks * (I // BN),)](
            x, w, act, block_e, block_r, row_token, H, I, bm, BN, BK, S, w_tma, row0_table, w_first,
            GM=1 if row0_table else GM, **common,
        )  # fmt: skip

    def blocks_and_tails():
        if full_e.numel():
            gathered(full_e.numel(), w_gu, full_e, full_r, BM, False, True, False)
        if tail_e.numel():
            gathered(tail_e.numel(), w_gu, tail_e, tail_r, bt, False, True, True)

    def down_blocks_and_tails():
        for blocks_e, blocks_r, bm, w_first in ((full_e, full_r, BM, False), (tail_e, tail_r, bt, True)):
            if blocks_e.numel():
                down_ptr[(blocks_e.numel() * (H // BH),)](
                    act,
                    w_d,
                    y,
                    blocks_e,
                    blocks_r,
                    row_slot32,
                    row_w,
                    H,
                    I,
                    bm,
                    BH,
                    BKD,
                    S,
                    True,
                    w_first,
                    **common,
                )

    def gather():
        gather_rows[(R // 16,)](x, xg, row_token, H, 16, min(256, H), num_warps=4)

    forms = {
        "gate_up/ptr": lambda: gathered(nb, w_gu, block_expert, block_expert, BM, False, False, False),
        "gate_up/ptr+tail": blocks_and_tails,
        "gate_up/tma_w": lambda: gathered(nb, w_desc, block_expert, block_expert, BM, True, False, False),
        # x laid out by row once before (the gather is timed on its own, below)
        "gate_up/tma": lambda: gate_up_tma[grid_gu](
            x_desc, w_desc, act, block_expert, H, I, BM, BN, BK, S, False, GM=GM, **common
        ),
        "gate_up/tma_ws": lambda: gate_up_tma[grid_gu](
            x_desc, w_desc, act, block_expert, H, I, BM, BN, BK, S, True, GM=GM, **common
        ),
        "down/ptr": lambda: down_ptr[grid_d](
            act,
            w_d,
            y,
            block_expert,
            block_expert,
            row_slot32,
            row_w,
            H,
            I,
            BM,
            BH,
            BKD,
            S,
            False,
            False,
            GM=GM,
            **common,
        ),
        "down/ptr+tail": down_blocks_and_tails,
        "down/tma": lambda: down_tma[grid_d](
            a_desc, wd_desc, y, block_expert, row_slot32, row_w, H, I, BM, BH, BKD, S, False, GM=GM, **common
        ),
        "down/tma_ws": lambda: down_tma[grid_d](
            a_desc, wd_desc, y, block_expert, row_slot32, row_w, H, I, BM, BH, BKD, S, True, GM=GM, **common
        ),
    }
    if os.environ.get("TRITON_INTERPRET") == "1":
        forms = {k: v for k, v in forms.items() if not k.endswith("_ws")}  # the interpreter runs no WS
    if only:
        forms = {k: v for k, v in forms.items() if k in only}
    gather()
    gate_ref = act_ref.to(dt)
    for form, call in forms.items():
        row = dict(shape=name, T=T, form=form, **cfg)
        began = time.perf_counter()
        try:
            if form.startswith("gate_up"):
                act.fill_(float("nan"))
                call()
                got = act[row_slot >= 0].float()
                ref = act_ref[row_slot[row_slot >= 0]]
            else:
                act.copy_(torch.zeros_like(act))
                act[row_slot >= 0] = gate_ref[row_slot[row_slot >= 0]]
                y.fill_(float("nan"))
                call()
                got, ref = y.float(), y_ref
            err = float((got - ref).norm() / ref.norm())
            row["rel_err"] = err
            row["ok"] = bool(err <= 1e-2)
            ok &= row["ok"]
            if timing and row["ok"]:
                from moetrt.tune.timing import time_graph

                t = time_graph(call, repeats=30)
                us = t.median_us
                row["us"] = us
                row["tflops"] = (flops_gu if form.startswith("gate_up") else flops_d) / us / 1e6
        except Exception as exc:  # a form the compiler refuses: say so, keep going
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            row["ok"] = False
            ok = False
        row["wall_s"] = round(time.perf_counter() - began, 1)
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    if timing and (not only or "gather" in only):
        from moetrt.tune.timing import time_graph

        t = time_graph(gather, repeats=30)
        print(json.dumps(dict(shape=name, T=T, form="gather", us=t.median_us, **cfg)), flush=True)
    return ok


def run_shape(
    name: str, T: int, configs: list[dict], timing: bool, rows_out: list[dict], only: set[str]
) -> bool:
    E, K, H, I = SHAPES[name]  # noqa: E741
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device="cpu").manual_seed(0)
    dt = torch.bfloat16
    x = (torch.randn(T, H, generator=gen) * 0.5).to(dev, dt)
    w_gu = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dev, dt)
    w_d = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dev, dt)
    logits = torch.randn(T, E, generator=gen)
    topw, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    ids, topw = ids.to(dev), topw.to(dev, torch.float32)
    # reference (float32)
    xf = x.float()
    act_ref = torch.empty(T * K, I, device=dev)
    y_ref = torch.empty(T * K, H, device=dev)
    flat = ids.flatten()
    for e in range(E):
        sl = (flat == e).nonzero().flatten()
        if sl.numel() == 0:
            continue
        xe = xf[sl // K]
        g = xe @ w_gu[e, :I].float().T
        u = xe @ w_gu[e, I:].float().T
        a = torch.nn.functional.silu(g) * u
        act_ref[sl] = a
        y_ref[sl] = (a.to(dt).float() @ w_d[e].float().T) * topw.flatten()[sl, None]
    flops_gu = 2 * T * K * H * 2 * I
    flops_d = 2 * T * K * H * I
    ok = True
    for cfg in configs:
        ok &= run_config(name, T, cfg, x, w_gu, w_d, ids, topw, act_ref, y_ref, timing, rows_out, only)
    if timing:  # cuBLAS on the same FLOPs as one dense product, the ceiling the grouped forms aim at
        from moetrt.tune.timing import time_graph

        x_rows = torch.randn(T * K, H, device=dev, dtype=dt)
        act_rows = torch.randn(T * K, I, device=dev, dtype=dt)
        for form, src, w, flops in (
            ("gate_up/cublas", x_rows, w_gu[0], flops_gu),
            ("down/cublas", act_rows, w_d[0], flops_d),
        ):
            us = time_graph(lambda src=src, w=w: src @ w.T, repeats=30).median_us
            row = dict(shape=name, T=T, form=form, us=us, tflops=flops / us / 1e6)
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_30b,qwen3_next")
    p.add_argument("--tokens", default="4096")
    p.add_argument(
        "--configs", default=None, help="JSON list of {BM, BN, BK, BH, BKD, warps, stages[, BT, GM]}"
    )
    p.add_argument("--out", default=None, help="a .jsonl file for the rows")
    p.add_argument(
        "--forms", default="", help="comma-separated forms to run (default: all), e.g. down/tma_ws,gather"
    )
    a = p.parse_args()
    configs = json.loads(a.configs) if a.configs else [
        dict(BM=128, BN=128, BK=64, BH=256, BKD=64, warps=8, stages=3),
        dict(BM=128, BN=64, BK=64, BH=128, BKD=64, warps=4, stages=4),
        dict(BM=64, BN=128, BK=64, BH=128, BKD=64, warps=4, stages=4),
    ]  # fmt: skip
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if interp:  # the interpreter's bf16 products and casts, as the kernel tests run them
        from moetrt.kernels.torch_ops import _interpreter_fixes

        _interpreter_fixes()
    rows: list[dict] = []
    ok = True
    for name in a.shapes.split(","):
        for T in (int(t) for t in a.tokens.split(",")):
            ok &= run_shape(
                name,
                T,
                configs,
                timing=not interp and torch.cuda.is_available(),
                rows_out=rows,
                only=set(filter(None, a.forms.split(","))),
            )
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
