"""The grouped GEMMs' program order (`gate_up.GM`, `down.GM`: row blocks per weight tile, triton_moe.grouped_tile)
and their tile loads (`gate_up.TMA`, `down.TMA`: by the tensor-memory accelerator), against the table's config.

--compare order (the default): for each shape and T, the table's config of that bucket as it is (GM = 1: a row
block's column tiles run together) and with the row blocks grouped (GM > 1: the blocks of a group take each
weight tile in turn, so an expert's weight tile is read from HBM once per group instead of once per block).
--compare tma: the table's config, with both grouped GEMMs loading by TMA (plan.uses_tma), and that with one
more pipeline stage for gate_up (TMA loads are issued by one thread, so more of them can be in flight at the
same shared memory as the pointer loads' three). --compare patches: the table's config and the table's with each
of --patches applied (other tiles, say). Every bundle runs through the
launcher and is checked against the float32 oracle (exit 1 on a failure), then timed by CUDA-graph replay with
L2 flushed; all bundles on one input (--seeds) in turn, after one untimed pass. Bundles are compiled here or on
the GPU's host; --bundles keeps them, so a CPU machine can compile them for a short GPU call:

    PYTHONPATH=src python3 bench/grouped_order.py --bundles /tmp/gm --compile-only          # CPU
    PYTHONPATH=src python3 bench/grouped_order.py --bundles /tmp/gm --out results.jsonl    # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from moetrt.core.files import write_bytes_atomic
from moetrt.kernels import aot, plan
from moetrt.kernels.configs import select_config, tma_candidates
from moetrt.op.presets import PRESETS

SM = 90
DTYPE = "bfloat16"


def variants(shape: str, t: int, groups: list[int]) -> list[tuple[str, dict]]:
    """(label, config) per grouping of one bucket: the table's config with GM set on gate_up (and down)."""
    bound = plan.bucket_of(t)
    base = select_config(PRESETS[shape], DTYPE, SM, bound)
    out = []
    for gm in groups:
        for stages in (("gate_up",), ("gate_up", "down")) if gm > 1 else (("gate_up",),):
            cfg = copy.deepcopy(base)
            for stage in stages:
                cfg[stage]["GM"] = gm
            label = f"GM{gm}" + ("" if gm == 1 else "+down" if "down" in stages else "")
            out.append((label, cfg))
    return out


def tma_variants(shape: str, t: int) -> list[tuple[str, dict]]:
    """(label, config) of one bucket: the table's, and the tuner's TMA candidates of it (configs.tma_candidates:
    TMA grouped GEMMs, and those with one more gate_up stage)."""
    base = select_config(PRESETS[shape], DTYPE, SM, plan.bucket_of(t))
    tma, deeper = tma_candidates(PRESETS[shape], DTYPE, plan.bucket_of(t), base)
    return [("table", base), ("TMA", tma), (f"TMA+s{deeper['gate_up']['num_stages']}", deeper)]


def patched_variants(shape: str, t: int, patches: list[dict]) -> list[tuple[str, dict]]:
    """(label, config) of one bucket: the table's, and the table's with each patch ({stage: {key: value}})."""
    base = select_config(PRESETS[shape], DTYPE, SM, plan.bucket_of(t))
    out = [("table", base)]
    for i, patch in enumerate(patches):
        cfg = copy.deepcopy(base)
        for stage, values in patch.items():
            cfg[stage].update(values)
        out.append((f"patch{i}", cfg))
    return out


_COMPILED: dict[str, aot.CompiledKernel] = {}  # variants shared by the bundles (router, top-k, align, reduce)


