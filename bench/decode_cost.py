#!/usr/bin/env python3
"""What one generated token costs as the context grows: the cached decoder against the uncached graph.

    python3 bench/decode_cost.py --out bench/results/<date>-decode-cost [--model demo:qwen3_next]

Both graphs are fused (`moetrt fuse`) fp32 exports of the same model, run by onnxruntime's CPU provider with
the same thread count. For each context C:
- cached: the decode step, one token after C earlier ones (the state from a real prefill of C tokens, bound
  as OrtValues, as `moetrt generate` runs it);
- uncached: what a step costs without a cache, the whole sequence of C + 1 tokens.
Each time is the median of --iters runs after --warmup runs, in one process. Writes results.json, table.md and
decode_cost.png under --out; prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CONTEXTS = (16, 32, 64, 128, 256, 512, 1024)


def _fused(model: str, cached: bool, tmp: Path) -> Path:
    from moetrt.export.loaded import CACHED, UNCACHED
    from moetrt.export.onnx_export import export_onnx
    from moetrt.passes.pipeline import fuse_file

    name = "cached" if cached else "uncached"
    export_onnx(model, tmp / f"{name}.onnx", form=CACHED if cached else UNCACHED, self_check="off")
    fuse_file(tmp / f"{name}.onnx", tmp / f"{name}.fused.onnx")
    return tmp / f"{name}.fused.onnx"


def _median_seconds(run: object, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        run()  # type: ignore[operator]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo:qwen3_next")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]

    import onnxruntime as ort

    from moetrt.core.artifacts import INPUT_IDS, LOGITS
    from moetrt.export.cached import positions
    from moetrt.runtime.decoder_io import state_from_metadata
    from moetrt.runtime.generation import OrtDecoder

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cached_path, uncached_path = _fused(args.model, True, tmp), _fused(args.model, False, tmp)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        uncached = ort.InferenceSession(str(uncached_path), options, providers=["CPUExecutionProvider"])
        meta = ort.InferenceSession(str(cached_path)).get_modelmeta().custom_metadata_map
        decoder = OrtDecoder(cached_path, state_from_metadata(meta) or [], threads=args.threads)
        gen = torch.Generator().manual_seed(0)
        for context in contexts:
            prompt = torch.randint(0, 512, (1, context), generator=gen)
            mask = torch.ones(1, context, dtype=torch.int64)
            decoder.reset(1)
            decoder.step(prompt, mask, positions(mask, context))  # prefill: the state of C tokens
            past = list(decoder._past)
            token = torch.randint(0, 512, (1, 1), generator=gen)
            step_mask = torch.ones(1, context + 1, dtype=torch.int64)
            step_positions = positions(step_mask, 1)

            def cached_step(past=past, token=token, mask=step_mask, where=step_positions) -> None:
                decoder._past = past  # the same past every time: each run is the step after C tokens
                decoder.step(token, mask, where)

            whole_sequence = torch.cat([prompt, token], dim=1).numpy()

            def uncached_step(whole=whole_sequence) -> None:
                uncached.run([LOGITS], {INPUT_IDS: whole})

            row = {
                "context": context,
                "cached_ms": 1e3 * _median_seconds(cached_step, args.warmup, args.iters),
                "uncached_ms": 1e3 * _median_seconds(uncached_step, args.warmup, args.iters),
            }
            rows.append(row)
            print(
                f"context {context:5d}: cached {row['cached_ms']:8.3f} ms, uncached {row['uncached_ms']:8.3f} ms"
            )
            sys.stdout.flush()

    first, last = rows[0], rows[-1]
    summary = {
        "model": args.model,
        "threads": args.threads,
        "iters": args.iters,
        "rows": rows,
        "cached_ratio": last["cached_ms"] / first["cached_ms"],
        "uncached_ratio": last["uncached_ms"] / first["uncached_ms"],
        "ratio_contexts": [first["context"], last["context"]],
        "onnxruntime": ort.__version__,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| context | cached decode step ms | uncached step ms |", "|---|---|---|"]
    table += [f"| {r['context']} | {r['cached_ms']:.3f} | {r['uncached_ms']:.3f} |" for r in rows]
    table.append(
        f"\ncached step at {last['context']} / at {first['context']}: {summary['cached_ratio']:.2f}x; "
        f"uncached: {summary['uncached_ratio']:.2f}x"
    )
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    _plot(rows, args.out / "decode_cost.png", args.model)
    return 0


def _plot(rows: list[dict[str, float]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(contexts, [r["cached_ms"] for r in rows], "o-", label="cached decoder: one decode step")
    ax.plot(contexts, [r["uncached_ms"] for r in rows], "s-", label="uncached graph: whole sequence")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (earlier tokens)")
    ax.set_ylabel("ms per generated token (median)")
    ax.set_title(f"{model}, onnxruntime CPU, fp32, fused")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
