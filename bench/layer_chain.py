#!/usr/bin/env python3
"""MoE layers in sequence: the time per layer when each layer's input is the previous layer's output.

A decoder runs its MoE layers one after another, and each call's first kernel (the router) follows the previous
kernel in the stream, so what a call does before its programmatic-dependent-launch wait overlaps the end of the
kernel before it. One call timed alone (bench/quantized_bench.py, bench/moe_bench.py) has no kernel before it
in its graph; this program times L layers (each its own random weights at the shape's real width, so no layer
finds another's in L2) chained through their data in one CUDA graph: layer l + 1 reads layer l's output. The L2
is flushed (read) before each replay; rows: µs per layer (the graph's median over L) beside one layer's graph.
Each layer's down projections (and their biases) are scaled once so that its output has its input's RMS: a
GLU's output falls with the square of a small input, so a chain of random layers would otherwise vanish within
three layers (zeros route every token alike). The graph's first layer is checked against the same chain
launched on a stream without a graph (bf16 tolerance), and every layer's output must be finite; the last
layer's difference is reported, not bounded: the fused decode kernel's float atomics change last bits from run
to run, and a later layer may route such a difference to another expert at a near-tie.

    PYTHONPATH=src:bench python3 bench/layer_chain.py --shapes qwen3_next,qwen3_30b --tokens 1,8 --layers 4 \
        [--format native|fp8_block|int4|mxfp4|fp8_block+a8] [--bundle qwen3_next=PATH] [--out OUT.jsonl]

Quantized formats quantize each layer's scaled native experts round to nearest on the GPU (as
bench/quantized_bench.py does); a --bundle must be compiled for that format.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from workloads import FORMAT_ENTRIES, with_weight_format

from moetrt.core.tolerances import relative_error, tolerance
from moetrt.kernels.aot import KernelBundle, compile_kernels
from moetrt.kernels.launcher import MoELauncher
from moetrt.op.presets import PRESETS
from moetrt.tune.gpu_workload import gpu_quantized_experts, gpu_random_inputs
from moetrt.tune.timing import L2Flusher, time_calls

#: The inputs the op's output is linear in (with the routing fixed): scaled to keep each layer's RMS.
DOWN_PROJECTIONS = ("expert_down_weight", "expert_down_bias", "shared_down_weight")


def chain_rows(
    name: str, fmt: str, tokens: int, layers: int, bundle: KernelBundle, repeats: int
) -> list[dict]:
    attrs = with_weight_format(PRESETS[name], fmt)
    launcher = MoELauncher(bundle, attrs)
    device = torch.device("cuda")
    native = [
        gpu_random_inputs(PRESETS[name], tokens, torch.bfloat16, seed=100 + layer) for layer in range(layers)
    ]
    weights = [gpu_quantized_experts(inputs, attrs) for inputs in native]
    x0 = weights[0]["hidden_states"].clone()
    outs = [torch.empty_like(x0) for _ in range(layers)]
    workspace = torch.empty(launcher.workspace_size(tokens), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the weights are drawn on the default stream

    def enqueue(layer: int, hidden: torch.Tensor) -> None:
        inputs = dict(weights[layer], hidden_states=hidden)
        ptrs = [inputs[n].data_ptr() for n in attrs.present_inputs()]
        launcher.enqueue(
            tokens,
            ptrs,
            [outs[layer].data_ptr()],
            workspace.data_ptr(),
            torch.cuda.current_stream().cuda_stream,
        )

    # the output is linear in the down projections and their biases: scale them so each layer keeps the RMS
    with torch.cuda.stream(stream):
        hidden = x0
        for layer in range(layers):
            enqueue(layer, hidden)
            torch.cuda.synchronize()
            factor = hidden.float().pow(2).mean().sqrt() / outs[layer].float().pow(2).mean().sqrt()
            if not bool(torch.isfinite(factor)) or float(factor) <= 0:
                raise SystemExit(
                    f"layer_chain: {name} T = {tokens}: layer {layer}'s output is zero or not finite"
                )
            for (
                projection
            ) in DOWN_PROJECTIONS:  # quantized: scaled before quantizing (mxfp4's scales are 2^k)
                if projection in native[layer]:
                    native[layer][projection].mul_(factor.to(native[layer][projection].dtype))
            weights[layer] = gpu_quantized_experts(native[layer], attrs)
            enqueue(layer, hidden)  # the scaled layer's output is the next layer's calibration input
            hidden = outs[layer]

    def chain(count: int) -> None:
        hidden = x0
        for layer in range(count):
            enqueue(layer, hidden)
            hidden = outs[layer]

    with torch.cuda.stream(stream):
        chain(layers)  # the first launch on a stream must not be under capture (per-stream state)
        torch.cuda.synchronize()
        expected = [o.clone() for o in outs]
        graphs = {}
        for count in (1, layers):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                chain(count)
            graphs[count] = graph
        for o in outs:
            o.fill_(float("nan"))
        graphs[layers].replay()
        torch.cuda.synchronize()
    # layer 0 has the same input in both runs; later layers inherit any last-bit difference of the layers before
    # (the fused decode kernel's float atomics), which a routing near-tie can turn into another expert choice
    errs = [relative_error(o.float(), e.float()) for o, e in zip(outs, expected, strict=True)]
    flush = L2Flusher(device)
    rows = []
    for count, graph in graphs.items():
        for _ in range(3):
            graph.replay()
        timing = time_calls([graph.replay], device, repeats, flush)
        rows.append(
            {
                "shape": name,
                "format": fmt,
                "T": tokens,
                "layers": count,
                "us_per_layer": round(timing.median_us / count, 2),
                "us_median": round(timing.median_us, 2),
                "rel_err_first_layer": errs[0],
                "rel_err_last_layer": errs[-1],
                "ok": bool(errs[0] <= tolerance("bf16") and all(math.isfinite(e) for e in errs)),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_next,qwen3_30b")
    p.add_argument("--tokens", default="1,8")
    p.add_argument(
        "--format",
        default="native",
        help=f"the routed experts' format, one of {', '.join(FORMAT_ENTRIES)} (quantized round to nearest)",
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument(
        "--bundle", action="append", default=[], help="SHAPE=PATH of a bundle compiled ahead of time"
    )
    p.add_argument("--out", type=Path, default=None, help="a .jsonl file for the rows")
    a = p.parse_args()
    if a.format not in FORMAT_ENTRIES:
        print(f"layer_chain: --format {a.format}: choose from {', '.join(FORMAT_ENTRIES)}", file=sys.stderr)
        return 2
    if a.layers < 2:
        print(
            f"layer_chain: --layers {a.layers}: give 2 or more (one layer is what the other benches time)",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print("layer_chain: needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    paths = dict(item.split("=", 1) for item in a.bundle)
    major, minor = torch.cuda.get_device_capability()
    rows: list[dict] = []
    for name in a.shapes.split(","):
        if name in paths:
            bundle = KernelBundle.from_bytes(Path(paths[name]).read_bytes())
        else:
            attrs = with_weight_format(PRESETS[name], a.format)
            bundle = compile_kernels(attrs, "bfloat16", major * 10 + minor, workers=os.cpu_count() or 1)
        for tokens in (int(t) for t in a.tokens.split(",")):
            for row in chain_rows(name, a.format, tokens, a.layers, bundle, a.repeats):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.out:
        a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
