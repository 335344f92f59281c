"""The routed decode path (one launch after the router) against the config the table picks, on a GPU.

For every shape, weight format and token count: the table's config and each routed-path candidate
(`configs.routed_candidates`, PDL on), compiled in parallel, each checked against the float32 oracle on the
same (dequantized) weights and timed whole (CUDA-graph replay, L2 flushed). One JSON row per config:

    PYTHONPATH=src python3 bench/routed_probe.py --shapes qwen3_next --formats native,int4 --tokens 1,8 \\
        --out rows.jsonl
    PICK=8 ONCE=1 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum \\
        python3 bench/routed_probe.py --shapes qwen3_next --formats native --tokens 1

PICK: candidate indices to keep (comma-separated); ONCE: run each config once, no timing (for a profiler).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from workloads import with_weight_format

from moetrt.core.devices import current_sm
from moetrt.core.tolerances import relative_error
from moetrt.kernels import aot, configs, plan
from moetrt.kernels.torch_ops import moe_forward
from moetrt.op.presets import PRESETS
from moetrt.tune.gpu_workload import gpu_quantized_inputs, gpu_random_inputs, gpu_reference
from moetrt.tune.timing import time_graph


def candidates(attrs, bound: int, sm: int) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    """("table", the table's config), then ("routed<i> <tiles>", routed candidate i with PDL on)."""
    table = configs.select_config(attrs, "bfloat16", sm, bound)
    base = copy.deepcopy(table)
    base["pdl"]["enabled"] = 1
    pick = {int(x) for x in os.environ.get("PICK", "").split(",") if x}
    out = [("table", table)]
    for i, cfg in enumerate(configs.routed_candidates(attrs, base, "bfloat16")):
        if not pick or i in pick:
            out.append((f"routed{i} " + json.dumps(cfg["routed"], sort_keys=True), cfg))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen3_next,qwen3_30b")
    parser.add_argument("--formats", default="native,fp8_block,int4")
    parser.add_argument("--tokens", default="1,2,8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sm = current_sm()
    once = bool(os.environ.get("ONCE"))
    for shape in args.shapes.split(","):
        for fmt in args.formats.split(","):
            attrs = with_weight_format(PRESETS[shape], fmt)
            native = attrs.with_native_weights()
            weights, oracle_weights = gpu_quantized_inputs(
                gpu_random_inputs(native, 1, torch.bfloat16, seed=1), attrs
            )
            jobs = [(t, plan.bucket_of(t)) for t in map(int, args.tokens.split(","))]
            variants = [
                v
                for _, bound in jobs
                for _, cfg in candidates(attrs, bound, sm)
                for v in plan.bucket_variants(attrs, "bfloat16", bound, cfg).values()
            ]
            start = time.time()
            cache, failed = aot.compile_variants(variants, "bfloat16", sm, workers=16)
            if failed:
                raise next(iter(failed.values()))
            print(
                f"# {shape} {fmt}: compiled {len(cache)} variants in {time.time() - start:.0f} s", flush=True
            )
            for t, bound in jobs:
                hidden = gpu_random_inputs(native, t, torch.bfloat16, seed=100 + t, names=["hidden_states"])
                inputs, oracle = {**weights, **hidden}, {**oracle_weights, **hidden}
                ref = gpu_reference(oracle, native, attrs.fp8_activation_block).output
                for name, cfg in candidates(attrs, bound, sm):
                    bundle = aot.compile_kernels(
                        attrs, "bfloat16", sm, buckets=(bound,), configs={bound: cfg}, cache=cache
                    )
                    poisoned = torch.full(
                        (t, attrs.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda"
                    )
                    moe_forward(inputs, attrs, bundle, outputs={"output": poisoned})
                    row = {
                        "shape": shape,
                        "format": fmt,
                        "T": t,
                        "config": name,
                        "path": plan.decode_path(cfg, bound),
                        "rel_err": relative_error(poisoned, ref),
                    }
                    if not once:
                        call = lambda b=bundle, i=inputs, a=attrs: moe_forward(i, a, b)  # noqa: E731
                        row["us_median"] = round(time_graph(call, repeats=30).median_us, 2)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
