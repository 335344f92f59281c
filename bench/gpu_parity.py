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
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from moetrt.plugins.moe.aot import KernelBundle, compile_kernels
from moetrt.plugins.moe.kernels.plan import bucket_name, bucket_of
from moetrt.plugins.moe.reference import glu_activation, route, shared_expert
from moetrt.plugins.moe.spec import MoEAttributes
from moetrt.plugins.moe.torch_ops import moe_forward
from moetrt.plugins.moe.tuning import PRESETS

SHAPES = PRESETS  # the BENCH.md shapes
TOKENS = (0, 1, 2, 8, 64, 512, 4096)
SKEWED_TOKENS = (8, 4096)
EXTRA_DTYPES = {"float16": ("qwen3_next", "gpt_oss_20b"), "float32": ("qwen3_next", "gpt_oss_20b")}
EXTRA_TOKENS = (1, 64, 512)
TOL = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 1e-5}
TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def gpu_inputs(
    attrs: MoEAttributes, weights: dict, num_tokens: int, dtype: torch.dtype, seed: int, skew: float
) -> dict[str, torch.Tensor]:
    """Hidden states (and, for skew, a router biased towards a few hot experts) over shared weights.

    Same scales and skew construction as reference.random_inputs, drawn on the GPU (the largest shapes
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


def gpu_weights(attrs: MoEAttributes, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h, i, s = attrs.hidden_size, attrs.intermediate_size, attrs.shared_intermediate_size
    scales = {
        "router_weight": h**-0.5,
        "router_bias": 0.1,
        "score_correction_bias": 0.05,
        "expert_gate_up_weight": h**-0.5,
        "expert_gate_up_bias": 0.1,
        "expert_down_weight": max(i, 1) ** -0.5,
        "expert_down_bias": 0.1,
        "shared_gate_up_weight": h**-0.5,
        "shared_down_weight": max(s, 1) ** -0.5,
        "shared_gate_weight": h**-0.5,
    }
    out = {}
    for name, shape in attrs.input_shapes(1).items():
        if name == "hidden_states":
            continue
        t = torch.empty(shape, dtype=dtype, device="cuda")
        # draw in chunks: a float32 copy of the largest tensors would not fit beside them
        flat = t.view(-1)
        for lo in range(0, flat.numel(), 1 << 28):
            hi = min(flat.numel(), lo + (1 << 28))
            flat[lo:hi] = (torch.randn(hi - lo, generator=gen, device="cuda") * scales[name]).to(dtype)
        out[name] = t
    return out


@torch.no_grad()
def reference(inputs: dict[str, torch.Tensor], attrs: MoEAttributes) -> tuple[torch.Tensor, int]:
    """float32 output of the block and the number of distinct routed experts hit."""
    x = inputs["hidden_states"].float()
    bias = inputs.get("router_bias")
    logits = F.linear(x, inputs["router_weight"].float(), None if bias is None else bias.float())
    scb = inputs.get("score_correction_bias")
    weights, ids = route(logits, attrs, None if scb is None else scb.float())
    out = torch.zeros_like(x)
    experts = torch.unique(ids).tolist()
    for e in experts:
        token_idx, slot = torch.where(ids == e)
        gu_b = inputs["expert_gate_up_bias"][e].float() if attrs.has_expert_bias else None
        d_b = inputs["expert_down_bias"][e].float() if attrs.has_expert_bias else None
        gate_up = F.linear(x[token_idx], inputs["expert_gate_up_weight"][e].float(), gu_b)
        y = F.linear(glu_activation(gate_up, attrs), inputs["expert_down_weight"][e].float(), d_b)
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    if attrs.has_shared_expert:
        gate_w = inputs["shared_gate_weight"].float() if attrs.has_shared_gate else None
        out += shared_expert(
            x, inputs["shared_gate_up_weight"].float(), inputs["shared_down_weight"].float(), gate_w
        )
    return out, len(experts)


def bounds(bundle: KernelBundle) -> tuple[int | None, ...]:
    return tuple(b["bound"] for b in bundle.buckets.values())


def measure_ceilings() -> tuple[float, float]:
    n = 1 << 30  # 2 GiB bf16 read + 2 GiB written
    src = torch.randn(n // 2, device="cuda").to(torch.bfloat16).repeat(2)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    copy_gbps = 2 * src.numel() * 2 / statistics.median(times[2:]) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(12):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    tflops = 2 * 8192**3 / statistics.median(times[2:]) / 1e12
    return copy_gbps, tflops


def time_graph(fn, flush: torch.Tensor, iters: int) -> list[float]:
    """µs per CUDA-graph replay of fn, L2 flushed (by writing `flush`) before each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    events = []
    for _ in range(iters):
        flush.zero_()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        events.append((e0, e1))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e3 for a, b in events]


