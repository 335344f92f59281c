"""Where one call of the op goes: the GPU time of each launch of the AOT-cubin launcher, by the CUDA profiler.

    PYTHONPATH=src:bench python3 bench/stage_times.py --shapes qwen3_next,qwen3_30b --tokens 1,4096 \
        [--bundle qwen3_next=qwen3_next_sm90.bin] [--out stage_times.jsonl]

For each (shape, T) the call runs through `moe_forward` (the launcher the TensorRT plugin uses) on the
bench's random inputs (bf16), --warmup times, then --iters times under torch.profiler; each kernel's row is
its mean GPU time per call, with its share of the sum. The kernels run back to back as in a call, so the L2
keeps what the previous kernel left (as in serving). The gaps between launches are not in the sum; where the
table turns programmatic dependent launch on, a kernel starts before the previous one ends and its time includes
that wait, so the rows overlap and the sum can exceed the call. --alone times each launch by itself instead
(`tune.tuner.profile_stages`: CUDA events around every launch, L2 flushed before each call, so no launch
overlaps another and each row is that kernel's own cost, its launch included). --prefixes times the call cut
after each launch instead (`prefix_times`: launches 0..n enqueued as in a call, behind a sleep kernel so the
host is ahead, L2 flushed): the step from one row to the next is what launch n adds to the call's critical
path, its launch gap and any wait under programmatic dependent launch included. Needs a GPU; a bundle compiled
on the CPU (`moetrt aot --preset SHAPE --dtype bf16 --sm 90`) saves the compile.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch


def prefix_times(bundle, attrs, inputs: dict, iters: int) -> list[tuple[str, float]]:
    """Median GPU µs of the call cut after each launch: [("(events)", t0), (stage 0, t1), ...]."""
    import statistics

    from moetrt.kernels.launcher import MoELauncher
    from moetrt.tune.timing import L2Flusher
    from moetrt.tune.tuner import staged_call

    call = staged_call(MoELauncher(bundle, attrs), attrs, inputs)
    ops = call.ops
    flush = L2Flusher(torch.device("cuda"))
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    for count in range(len(ops) + 1):
        samples = []
        for _ in range(iters + 2):
            flush()
            torch.cuda._sleep(2_000_000)  # the host enqueues the launches before the GPU reaches them
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if count:
                call.enqueue(stream, 0, count)
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) * 1e3)
        rows.append((ops[count - 1].stage if count else "(events)", statistics.median(samples[2:])))
    return rows


def stage_times(
    name: str,
    tokens: int,
    bundle_path: Path | None,
    warmup: int,
    iters: int,
    alone: bool = False,
    prefixes: bool = False,
) -> list[dict]:
    """Mean GPU µs per call of each kernel of one call (shape `name`, `tokens` tokens, bf16); with `alone`,
    the median µs of each launch timed by itself."""
    import workloads
    from torch.profiler import ProfilerActivity, profile

    from moetrt.kernels.aot import KernelBundle
    from moetrt.kernels.torch_ops import moe_forward

    attrs = workloads.SHAPES[name].attrs
    dev = torch.device("cuda")
    weights = workloads.make_weights(attrs, torch.bfloat16, dev, seed=3)
    inputs = workloads.assemble(
        attrs, workloads.make_token_inputs(attrs, tokens, torch.bfloat16, dev, seed=4, skew=0.0), weights
    )
    bundle = KernelBundle.from_bytes(bundle_path.read_bytes()) if bundle_path else None
    if prefixes:
        from moetrt.core.devices import current_sm
        from moetrt.kernels.aot import compile_kernels

        if bundle is None:
            bundle = compile_kernels(attrs, "bfloat16", current_sm(), workers=8)
        rows, previous = [], 0.0
        for stage, us in prefix_times(bundle, attrs, inputs, iters):
            rows.append(
                dict(shape=name, T=tokens, until=stage, us=round(us, 2), adds=round(us - previous, 2))
            )
            previous = us
        return rows
    if alone:
        from moetrt.core.devices import current_sm
        from moetrt.kernels.aot import compile_kernels
        from moetrt.tune.tuner import profile_stages

        if bundle is None:
            bundle = compile_kernels(attrs, "bfloat16", current_sm(), workers=8)
        per_stage = profile_stages(bundle, attrs, inputs, iters)
        total = sum(per_stage.values())
        return [
            dict(shape=name, T=tokens, kernel=stage, us=round(us, 2), share=round(us / total, 3), alone=True)
            for stage, us in per_stage.items()
        ] + [dict(shape=name, T=tokens, kernel="(sum)", us=round(total, 2), share=1.0, alone=True)]
    for _ in range(warmup):
        moe_forward(inputs, attrs, bundle)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            moe_forward(inputs, attrs, bundle)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / iters  # µs
    total = sum(per_kernel.values())
    return [
        dict(shape=name, T=tokens, kernel=kernel, us=round(us, 2), share=round(us / total, 3))
        for kernel, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])
    ] + [dict(shape=name, T=tokens, kernel="(sum)", us=round(total, 2), share=1.0)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_next,qwen3_30b")
    p.add_argument("--tokens", default="1,4096")
    p.add_argument(
        "--bundle", action="append", default=[], help="SHAPE=PATH of a bundle compiled ahead of time"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="a .jsonl file for the rows")
    p.add_argument("--alone", action="store_true", help="time each launch by itself (see above)")
    p.add_argument("--prefixes", action="store_true", help="time the call cut after each launch (see above)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(
            "stage_times: needs a CUDA GPU (the launcher runs cubins); run it on the GPU machine",
            file=sys.stderr,
        )
        return 2
    bundles = dict(item.split("=", 1) for item in a.bundle)
    rows: list[dict] = []
    for name in a.shapes.split(","):
        for tokens in (int(t) for t in a.tokens.split(",")):
            path = Path(bundles[name]) if name in bundles else None
            for row in stage_times(name, tokens, path, a.warmup, a.iters, a.alone, a.prefixes):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.out:
        a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
