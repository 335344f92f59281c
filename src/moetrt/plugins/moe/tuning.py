"""Kernel-config table: block sizes per (shape, dtype, SM, token bucket), with tuned entries and defaults.

Tables live in plugins/moe/configs/sm{SM}.json: {"entries": {key: config}}, key =
`shape_key(attrs)/dtype/bucket`. A missing entry falls back to `default_config`, so every shape works on
every SM; tuned entries only make it faster. `tune` measures candidates on the current GPU and writes a table
(command: `moetrt tune`, docs/kernels.md).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.io_utils import write_text_atomic
from moetrt.plugins.moe.kernels.plan import BUCKETS, bucket_name, is_decode
from moetrt.plugins.moe.spec import MoEAttributes

CONFIG_DIR = Path(__file__).parent / "configs"


# The benchmark's shapes (BENCH.md), by name, for `moetrt aot --preset` / `moetrt tune --preset`.
PRESETS: dict[str, MoEAttributes] = {
    "qwen3_next": MoEAttributes(
        512, 10, 2048, 512, norm_topk_prob=True, shared_intermediate_size=512, has_shared_gate=True
    ),
    "qwen3_30b": MoEAttributes(128, 8, 2048, 768, norm_topk_prob=True),
    "mixtral": MoEAttributes(8, 2, 4096, 14336, norm_topk_prob=True),
    "deepseek_v3": MoEAttributes(
        256,
        8,
        7168,
        2048,
        scoring="sigmoid",
        has_score_correction_bias=True,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        shared_intermediate_size=2048,
    ),
    "gpt_oss_20b": MoEAttributes(
        32,
        4,
        2880,
        2880,
        topk_before_score=True,
        activation="swiglu_clamped",
        has_expert_bias=True,
        has_router_bias=True,
    ),
}


def resolve_attrs(preset: str | None, attrs_json: str | None) -> MoEAttributes:
    """MoE attributes from a preset name or a JSON object of MoEAttributes fields (exactly one of them)."""
    if bool(preset) == bool(attrs_json):
        raise MoetrtError(
            "give exactly one of --preset and --attrs",
            f"e.g. --preset qwen3_next (one of {', '.join(PRESETS)}) or --attrs '{{\"num_experts\": 8, ...}}'",
        )
    if preset:
        if preset not in PRESETS:
            raise MoetrtError(
                f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)} or --attrs JSON"
            )
        return PRESETS[preset]
    try:
        fields = json.loads(attrs_json or "")
        return MoEAttributes.from_onnx_attributes(fields)
    except (ValueError, TypeError) as err:
        raise MoetrtError(
            f"--attrs is not a valid MoE attribute object ({err})",
            "pass JSON with num_experts, top_k, hidden_size, intermediate_size, ... (spec.py)",
        ) from err


def shape_key(attrs: MoEAttributes) -> str:
    return (
        f"E{attrs.num_experts}_K{attrs.top_k}_H{attrs.hidden_size}_I{attrs.intermediate_size}"
        f"_S{attrs.shared_intermediate_size}"
    )


def entry_key(attrs: MoEAttributes, dtype: str, bound: int | None) -> str:
    return f"{shape_key(attrs)}/{dtype}/{bucket_name(bound)}"


def default_config(attrs: MoEAttributes, dtype: str, bound: int | None) -> dict[str, Any]:
    """Block sizes that are correct for any shape and reasonable on SM80-SM120."""
    fp32 = dtype == "float32"
    e_pad = 1 << max(0, (attrs.num_experts - 1).bit_length())
    # top-k: about 2048 scores per program keeps the [RT, E] tiles in registers (no spills)
    topk = {"RT": max(1, min(16, 2048 // e_pad)), "num_warps": 4}
    if is_decode(bound):
        assert bound is not None
        # decode: spread the router weight over many programs; GEMV-like expert tiles (BM=16 is the mma minimum)
        bk = 64 if fp32 else 128
        # split H so that about 128 programs stream the router weight (a few slices: top-k sums them)
        split = max(1, min(16, 128 // -(-attrs.num_experts // 16), attrs.hidden_size // bk))
        router = {"BT": 16, "BE": 16, "BK": bk, "SPLIT": split, "num_warps": 4, "num_stages": 3}
        gate_up = {
            "BM": 16,
            "BN": 16 if fp32 else 32,
            "BK": 64 if fp32 else 128,
            "num_warps": 4,
            "num_stages": 3,
        }
        # long rows (large I) in few H tiles would leave SMs idle: narrower H tiles, more programs
        down = {
            "BH": 16 if fp32 or attrs.intermediate_size >= 8192 else 64,
            "BK": 64,
            "num_warps": 4,
            "num_stages": 3,
        }
        reduce = {"BT": 16, "BH": 128, "num_warps": 4}
    else:
        big = bound is None
        router = {
            "BT": 64 if big else 32,
            "BE": min(e_pad, 64) if e_pad >= 16 else 16,
            "BK": 32 if fp32 else 64,
            "SPLIT": 1,
            "num_warps": 4,
            "num_stages": 3,
        }
        bm = 64 if big else 32
        gate_up = {
            "BM": bm,
            "BN": 32 if fp32 else 64,
            "BK": 32 if fp32 else 64,
            "num_warps": 4,
            "num_stages": 2 if fp32 else 3,
        }
        down = {
            "BH": 32 if fp32 else 64,
            "BK": 32 if fp32 else 64,
            "num_warps": 4,
            "num_stages": 2 if fp32 else 3,
        }
        reduce = {"BT": 16, "BH": 128, "num_warps": 4}
    # the fused decode experts kernel is a tuning candidate, off by default (float atomics: not bitwise
    # reproducible from run to run)
    fused = {"enabled": 0, "BH": 64}
    # programmatic dependent launch (SM90+) is a tuning candidate too: off unless measured faster
    pdl = {"enabled": 0}
    return {
        "router": router,
        "topk": topk,
        "gate_up": gate_up,
        "down": down,
        "reduce": reduce,
        "fused": fused,
        "pdl": pdl,
    }


@cache
def _load_table(sm: int) -> dict[str, Any]:
    path = CONFIG_DIR / f"sm{sm}.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["entries"]
    except (ValueError, KeyError) as err:
        raise MoetrtError(
            f"kernel-config table {path} is not valid ({err})",
            "regenerate it with `moetrt tune` or delete it to use defaults",
        ) from err


def select_config(attrs: MoEAttributes, dtype: str, sm: int, bound: int | None) -> dict[str, Any]:
    """Tuned entry for this shape / dtype / SM / bucket if the table has one, else the default."""
    cfg = default_config(attrs, dtype, bound)
    tuned = _load_table(sm).get(entry_key(attrs, dtype, bound))
    if tuned:
        cfg = copy.deepcopy(cfg)
        for stage, values in tuned.items():
            if stage in cfg:
                cfg[stage].update(values)
    return cfg


def candidate_configs(attrs: MoEAttributes, dtype: str, bound: int | None) -> list[dict[str, Any]]:
    """A small search space around the default: the GEMM stages' tiles (router kept at its default)."""
    base = default_config(attrs, dtype, bound)
    out = [base]
    fp32 = dtype == "float32"
    # (BM, BN, BK, warps, stages) of gate_up x (BH, BK, warps, stages) of down; BM is shared by both
    if is_decode(bound):
        gate_up_opts = [
            (16, 32, 128, 4, 3),
            (16, 16, 128, 4, 3),
            (16, 64, 64, 4, 3),
            (16, 32, 256, 8, 3),
            (16, 16, 256, 4, 2),
            (16, 32, 128, 4, 4),
        ]
        down_opts = [(64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3), (64, 128, 8, 3), (16, 128, 4, 3)]
    else:
        gate_up_opts = [
            (64, 64, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (64, 128, 64, 8, 4),
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (128, 128, 32, 8, 4),
        ]
        down_opts = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3)]
    for bm, bn, bk, warps, stages in gate_up_opts:
        for bh, dbk, dwarps, dstages in down_opts:
            if fp32 and (bk > 64 or dbk > 64 or bn > 64 or bh > 64 or bm > 64):
                continue  # fp32 tiles take twice the bytes: keep shared memory in bounds
            cfg = copy.deepcopy(base)
            cfg["gate_up"].update({"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages})
            cfg["down"].update({"BH": bh, "BK": dbk, "num_warps": dwarps, "num_stages": dstages})
            if cfg not in out:
                out.append(cfg)
    if is_decode(bound):
        for bm, bn, bk, warps, stages in gate_up_opts:
            for bh in (64, 128) if not fp32 else (32,):
                cfg = copy.deepcopy(base)
                cfg["gate_up"].update(
                    {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
                )
                cfg["fused"] = {"enabled": 1, "BH": bh}
                if cfg not in out:
                    out.append(cfg)
    return out


def router_candidates(base: dict[str, Any], dtype: str, bound: int | None) -> list[dict[str, Any]]:
    """Router and top-k block shapes tried once the GEMM tiles are chosen."""
    if dtype == "float32":
        opts = [(16, 16, 64, 4, 3), (16, 32, 64, 4, 2), (16, 16, 128, 4, 2)]
    elif is_decode(bound):
        opts = [(16, 16, 128, 4, 3), (16, 32, 128, 4, 3), (16, 16, 64, 4, 3), (16, 16, 64, 4, 4)]
    else:
        opts = [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (32, 64, 64, 4, 3)]
    out = [base]
    split = base["router"]["SPLIT"]
    for bt, be, bk, warps, stages in opts:
        for new_split in {split, max(1, split // 2), split * 2} if is_decode(bound) else {1}:
            cfg = copy.deepcopy(base)
            cfg["router"].update(
                {"BT": bt, "BE": be, "BK": bk, "SPLIT": new_split, "num_warps": warps, "num_stages": stages}
            )
            if cfg not in out:
                out.append(cfg)
    rt = base["topk"]["RT"]
    for new_rt, warps in ((max(1, rt // 2), 4), (rt * 2, 4), (rt, 8)):
        cfg = copy.deepcopy(base)
        cfg["topk"].update({"RT": new_rt, "num_warps": warps})
        if cfg not in out:
            out.append(cfg)
    return out


def write_table(best: dict[str, Any], sm: int, out_path: str | os.PathLike[str] | None = None) -> Path:
    """Merge tuned entries into the SM's table (entries of other shapes are kept); returns its path."""
    path = Path(out_path) if out_path else CONFIG_DIR / f"sm{sm}.json"
    table = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    table["entries"].update(best)
    write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    _load_table.cache_clear()
    return path


def tune(
    attrs: MoEAttributes,
    dtype: str,
    sm: int,
    time_config: Callable[[dict[str, Any], int], float],
    tokens: Iterable[int] = (1, 16, 64, 512, 4096),
    out_path: str | os.PathLike[str] | None = None,
    prepare: Callable[[list[tuple[dict[str, Any], int]]], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Time candidates per bucket with `time_config(cfg, num_tokens) -> µs`; write the best to the table.

    Rounds per token count: the GEMM tiles (and the fused decode kernel), then the router's block shapes
    with the best tiles, then (SM90+) programmatic dependent launch on or off.
    `prepare(list of (cfg, num_tokens))`, if given, sees each round's candidates first (to compile them
    in parallel). A bucket is scored by the sum of its times over the `tokens` it serves (e.g. 1 and 8
    for the <= 16 bucket), so one fast token count cannot pick a config that is slow at another.
    """
    per_bucket: dict[int | None, list[int]] = {}
    for t in tokens:
        per_bucket.setdefault(next(b for b in BUCKETS if b is None or t <= b), []).append(t)
    best: dict[str, Any] = {}
    for bound, counts in per_bucket.items():
        chosen = default_config(attrs, dtype, bound)
        us = float("inf")
        for round_name in ("tiles", "router", "pdl"):
            if round_name == "tiles":
                cands = candidate_configs(attrs, dtype, bound)
            elif round_name == "router":
                cands = router_candidates(chosen, dtype, bound)
            elif sm >= 90:
                cands = [chosen, {**copy.deepcopy(chosen), "pdl": {"enabled": 1}}]
            else:
                continue
            if prepare is not None:
                prepare([(cfg, counts[0]) for cfg in cands])
            timings = []
            for i, cfg in enumerate(cands):
                try:
                    timings.append((sum(time_config(cfg, t) for t in counts), i, cfg))
                except Exception as err:  # a candidate that does not compile, fit or compute right is skipped
                    log(f"  candidate {i} failed: {err!r}")
            if not timings:
                raise MoetrtError(
                    f"no candidate config ran for {counts} tokens", "check the GPU and the shape"
                )
            us, _, chosen = min(timings, key=lambda x: x[:2])
            log(
                f"{entry_key(attrs, dtype, bound)} T={counts} [{round_name}]: best {us:.1f} us of {len(timings)} "
                f"(first {timings[0][0]:.1f} us); fused={chosen['fused']['enabled']} pdl={chosen['pdl']['enabled']}"
            )
        best[entry_key(attrs, dtype, bound)] = {
            "router": chosen["router"],
            "topk": chosen["topk"],
            "gate_up": chosen["gate_up"],
            "down": chosen["down"],
            "fused": chosen["fused"],
            "pdl": chosen["pdl"],
            "us": round(us, 2),
            "tokens": counts,
        }
    write_table(best, sm, out_path)
    return best


# --- on a GPU (torch imported inside): inputs, timing, per-stage profile, the tuning driver ---------------


def gpu_random_inputs(
    attrs: MoEAttributes, num_tokens: int, dtype: Any, seed: int = 0, names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Random (never zero) CUDA inputs with the oracle's scales, drawn on the GPU (real shapes hold GBs).

    `names` limits which inputs are drawn (e.g. only hidden_states over weights drawn once)."""
    import torch

    from moetrt.plugins.moe.reference import input_scales

    gen = torch.Generator(device="cuda").manual_seed(seed)
    scales = input_scales(attrs)
    out = {}
    wanted = set(names) if names is not None else None
    for name, shape in attrs.input_shapes(num_tokens).items():
        if wanted is not None and name not in wanted:
            continue
        tensor = torch.empty(shape, dtype=dtype, device="cuda")  # type: ignore[arg-type]
        flat = tensor.view(-1)
        for lo in range(
            0, flat.numel(), 1 << 28
        ):  # chunks: a float32 copy of the largest weights would not fit
            hi = min(flat.numel(), lo + (1 << 28))
            flat[lo:hi] = (torch.randn(hi - lo, generator=gen, device="cuda") * scales[name]).to(dtype)
        out[name] = tensor
    return out


def time_graph_us(fn: Callable[[], Any], iters: int = 30, flush_bytes: int = 256 << 20) -> list[float]:
    """µs of each CUDA-graph replay of `fn`, L2 flushed (a 256 MB write) before each replay."""
    import torch

    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
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
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e3 for a, b in events]


def profile_stages(
    bundle: Any, attrs: MoEAttributes, inputs: dict[str, Any], iters: int = 20
) -> dict[str, float]:
    """Median GPU µs of each op of the launch sequence (memset, router, ...), L2 flushed before each run.

    A sleep kernel first lets the host enqueue the whole sequence ahead of the GPU, so the event gaps
    measure the kernels, not Python's launch cost.
    """
    import statistics

    import torch

    from moetrt.plugins.moe.launcher import MoELauncher

    num_tokens = inputs["hidden_states"].shape[0]
    launcher = MoELauncher(bundle, attrs)
    ops, _ = launcher.launch_plan(num_tokens)
    hidden = inputs["hidden_states"]
    outputs = [torch.empty(num_tokens, attrs.hidden_size, dtype=hidden.dtype, device="cuda")]
    if attrs.output_router_logits:
        outputs.append(torch.empty(num_tokens, attrs.num_experts, dtype=hidden.dtype, device="cuda"))
    workspace = torch.empty(launcher.workspace_size(num_tokens), dtype=torch.uint8, device="cuda")
    in_ptrs = [inputs[name].data_ptr() for name in attrs.present_inputs()]
    out_ptrs = [t.data_ptr() for t in outputs]
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    names = [op.stage for op in ops]
    samples: list[list[float]] = [[] for _ in ops]
    for _ in range(iters + 2):
        flush.zero_()
        torch.cuda._sleep(2_000_000)
        events = [torch.cuda.Event(enable_timing=True)]
        events[0].record()
        for i in range(len(ops)):
            launcher.enqueue_ops(num_tokens, in_ptrs, out_ptrs, workspace.data_ptr(), stream, ops[i : i + 1])
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        torch.cuda.synchronize()
        for i in range(len(ops)):
            samples[i].append(events[i].elapsed_time(events[i + 1]) * 1e3)
    result: dict[str, float] = {}
    for name, times in zip(names, samples, strict=True):
        key = name if name not in result else f"{name}_{len(result)}"
        result[key] = statistics.median(times[2:])
    return result


TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}  # rel. norm error vs the float32 reference


def gpu_reference(inputs: dict[str, Any], attrs: MoEAttributes) -> Any:
    """float32 output of the op on CUDA inputs with the oracle's routing and activation, one expert at a time
    (moe_reference upcasts every weight at once, which does not fit at real sizes)."""
    import torch
    import torch.nn.functional as F

    from moetrt.plugins.moe.reference import glu_activation, route, shared_expert

    x = inputs["hidden_states"].float()
    bias = inputs.get("router_bias")
    logits = F.linear(x, inputs["router_weight"].float(), None if bias is None else bias.float())
    scb = inputs.get("score_correction_bias")
    weights, ids = route(logits, attrs, None if scb is None else scb.float())
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
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
    return out


def tune_gpu(
    attrs: MoEAttributes,
    dtype: str,
    tokens: Iterable[int] = (1, 16, 64, 512, 4096),
    out_path: str | os.PathLike[str] | None = None,
    workers: int = 8,
    iters: int = 20,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune the config table for this GPU's SM: compile every candidate, time it through the launcher."""
    import statistics

    import torch

    from moetrt.plugins.moe import aot
    from moetrt.plugins.moe.kernels import plan
    from moetrt.plugins.moe.torch_ops import moe_forward

    if not torch.cuda.is_available():
        raise MoetrtError("tuning needs a CUDA GPU", "run `moetrt tune` on the GPU the table is for")
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    weights = gpu_random_inputs(attrs, 1, torch_dtype, seed=1)
    cache: dict[str, aot.CompiledKernel] = {}
    broken: set[str] = set()

    def bucket(t: int) -> int | None:
        return next(b for b in BUCKETS if b is None or t <= b)

    def prepare(cands: list[tuple[dict[str, Any], int]]) -> None:
        todo: dict[str, plan.Variant] = {}
        for cfg, t in cands:
            for v in plan.bucket_variants(attrs, dtype, bucket(t), cfg).values():
                if v.key not in cache and v.key not in broken:
                    todo[v.key] = v
        if not todo:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=multiprocessing.get_context("fork")
        ) as pool:
            futures = {key: pool.submit(aot.compile_variant, v, dtype, sm) for key, v in todo.items()}
            for key, fut in futures.items():
                try:
                    cache[key] = fut.result()
                except Exception as err:
                    broken.add(key)
                    log(f"  variant {key} does not compile: {err!r}")

    references: dict[int, tuple[dict[str, Any], Any]] = {}

    def time_config(cfg: dict[str, Any], t: int) -> float:
        bound = bucket(t)
        keys = {v.key for v in plan.bucket_variants(attrs, dtype, bound, cfg).values()}
        if keys & broken:
            raise MoetrtError("a variant of this candidate does not compile", "")
        bundle = aot.compile_kernels(attrs, dtype, sm, buckets=(bound,), configs={bound: cfg}, cache=cache)
        if t not in references:
            inputs = dict(weights)
            inputs.update(gpu_random_inputs(attrs, t, torch_dtype, seed=100 + t, names=["hidden_states"]))
            references[t] = (inputs, gpu_reference(inputs, attrs))
        inputs, ref = references[t]
        # a fast candidate must also be right: poisoned output, compared with the float32 reference
        out = {"output": torch.full((t, attrs.hidden_size), float("nan"), dtype=torch_dtype, device="cuda")}
        moe_forward(inputs, attrs, bundle, outputs=out)
        rel = float((out["output"].float() - ref).norm() / ref.norm())
        if not rel <= TOLERANCE[dtype]:
            raise MoetrtError(f"candidate is wrong (rel err {rel:.2e})", "")
        return statistics.median(time_graph_us(lambda: moe_forward(inputs, attrs, bundle), iters=iters))

    return tune(attrs, dtype, sm, time_config, tokens, out_path, prepare=prepare, log=log)
