#!/usr/bin/env python3
"""Parity and timing of moetrt's fused MoE through the CUDA-driver launcher (AOT cubins) on a GPU.

Every BENCH.md shape and token count, random and skewed routing, T = 0 and T = 1, against a float32 PyTorch
reference of the same block (the oracle's own routing and activation functions, upcast one expert at a time
so the largest shapes fit). Timings: CUDA-graph replay of the launcher path, L2 flushed before each run.

    PYTHONPATH=src python3 bench/gpu_parity.py --out OUTDIR [--bundle qwen3_next=path/to/bundle.bin]

Writes OUTDIR/parity.log and OUTDIR/gpu_parity.json; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from moetrt.core.devices import sm_from_capability
from moetrt.core.dtypes import precision
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.kernels.aot import KernelBundle, compile_kernels
from moetrt.kernels.plan import bucket_name, bucket_of
from moetrt.kernels.torch_ops import moe_forward
from moetrt.op.presets import PRESETS
from moetrt.op.spec import MoEAttributes
from moetrt.tune import floors, timing
from moetrt.tune.gpu_workload import gpu_random_inputs, gpu_reference

SHAPES = PRESETS  # the BENCH.md shapes
TOKENS = (0, 1, 2, 8, 64, 512, 4096)
SKEWED_TOKENS = (8, 4096)
EXTRA_DTYPES = {"float16": ("qwen3_next", "gpt_oss_20b"), "float32": ("qwen3_next", "gpt_oss_20b")}
EXTRA_TOKENS = (1, 64, 512)


def gpu_inputs(
    attrs: MoEAttributes, weights: dict, num_tokens: int, dtype: torch.dtype, seed: int, skew: float
) -> dict[str, torch.Tensor]:
    """Hidden states (and, for skew, a router biased towards a few hot experts) over shared weights.

    Same skew construction as reference.random_inputs, drawn on the GPU (the largest shapes
    have billions of weights).
    """
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = attrs.hidden_size
    hidden = torch.randn(num_tokens, h, generator=gen, device="cuda")
    inputs = dict(weights)
    if skew > 0:
        hot = torch.arange(min(attrs.top_k + 2, attrs.num_experts), device="cuda")
        direction = torch.randn(h, generator=gen, device="cuda")
        direction = direction / direction.norm()
        router = weights["router_weight"].float().clone()
        router[hot] += skew * direction
        inputs["router_weight"] = router.to(dtype)
        hidden = hidden + 3.0 * direction
    inputs["hidden_states"] = hidden.to(dtype)
    return inputs


def bounds(bundle: KernelBundle) -> tuple[int | None, ...]:
    return tuple(b["bound"] for b in bundle.buckets.values())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument(
        "--bundle",
        action="append",
        default=[],
        help="SHAPE=PATH: use this precompiled bf16 bundle (e.g. compiled on a CPU machine)",
    )
    parser.add_argument("--no-extra-dtypes", action="store_true")
    parser.add_argument("--save-bundles", type=Path, help="write each compiled bf16 bundle as DIR/SHAPE.bin")
    parser.add_argument("--profile", action="store_true", help="also print each kernel's GPU time per row")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "parity.log", "w")  # noqa: SIM115 (open for the whole run, closed at exit)

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    import triton

    props = torch.cuda.get_device_properties(0)
    sm = sm_from_capability(props.major, props.minor)
    say(
        f"device: {props.name} sm_{sm} · torch {torch.__version__} · triton {triton.__version__} · "
        f"command: {' '.join(sys.argv)}"
    )
    device = torch.device("cuda")
    copy_gbps = timing.copy_bandwidth_gbps(device, 4 << 30, repeats=12)
    tflops = timing.gemm_tflops(device, torch.bfloat16, 8192, repeats=12)
    say(f"ceilings: copy {copy_gbps:.0f} GB/s (read + write), bf16 GEMM {tflops:.0f} TFLOP/s")
    carried = dict(item.split("=", 1) for item in args.bundle)
    tokens = [int(t) for t in args.tokens.split(",")]
    plan_rows = [(shape, "bfloat16", tokens) for shape in args.shapes.split(",")]
    if not args.no_extra_dtypes:
        for dtype, shapes in EXTRA_DTYPES.items():
            plan_rows += [(shape, dtype, list(EXTRA_TOKENS)) for shape in shapes if shape in args.shapes]
    rows = []
    failures = 0
    for shape, dtype_name, shape_tokens in plan_rows:
        attrs = SHAPES[shape]
        dtype = precision(dtype_name).torch
        try:
            start = time.time()
            if shape in carried and dtype_name == "bfloat16":
                bundle = KernelBundle.from_bytes(Path(carried[shape]).read_bytes())
                origin = f"carried ({bundle.triton_version}, compiled off-device)"
            else:
                bundle = compile_kernels(attrs, dtype_name, sm, workers=16)
                origin = f"compiled here ({bundle.triton_version})"
                if args.save_bundles and dtype_name == "bfloat16":
                    args.save_bundles.mkdir(parents=True, exist_ok=True)
                    (args.save_bundles / f"{shape}.bin").write_bytes(bundle.to_bytes())
            say(
                f"[{shape} {dtype_name}] bundle {origin}: {len(bundle.kernels)} cubins, {time.time() - start:.1f}s"
            )
            weights = gpu_random_inputs(
                attrs, 1, dtype, seed=1, names=[n for n in attrs.present_inputs() if n != "hidden_states"]
            )
        except Exception as err:  # keep going: one broken shape must not hide the others
            failures += 1
            say(f"[{shape} {dtype_name}] SETUP FAILED: {err!r}")
            traceback.print_exc()
            continue
        cases = [(t, "random") for t in shape_tokens]
        if dtype_name == "bfloat16":
            cases += [(t, "skewed") for t in SKEWED_TOKENS if t in shape_tokens]
        for t, routing in cases:
            row = {"shape": shape, "dtype": dtype_name, "T": t, "routing": routing, "impl": "moetrt_launcher"}
            try:
                inputs = gpu_inputs(
                    attrs, weights, t, dtype, seed=100 + t, skew=8.0 if routing == "skewed" else 0
                )
                out = {"output": torch.full((t, attrs.hidden_size), float("nan"), dtype=dtype, device="cuda")}
                moe_forward(inputs, attrs, bundle, outputs=out)
                torch.cuda.synchronize()
                got = out["output"].float()
                expected = gpu_reference(inputs, attrs)
                ref, distinct = expected.output, expected.distinct_experts
                if t == 0:
                    rel = 0.0 if got.numel() == 0 else float("nan")
                else:
                    rel = relative_error(got, ref)
                nan = bool(torch.isnan(got).any())
                # the same inputs again, output re-poisoned: a race shows up as a changed result
                again = {"output": torch.full_like(out["output"], float("nan"))}
                moe_forward(inputs, attrs, bundle, outputs=again)
                torch.cuda.synchronize()
                repeat_equal = bool(torch.equal(again["output"], out["output"]))
                # the fused decode kernel sums with float atomics: its last bits may differ from run to run,
                # so there the repeat must be as accurate, not bitwise equal
                fused = (
                    t > 0
                    and "experts" in bundle.buckets[bucket_name(bucket_of(t, bounds(bundle)))]["variants"]
                )
                if fused:
                    rel_again = relative_error(again["output"].float(), ref)
                    repeat_ok = rel_again <= tolerance(dtype_name) and not bool(
                        torch.isnan(again["output"]).any()
                    )
                else:
                    repeat_ok = repeat_equal
                ok = (not nan) and rel <= tolerance(dtype_name) and repeat_ok
                row.update(
                    {
                        "rel_err": rel,
                        "nan": nan,
                        "decode_path": "fused" if fused else "deterministic",
                        "repeat_bitwise_equal": repeat_equal,
                        "ok": ok,
                        "distinct_experts": distinct,
                    }
                )
                if t > 0:
                    times = timing.time_graph(
                        lambda inputs=inputs, attrs=attrs, bundle=bundle: moe_forward(inputs, attrs, bundle),
                        args.iters,
                    )
                    nbytes = floors.moe_bytes(attrs, t, distinct, dtype.itemsize)
                    floor = floors.floor_us(nbytes, floors.moe_flops(attrs, t), copy_gbps, tflops)
                    med = times.median_us
                    row.update(
                        {
                            "us_median": med,
                            "us_min": times.min_us,
                            "us_max": times.max_us,
                            "floor_us": floor,
                            "pct_of_floor": floor / med,
                            "timing": "cuda-graph replay, L2 flushed",
                        }
                    )
                if args.profile and t > 0 and routing == "random":
                    from moetrt.tune.tuner import profile_stages

                    stages = profile_stages(bundle, attrs, inputs)
                    row["stages_us"] = {k: round(v, 2) for k, v in stages.items()}
                failures += not ok
                say(json.dumps(row))
            except Exception as err:
                failures += 1
                row.update({"ok": False, "error": repr(err)})
                say(json.dumps(row))
                traceback.print_exc()
            rows.append(row)
        del weights
        torch.cuda.empty_cache()

    result = {
        "device": props.name,
        "sm": sm,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "copy_GBps": copy_gbps,
        "gemm_TFLOPs": tflops,
        "rows": rows,
    }
    (args.out / "gpu_parity.json").write_text(json.dumps(result, indent=1))
    say("")
    say(
        f"{'shape':12} {'dtype':9} {'T':>5} {'routing':7} {'rel_err':>9} {'ok':>3} {'us_med':>9} {'floor':>8} "
        f"{'%floor':>6} {'experts':>7}"
    )
    for r in rows:
        say(
            f"{r['shape']:12} {r['dtype']:9} {r['T']:>5} {r['routing']:7} {r.get('rel_err', float('nan')):9.2e} "
            f"{'yes' if r.get('ok') else 'NO':>3} {r.get('us_median', float('nan')):9.1f} "
            f"{r.get('floor_us', float('nan')):8.1f} {100 * r.get('pct_of_floor', float('nan')):6.1f} "
            f"{r.get('distinct_experts', 0):>7}"
        )
    say(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