def bundle_for(shape: str, t: int, label: str, cfg: dict, cache_dir: Path | None) -> aot.KernelBundle:
    path = cache_dir / f"{shape}_T{t}_{label}.bin" if cache_dir else None
    if path is not None and path.exists():
        return aot.KernelBundle.from_bytes(path.read_bytes())
    bound = plan.bucket_of(t)
    bundle = aot.compile_kernels(
        PRESETS[shape], DTYPE, SM, buckets=(bound,), configs={bound: cfg}, workers=2, cache=_COMPILED
    )
    if path is not None:
        write_bytes_atomic(path, bundle.to_bytes())
    return bundle


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="mixtral:512,mixtral:4096,qwen3_30b:4096", help="shape:T,...")
    p.add_argument("--groups", default="1,2,4,8", help="GM values to compare (1: the table as it is)")
    p.add_argument(
        "--compare", choices=("order", "tma", "patches"), default="order", help="what to vary (see above)"
    )
    p.add_argument(
        "--patches",
        default="[]",
        help="with --compare patches: a JSON list of {stage: {key: value}} applied to the table's config, e.g. "
        '[{"gate_up": {"BM": 128, "TMA": 1}, "down": {"TMA": 1}}] (rows labelled patch0, patch1, ...)',
    )
    p.add_argument("--bundles", type=Path, default=None, help="folder that keeps the compiled bundles")
    p.add_argument("--compile-only", action="store_true", help="compile the bundles and stop (no GPU needed)")
    p.add_argument("--out", default=None, help="a .jsonl file for the rows")
    p.add_argument(
        "--seeds", default="3", help="input seeds (weights and tokens) to time every bundle on, one row each"
    )
    a = p.parse_args()
    groups = [int(g) for g in a.groups.split(",")]
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")]
    rows, ok = [], True
    for shape, t in cases:
        if a.compare == "order":
            compared = variants(shape, t, groups)
        elif a.compare == "tma":
            compared = tma_variants(shape, t)
        else:
            compared = patched_variants(shape, t, json.loads(a.patches))
        bundles = []
        for label, cfg in compared:
            bundles.append((label, bundle_for(shape, t, label, cfg, a.bundles)))
            if a.compile_only:
                print(f"compiled {shape} T={t} {label}", flush=True)
        if a.compile_only:
            continue
        # every bundle on one input before the next input, after an untimed pass of the first: the first
        # bundle timed on a freshly made input (weights drawn, float32 oracle computed) ran 10-14 µs slower at
        # T = 8 than the same config timed after it (bench/results/2026-12-04-h200-sums-and-timing-order, step 5)
        for seed in map(int, a.seeds.split(",")):
            time_bundle(shape, t, bundles[0][1], seed)
            for label, bundle in bundles:
                row = dict(shape=shape, T=t, order=label, seed=seed, **time_bundle(shape, t, bundle, seed))
                ok &= row["ok"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if ok else 1


_INPUTS: dict[tuple[str, int, int], tuple[dict, object]] = {}


def time_bundle(shape: str, t: int, bundle: aot.KernelBundle, seed: int = 3) -> dict:
    import torch

    from moetrt.core.tolerances import relative_error, tolerance
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.tune.gpu_workload import gpu_random_inputs, gpu_reference
    from moetrt.tune.timing import time_graph

    attrs = PRESETS[shape]
    if (shape, t, seed) not in _INPUTS:
        _INPUTS.clear()  # one input's weights on the GPU at a time (DeepSeek-V3: 22 GB a draw)
        torch.cuda.empty_cache()
        inputs = gpu_random_inputs(attrs, t, torch.bfloat16, seed=seed)
        _INPUTS[(shape, t, seed)] = (inputs, gpu_reference(inputs, attrs).output)
    inputs, ref = _INPUTS[(shape, t, seed)]
    out = {"output": torch.full((t, attrs.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda")}
    moe_forward(inputs, attrs, bundle, outputs=out)
    rel = relative_error(out["output"], ref)
    timing = time_graph(lambda: moe_forward(inputs, attrs, bundle), repeats=20)
    return dict(rel_err=rel, ok=bool(rel <= tolerance(DTYPE)), us=timing.median_us, us_min=timing.min_us)


if __name__ == "__main__":
    sys.exit(main())
