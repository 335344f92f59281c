#!/usr/bin/env python3
"""The streaming ceiling of one launch at decode size: how fast can a Triton kernel read the 11 experts of a
Qwen3-Next one-token step (11 x 6 MB of bf16 weights, one region per expert) with no arithmetic but a sum?

    PYTHONPATH=src python3 bench/stream_probe.py --out OUT.json
    PYTHONPATH=src python3 bench/stream_probe.py --out OUT.json --bytes-per-weight 0.5   # int4 / mxfp4 codes

`--bytes-per-weight` 1 or 0.5 reads the same 11 regions at fp8's or 4-bit codes' size (each weight row that many
bytes a weight; the scales, 1-3 % more, left out), the ceiling of a quantized one-token step's expert reads;
`--experts 21` the regions of a two-token step (20 routed experts, nearly all distinct, and the shared one).

Three access patterns over a sweep of program counts, block sizes, warps and pipeline stages:
- chunks: each program reads one contiguous chunk of its expert's region;
- tiles: the expert GEMMs' pattern, a [BN rows, H] slab read [BN, BK] at a time;
- tma: the same tiles loaded by the tensor-memory accelerator (a descriptor per program over its expert).
Timed as the tuner times (`tune.timing.time_graph`: CUDA-graph replay, L2 flushed before each replay); a 66 MB
device copy is the reference. The best rows say what the fused experts kernel's 66 MB could take at best in
one launch. Needs a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from moetrt.op.presets import PRESETS


@triton.jit
def chunks_kernel(
    w_ptr, base_ptr, out_ptr, CHUNK: tl.constexpr, PER_REGION: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    base = tl.load(base_ptr + pid // PER_REGION)
    start = base + (pid % PER_REGION).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        acc += tl.load(w_ptr + start + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def tiles_kernel(
    w_ptr, base_ptr, out_ptr, H: tl.constexpr, PER_REGION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    pid = tl.program_id(0)
    base = tl.load(base_ptr + pid // PER_REGION)
    r = (pid % PER_REGION) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k in range(0, H, BK):
        acc += tl.load(w_ptr + base + r[:, None].to(tl.int64) * H + k + tl.arange(0, BK)[None, :]).to(
            tl.float32
        )
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def tma_tiles_kernel(
    w_ptr, base_ptr, out_ptr, H: tl.constexpr, ROWS: tl.constexpr, PER_REGION: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    base = tl.load(base_ptr + pid // PER_REGION)
    desc = tl.make_tensor_descriptor(w_ptr + base, shape=[ROWS, H], strides=[H, 1], block_shape=[BN, BK])
    r0 = (pid % PER_REGION) * BN
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k in range(0, H, BK):
        acc += desc.load([r0, k]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bytes-per-weight", type=float, default=2.0, choices=(2.0, 1.0, 0.5))
    p.add_argument(
        "--experts", type=int, default=11, help="regions read (11: a one-token step's 10 + shared)"
    )
    a = p.parse_args()
    shape = PRESETS["qwen3_next"]
    if not 1 <= a.experts <= shape.num_experts:
        p.error(f"--experts {a.experts}: give 1 to {shape.num_experts} (Qwen3-Next's experts)")
    if not torch.cuda.is_available():
        print("stream_probe: needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    from moetrt.tune.timing import time_graph

    dev = torch.device("cuda")
    num_experts, inter, hit = shape.num_experts, shape.intermediate_size, a.experts
    # bf16 elements a weight row of H weights holds at --bytes-per-weight
    row_elements = int(shape.hidden_size * a.bytes_per_weight / 2)
    per_expert = 3 * inter * row_elements  # gate_up [2I, H] + down [H, I], bf16 elements
    w = torch.randn(num_experts * per_expert, dtype=torch.bfloat16, device=dev)
    experts = torch.randperm(num_experts, generator=torch.Generator().manual_seed(0))[:hit].tolist()
    bases = torch.tensor([e * per_expert for e in experts], dtype=torch.int64, device=dev)
    nbytes = hit * per_expert * 2
    rows = []

    def timed(row: dict, launch) -> None:
        us = time_graph(launch, 30).median_us
        rows.append({**row, "us": round(us, 2), "TBps": round(nbytes / us / 1e6, 2)})

    for chunk_kb in (8, 16, 32, 64, 96, 128, 192, 256, 384):
        chunk = chunk_kb * 512  # elements of 2 bytes
        if per_expert % chunk:
            continue
        per_region = per_expert // chunk
        out = torch.empty(hit * per_region, device=dev)
        for block in (2048, 4096, 8192):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    row = dict(kind="chunks", chunk_kb=chunk_kb, programs=hit * per_region, block=block,
                               warps=warps, stages=stages)  # fmt: skip
                    timed(row, lambda c=chunk, r=per_region, b=block, nw=warps, ns=stages, o=out: chunks_kernel[
                        (hit * r,)](w, bases, o, c, r, b, num_warps=nw, num_stages=ns))  # fmt: skip
    # the GEMMs' [BN, BK] tile pattern, by pointer loads and by TMA (descriptors need Triton's allocator)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    tile_sweeps = (
        ("tiles", (16, 32, 64), (64, 128, 256, 512), lambda r, n, k, nw, ns, o: tiles_kernel[(hit * r,)](
            w, bases, o, row_elements, r, n, k, num_warps=nw, num_stages=ns)),
        ("tma", (16, 32, 64, 128), (64, 128, 256), lambda r, n, k, nw, ns, o: tma_tiles_kernel[(hit * r,)](
            w, bases, o, row_elements, 3 * inter, r, n, k, num_warps=nw, num_stages=ns)),
    )  # fmt: skip
    for kind, bns, bks, launch in tile_sweeps:
        for bn in bns:
            per_region = 3 * inter // bn
            out = torch.empty(hit * per_region, device=dev)
            for bk in bks:
                for warps in (4, 8):
                    for stages in (2, 3, 4, 6):
                        if bn * bk * 2 * stages > 200_000 or bk > row_elements:  # shared memory; row length
                            continue
                        row = dict(
                            kind=kind, bn=bn, bk=bk, programs=hit * per_region, warps=warps, stages=stages
                        )
                        timed(row, functools.partial(launch, per_region, bn, bk, warps, stages, out))
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    timed(dict(kind=f"torch_copy_{nbytes / 1e6:.0f}MB (read + write)"), lambda: dst.copy_(src))
    rows.sort(key=lambda r: r["us"])
    a.out.write_text(json.dumps(rows, indent=0))
    for kind in ("chunks", "tiles", "tma"):
        for row in [r for r in rows if r["kind"] == kind][:4]:
            print(json.dumps(row))
    print(json.dumps([r for r in rows if r["kind"].startswith("torch")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
