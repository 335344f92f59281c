"""Where a decode step's time goes: each small-T path of the fused MoE, whole and per kernel, on a GPU.

For every shape and token count: the config the table picks, the same with the expert-group (gemv)
path switched on or off, each checked against the float32 reference, timed whole (CUDA-graph replay, L2
flushed) and per kernel (tune.tuner.profile_stages). Run it under Nsight Compute with `--once` to get
each kernel's duration and DRAM bytes without launch gaps:

    PYTHONPATH=src python3 bench/decode_probe.py --shapes qwen3_next --tokens 1,8 [--out results.json]
    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum \\
        python3 bench/decode_probe.py --shapes qwen3_next --tokens 1 --once
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from moetrt.core.devices import current_sm
from moetrt.core.tolerances import relative_error
from moetrt.kernels import aot, configs, plan
from moetrt.kernels.torch_ops import moe_forward
from moetrt.op.presets import PRESETS
from moetrt.tune.gpu_workload import gpu_random_inputs, gpu_reference
from moetrt.tune.timing import time_graph
from moetrt.tune.tuner import profile_stages


def path_configs(attrs, dtype: str, sm: int, bound: int) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """The table's config, and the same with the sorted path, and with the gemv path (PDL off and on)."""
    table = configs.select_config(attrs, dtype, sm, bound)
    out = {"table": table}
    for name, gemv, pdl in (("sorted", 0, None), ("gemv pdl=0", 1, 0), ("gemv pdl=1", 1, 1)):
        cfg = copy.deepcopy(table)
        cfg["gemv"]["enabled"] = gemv
        if pdl is not None:
            cfg["pdl"]["enabled"] = pdl
        out[name] = cfg
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen3_next,qwen3_30b")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--once", action="store_true", help="run each path once (for a profiler), no timing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sm = current_sm()
    rows = []
    for shape in args.shapes.split(","):
        attrs = PRESETS[shape]
        weights = gpu_random_inputs(attrs, 1, torch.bfloat16, seed=1)
        for t in map(int, args.tokens.split(",")):
            bound = plan.bucket_of(t)
            inputs = dict(weights)
            inputs.update(gpu_random_inputs(attrs, t, torch.bfloat16, seed=100 + t, names=["hidden_states"]))
            ref = gpu_reference(inputs, attrs).output
            for name, cfg in path_configs(attrs, "bfloat16", sm, bound).items():
                bundle = aot.compile_kernels(
                    attrs, "bfloat16", sm, buckets=(bound,), configs={bound: cfg}, workers=8
                )
                torch.cuda.nvtx.range_push(f"{shape} T={t} {name}")
                out = moe_forward(inputs, attrs, bundle)["output"]
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
                rel = relative_error(out, ref)
                row = {"shape": shape, "T": t, "path": name, "rel_err": rel, "gemv": plan.is_gemv(cfg, bound)}
                if not args.once:
                    row["us_median"] = time_graph(
                        lambda b=bundle, i=inputs, a=attrs: moe_forward(i, a, b), repeats=30
                    ).median_us
                    row["stages_us"] = profile_stages(bundle, attrs, inputs)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