def floors(attrs: MoEAttributes, t: int, distinct: int, esize: int, copy_gbps: float, tflops: float) -> float:
    h, i, s, e = attrs.hidden_size, attrs.intermediate_size, attrs.shared_intermediate_size, attrs.num_experts
    nbytes = (distinct * 3 * h * i + 3 * h * s + h * e + 2 * t * h) * esize
    flops = 2 * t * (attrs.top_k * 3 * h * i + 3 * h * s + e * h)
    return max(nbytes / (copy_gbps * 1e3), flops / (tflops * 1e6))


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
    sm = props.major * 10 + props.minor
    say(
        f"device: {props.name} sm_{sm} · torch {torch.__version__} · triton {triton.__version__} · "
        f"command: {' '.join(sys.argv)}"
    )
    copy_gbps, tflops = measure_ceilings()
    say(f"ceilings: copy {copy_gbps:.0f} GB/s (read + write), bf16 GEMM {tflops:.0f} TFLOP/s")
    carried = dict(item.split("=", 1) for item in args.bundle)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    tokens = [int(t) for t in args.tokens.split(",")]
    plan_rows = [(shape, "bfloat16", tokens) for shape in args.shapes.split(",")]
    if not args.no_extra_dtypes:
        for dtype, shapes in EXTRA_DTYPES.items():
            plan_rows += [(shape, dtype, list(EXTRA_TOKENS)) for shape in shapes if shape in args.shapes]
    rows = []
    failures = 0
    for shape, dtype_name, shape_tokens in plan_rows:
        attrs = SHAPES[shape]
        dtype = TORCH_DTYPE[dtype_name]
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
            weights = gpu_weights(attrs, dtype, seed=1)
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
                ref, distinct = reference(inputs, attrs)
                if t == 0:
                    rel = 0.0 if got.numel() == 0 else float("nan")
                else:
                    rel = ((got - ref).norm() / ref.norm()).item()
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
                    rel_again = ((again["output"].float() - ref).norm() / ref.norm()).item()
                    repeat_ok = rel_again <= TOL[dtype_name] and not bool(torch.isnan(again["output"]).any())
                else:
                    repeat_ok = repeat_equal
                ok = (not nan) and rel <= TOL[dtype_name] and repeat_ok
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
                    times = time_graph(
                        lambda inputs=inputs, attrs=attrs, bundle=bundle: moe_forward(inputs, attrs, bundle),
                        flush,
                        args.iters,
                    )
                    floor = floors(attrs, t, distinct, dtype.itemsize, copy_gbps, tflops)
                    med = statistics.median(times)
                    row.update(
                        {
                            "us_median": med,
                            "us_min": min(times),
                            "us_max": max(times),
                            "floor_us": floor,
                            "pct_of_floor": floor / med,
                            "timing": "cuda-graph replay, L2 flushed",
                        }
                    )
                if args.profile and t > 0 and routing == "random":
                    from moetrt.plugins.moe.tuning import profile_stages

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
