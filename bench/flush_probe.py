#!/usr/bin/env python3
"""What the L2 flush before a timed call costs the call: the same calls timed after three flushes.

    PYTHONPATH=src:bench python3 bench/flush_probe.py --out OUT.json

- dirty: a write of 4x the L2 (what `tune.timing.L2Flusher` did until 2026-12-04): the L2 is left full of dirty
  lines, and the timed call pays for writing them back to DRAM as its own reads evict them;
- dirty_then_clean: the same write, then a read of another 4x-L2 buffer, which evicts the dirty lines before
  the call starts;
- read_only: the read alone (what `L2Flusher` does now).
Each call is captured in a CUDA graph and replayed 40 times, CUDA events around each replay (median µs): a
66 MB and a 528 MB device copy, and moetrt's launcher path at Qwen3-Next and Qwen3-30B width (bf16, random
weights, T = 1, 8, 64). Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def time_after(call, flush, device: torch.device, reps: int = 40) -> float:
    """Median µs of `call` replayed from a CUDA graph, `flush` run before each replay (tune.timing's timer)."""
    from moetrt.tune.timing import CapturedCall, time_calls

    captured = CapturedCall(call, device, warmup=1)
    captured()
    return time_calls([captured], device, reps, flush).median_us


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("flush_probe: needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    import workloads

    from moetrt.core.devices import current_sm
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    dirty = torch.empty(4 * l2, dtype=torch.uint8, device=dev)
    clean = torch.ones(l2, dtype=torch.float32, device=dev)  # 4x the L2 in bytes
    sink = torch.empty((), device=dev)
    flushes = {
        "dirty(add_)": lambda: dirty.add_(1),
        "dirty_then_clean": lambda: (dirty.add_(1), torch.sum(clean, 0, out=sink)),
        "read_only": lambda: torch.sum(clean, 0, out=sink),
    }
    calls = {}
    n = 66 * 2**20 // 2
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    calls["copy_66MB"] = lambda: dst.copy_(src)
    big = torch.randn(8 * n, device=dev, dtype=torch.bfloat16)
    big_dst = torch.empty_like(big)
    calls["copy_528MB"] = lambda: big_dst.copy_(big)
    for name in ("qwen3_next", "qwen3_30b"):
        attrs = workloads.SHAPES[name].attrs
        weights = workloads.make_weights(attrs, torch.bfloat16, dev, seed=3)
        bundle = compile_kernels(attrs, "bfloat16", current_sm(), workers=16)
        for t in (1, 8, 64):
            tokens = workloads.make_token_inputs(attrs, t, torch.bfloat16, dev, seed=4, skew=0.0)
            inputs = workloads.assemble(attrs, tokens, weights)
            calls[f"{name}_T{t}"] = lambda i=inputs, at=attrs, b=bundle: moe_forward(i, at, b)
    rows = []
    for call_name, call in calls.items():
        row = {"call": call_name, "l2_bytes": l2}
        for flush_name, flush in flushes.items():
            row[flush_name] = round(time_after(call, flush, dev), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
