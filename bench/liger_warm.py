#!/usr/bin/env python3
"""Compile Liger-Kernel's fused-MoE autotuning candidates ahead of a timed `moe_bench.py` run.

Liger autotunes its GEMMs on a shape's first call (key: H and I), compiling every candidate config one after the
other: 86-146 s per shape on an H200's host, most of it Triton compiling. This script makes that first call for
each shape in its own process, all at once, so the candidates compile in parallel into Triton's kernel cache
(`TRITON_CACHE_DIR`, the same for every process of the machine); the benchmark's own autotuning, in its
process and one shape at a time, then loads compiled kernels and only times them. The configs these processes
pick are not used: they time under each other's load.

    PYTHONPATH=src:/path/to/liger python3 bench/liger_warm.py --shapes qwen3_next,qwen3_30b,mixtral,deepseek_v3
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

import workloads


def warm(shape_name: str) -> str:
    """Liger's first call at the benchmark's first token count (T = 1, k distinct experts) for one shape."""
    import torch
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    attrs = workloads.SHAPES[shape_name].attrs
    e, h, i, k = attrs.num_experts, attrs.hidden_size, attrs.intermediate_size, attrs.top_k
    start = time.perf_counter()
    with torch.no_grad():
        gen = torch.Generator(device="cuda").manual_seed(0)
        gate_up = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        down = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids = torch.randperm(e, device="cuda", generator=gen)[:k].reshape(1, k).to(torch.int32)
        weights = torch.full((1, k), 1.0 / k, device="cuda", dtype=torch.bfloat16)
        LigerFusedMoEFunction.apply(x, gate_up, down, ids, weights)
        torch.cuda.synchronize()
    return f"{shape_name}: first call {time.perf_counter() - start:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen3_next,qwen3_30b,mixtral,deepseek_v3")
    args = parser.parse_args()
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in workloads.SHAPES]
    if unknown:
        print(f"error: unknown shape(s) {', '.join(unknown)}; pick from {', '.join(workloads.SHAPES)}")
        return 2
    # spawn: each process opens its own CUDA context
    with multiprocessing.get_context("spawn").Pool(len(names)) as pool:
        for line in pool.imap_unordered(warm, names):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
