#!/usr/bin/env python3
"""Launch cost of one MoE layer at small T: the native launcher called from Python (ctypes, no graph) against
the same launches replayed from a CUDA graph, on a real-width shape. Back-to-back calls, L2 not flushed (the
question is the host's share). The C++ plugin's own loop is timed by tests/gpu/test_native_plugin.py.

    PYTHONPATH=src python3 bench/launch_latency.py --shapes qwen3_next,qwen3_30b --tokens 1,8 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from moetrt.kernels.aot import compile_kernels
from moetrt.kernels.launcher import MoELauncher
from moetrt.op.presets import PRESETS
from moetrt.tune.gpu_workload import gpu_random_inputs


def per_call_us(run, iterations: int) -> tuple[float, float]:
    """(GPU µs per call from events, host µs per call) over `iterations` back-to-back calls."""
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host0 = time.perf_counter()
    start.record()
    for _ in range(iterations):
        run()
    stop.record()
    host1 = time.perf_counter()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / iterations, (host1 - host0) * 1e6 / iterations


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen3_next,qwen3_30b")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    major, minor = torch.cuda.get_device_capability()
    rows = []
    for shape in args.shapes.split(","):
        attrs = PRESETS[shape]
        bundle = compile_kernels(attrs, "bfloat16", major * 10 + minor, workers=min(16, os.cpu_count() or 1))
        launcher = MoELauncher(bundle, attrs)
        for t in map(int, args.tokens.split(",")):
            inputs = gpu_random_inputs(attrs, t, torch.bfloat16, seed=t)
            out = torch.empty(t, attrs.hidden_size, dtype=torch.bfloat16, device="cuda")
            workspace = torch.empty(launcher.workspace_size(t), dtype=torch.uint8, device="cuda")
            in_ptrs = [inputs[n].data_ptr() for n in attrs.present_inputs()]
            stream = torch.cuda.Stream()

            def enqueue(
                stream=stream, in_ptrs=in_ptrs, out=out, workspace=workspace, t=t, launcher=launcher
            ) -> None:
                launcher.enqueue(t, in_ptrs, [out.data_ptr()], workspace.data_ptr(), stream.cuda_stream)

            with torch.cuda.stream(stream):
                native_gpu, native_host = per_call_us(enqueue, args.iterations)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    enqueue(stream=torch.cuda.current_stream())
                graph_gpu, graph_host = per_call_us(graph.replay, args.iterations)
            row = {
                "shape": shape,
                "tokens": t,
                "native_from_python_us": round(native_gpu, 2),
                "native_host_us_per_call": round(native_host, 2),
                "graph_replay_us": round(graph_gpu, 2),
                "graph_host_us_per_call": round(graph_host, 2),
                "native_over_graph": round(native_gpu / graph_gpu, 3),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
