#!/usr/bin/env python3
"""Quantized experts on a GPU at real width: each weight format against bf16 in one run, every row checked.

For each shape, random bf16 weights are drawn once; each format quantizes the routed experts (round to nearest,
`op.quant.quantize`, on the GPU) and runs them through the launcher (dequantized in the GEMM loops). A row is
checked against the float32 oracle on the same dequantized weights (bf16 tolerance) and timed by CUDA-graph
replay with L2 flushed; its floor counts the bytes the format stores (`tune.floors`). "fp8_block+a8": fp8
weights and fp8 activations (the oracle quantizes the experts' inputs alike).

    PYTHONPATH=src python3 bench/quantized_bench.py --out OUT.jsonl [--shapes qwen3_next,qwen3_30b]
        [--tokens 1,8,64,4096] [--formats native,fp8_block,int4,mxfp4,fp8_block+a8]
Prints one JSON line per row (also appended to OUT) and a table last. `--once` runs each row once, unchecked
and untimed, for a profiler (the device's copy and GEMM measurements are skipped too):

    ncu --set full -k regex:gate_up_kernel -c 1 python3 bench/quantized_bench.py --once --out /dev/null \
        --shapes qwen3_next --tokens 1 --formats fp8_block

`--patches` adds rows of other configs beside the table's: each patch ({stage: {key: value}}) applied to the
table's config of every row's bucket (rows labelled patch0, patch1, ...; a patch the plan refuses for a format
is a skipped row with the reason). `--bundles DIR` keeps the compiled bundles, so they can be compiled on a
CPU machine first (`--compile-only --sm 90`) for a short GPU call; they are found again by shape, format,
label and SM, so other patches need another folder:

    PYTHONPATH=src python3 bench/quantized_bench.py --out /dev/null --tokens 1,8 --bundles /tmp/qb \
        --patches '[{"gate_up": {"BN": 64, "SK": 2}}, {"down": {"BH": 64}}]' --compile-only --sm 90
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from workloads import with_weight_format

from moetrt.core.devices import sm_from_capability
from moetrt.core.errors import MoetrtError
from moetrt.core.files import write_bytes_atomic
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.kernels.aot import CompiledKernel, KernelBundle, compile_kernels
from moetrt.kernels.configs import select_config
from moetrt.kernels.plan import bucket_name, bucket_of
from moetrt.kernels.torch_ops import moe_forward
from moetrt.op.presets import PRESETS
from moetrt.op.spec import NATIVE, WEIGHT_FORMATS
from moetrt.tune import floors, timing
from moetrt.tune.gpu_workload import gpu_quantized_inputs, gpu_random_inputs, gpu_reference
from moetrt.tune.tuner import profile_stages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="qwen3_next,qwen3_30b")
    parser.add_argument("--tokens", default="1,8,64,4096")
    parser.add_argument("--formats", default=",".join(WEIGHT_FORMATS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also each kernel's µs (tune.profile_stages)")
    parser.add_argument(
        "--once", action="store_true", help="run each row once, for a profiler: no check, no timing"
    )
    parser.add_argument("--patches", default="[]", help="a JSON list of {stage: {key: value}} (see above)")
    parser.add_argument("--bundles", type=Path, default=None, help="folder that keeps the compiled bundles")
    parser.add_argument("--compile-only", action="store_true", help="compile the bundles and stop (no GPU)")
    parser.add_argument("--sm", type=int, default=None, help="the target SM (default: the GPU's)")
    args = parser.parse_args()
    if args.sm is not None:
        sm = args.sm
    else:
        sm = sm_from_capability(*torch.cuda.get_device_capability())
    if args.compile_only:
        for shape in args.shapes.split(","):
            for fmt in args.formats.split(","):
                for label, bundle in _bundles(args, sm, shape, fmt):
                    print(
                        f"{shape} {fmt} {label}: {bundle if isinstance(bundle, str) else 'compiled'}",
                        flush=True,
                    )
        return
    device = torch.device("cuda")
    if args.once:
        _run_once(args, sm)
        return
    copy_gbps = timing.copy_bandwidth_gbps(device, 4 << 30, repeats=12)
    tflops = timing.gemm_tflops(device, torch.bfloat16, 8192, repeats=12)
    print(
        f"device {torch.cuda.get_device_name()} sm_{sm}; copy {copy_gbps:.0f} GB/s, bf16 {tflops:.0f} TFLOP/s"
    )
    rows = []
    for shape, fmt, label, attrs, bundle, t, inputs, oracle in _workloads(args, sm):
        if isinstance(bundle, str):  # a patch the plan refuses for this format
            row = {"shape": shape, "format": fmt, "config": label, "T": t, "skipped": bundle}
            print(json.dumps(row), flush=True)
            del inputs, oracle
            continue
        got = moe_forward(inputs, attrs, bundle)["output"].float()
        expected = gpu_reference(oracle, attrs.with_native_weights(), attrs.fp8_activation_block)
        rel = relative_error(got, expected.output)
        # an untimed pass first: a call timed right after its input was made and the float32 oracle ran was
        # 10-14 µs slow at T = 8 (bench/results/2026-12-04-h200-sums-and-timing-order, step 5)
        timing.time_graph(lambda i=inputs, a=attrs, b=bundle: moe_forward(i, a, b), args.iters)
        times = timing.time_graph(lambda i=inputs, a=attrs, b=bundle: moe_forward(i, a, b), args.iters)
        nbytes = floors.moe_bytes(attrs, t, expected.distinct_experts, 2)
        floor = floors.floor_us(nbytes, floors.moe_flops(attrs, t), copy_gbps, tflops)
        row = {
            "shape": shape,
            "format": fmt,
            "config": label,
            "T": t,
            "rel_err": rel,
            "ok": rel <= tolerance("bf16") and not bool(torch.isnan(got).any()),
            "us_median": round(times.median_us, 2),
            "floor_us": round(floor, 2),
            "pct_of_floor": round(100 * floor / times.median_us, 1),
            "distinct_experts": expected.distinct_experts,
            "tiles": {
                stage: bundle.buckets[bucket_name(bucket_of(t))]["config"][stage]
                for stage in ("gate_up", "down", "fused")
            },
        }
        if args.profile:
            row["stages_us"] = {k: round(v, 2) for k, v in profile_stages(bundle, attrs, inputs).items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        # the generator makes the next format's weights while these names still hold this one's
        del inputs, oracle, got, expected
    native = {
        (r["shape"], r["T"]): r["us_median"] for r in rows if r["format"] == NATIVE and r["config"] == "table"
    }
    print(
        f"{'shape':12} {'format':10} {'config':8} {'T':>5} {'rel err':>9} {'us':>9} {'floor':>8} {'% floor':>8} "
        f"{'vs bf16':>8}"
    )
    for r in rows:
        speedup = native.get((r["shape"], r["T"]), float("nan")) / r["us_median"]
        print(
            f"{r['shape']:12} {r['format']:10} {r['config']:8} {r['T']:>5} {r['rel_err']:>9.2e} "
            f"{r['us_median']:>9.1f} {r['floor_us']:>8.1f} {r['pct_of_floor']:>8.1f} {speedup:>7.2f}x"
        )
    print(f"failures: {sum(not r['ok'] for r in rows)}")


_COMPILED: dict[str, CompiledKernel] = {}  # variants the bundles share (router, top-k, unpatched stages)


def _bundles(args: argparse.Namespace, sm: int, shape: str, fmt: str) -> list[tuple[str, KernelBundle | str]]:
    """("table", the tuned bundle) and ("patchN", the bundle of the table's config with patch N applied, or
    why the plan refuses it) for one shape and format, the buckets of --tokens only; kept in --bundles."""
    attrs = with_weight_format(PRESETS[shape], fmt)
    bounds = tuple(dict.fromkeys(bucket_of(t) for t in map(int, args.tokens.split(","))))
    workers = min(16, os.cpu_count() or 1)
    out: list[tuple[str, KernelBundle | str]] = []
    for i, patch in enumerate([None, *json.loads(args.patches)]):
        label = "table" if patch is None else f"patch{i - 1}"
        path = args.bundles / f"{shape}_{fmt}_{label}_sm{sm}.bin" if args.bundles else None
        if path is not None and path.exists():
            out.append((label, KernelBundle.from_bytes(path.read_bytes())))
            continue
        configs = {}
        for bound in bounds:
            cfg = select_config(attrs, "bfloat16", sm, bound)
            for stage, values in (patch or {}).items():
                cfg[stage] = {**copy.deepcopy(cfg[stage]), **values}
            configs[bound] = cfg
        try:
            bundle = compile_kernels(
                attrs, "bfloat16", sm, buckets=bounds, configs=configs, workers=workers, cache=_COMPILED
            )
        except (ValueError, MoetrtError) as err:  # the plan or the AOT step refuses the patched config
            out.append((label, str(err)))
            continue
        if path is not None:
            write_bytes_atomic(path, bundle.to_bytes())
        out.append((label, bundle))
    return out


def _workloads(args: argparse.Namespace, sm: int):  # type: ignore[no-untyped-def]
    """(shape, format, config label, attrs, bundle, T, inputs, oracle inputs) of every row: bf16 weights drawn
    once per shape, quantized per format (the oracle's inputs: the same weights dequantized), hidden states
    per T; the table's config and each patch (`_bundles`)."""
    for shape in args.shapes.split(","):
        base = PRESETS[shape]
        weights = gpu_random_inputs(
            base, 1, torch.bfloat16, seed=1, names=[n for n in base.present_inputs() if n != "hidden_states"]
        )
        for fmt in args.formats.split(","):
            attrs = with_weight_format(base, fmt)
            bundles = _bundles(args, sm, shape, fmt)
            inputs, oracle = gpu_quantized_inputs(weights, attrs)
            for t in map(int, args.tokens.split(",")):
                hidden = gpu_random_inputs(base, t, torch.bfloat16, seed=100 + t, names=["hidden_states"])
                inputs["hidden_states"] = oracle["hidden_states"] = hidden["hidden_states"]
                for label, bundle in bundles:
                    yield shape, fmt, label, attrs, bundle, t, inputs, oracle
            del inputs, oracle
            torch.cuda.empty_cache()


def _run_once(args: argparse.Namespace, sm: int) -> None:
    for shape, fmt, label, attrs, bundle, t, inputs, _oracle in _workloads(args, sm):
        if isinstance(bundle, str):
            continue
        moe_forward(inputs, attrs, bundle)
        torch.cuda.synchronize()
        print(json.dumps({"shape": shape, "format": fmt, "config": label, "T": t, "ran": True}), flush=True)


if __name__ == "__main__":
    main()
