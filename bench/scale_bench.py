#!/usr/bin/env python3
"""Peak memory and wall time of the pipeline on real-width Qwen3-Next checkpoints of 1, 2, 4 ... layers.

    python3 bench/scale_bench.py --layers 1,2,4 --work /big/disk/scale --out bench/results/<date>-scale

For each depth: write the random checkpoint shard by shard (bench/scale_checkpoint.py, reused if present), then
time `moetrt export DIR --dtype bf16`, `moetrt fuse` of that ONNX, `moetrt build ONNX --target h100` (fused
ONNX + sm_90 kernels + manifest; no TensorRT here) and `moetrt build DIR` (the checkpoint to a build directory
in one process) as separate processes, each one's peak RSS read from getrusage of a process that runs only it. Writes results.json and table.md under --out; prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = ("export", "fuse", "build", "build_from_checkpoint")
# Runs `argv` as the only child of a fresh interpreter, prints its exit code, wall seconds and peak RSS (KiB).
_MEASURE = (
    "import resource, subprocess, sys, time; s = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(rc, time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measure(argv: list[str], log: Path) -> dict[str, float]:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, *argv], stdout=subprocess.PIPE, stderr=fh, text=True, check=False
        )
    rc, seconds, peak_kib = done.stdout.strip().splitlines()[-1].split()
    return {"rc": int(rc), "seconds": round(float(seconds), 1), "peak_rss_gb": round(int(peak_kib) / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="1,2,4")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (tens of GB)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "scale.log"
    rows = []
    for layers in [int(n) for n in args.layers.split(",")]:
        ckpt, onnx_path = args.work / f"qwen3_next_{layers}l", args.work / f"qwen3_next_{layers}l.onnx"
        if not (ckpt / "model.safetensors.index.json").is_file():
            subprocess.run(
                [sys.executable, str(HERE / "scale_checkpoint.py"), str(ckpt), "--layers", str(layers)],
                check=True,
            )
        weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        row: dict[str, object] = {"layers": layers, "weights_gb": round(weights / 1e9, 2)}
        moetrt = [sys.executable, "-m", "moetrt.cli"]
        row["export"] = measure([*moetrt, "export", str(ckpt), "--dtype", "bf16", "-o", str(onnx_path)], log)
        fused = args.work / f"qwen3_next_{layers}l.fused.onnx"
        row["fuse"] = measure([*moetrt, "fuse", str(onnx_path), "-o", str(fused)], log)
        outdir = args.work / f"build_{layers}l"
        shutil.rmtree(outdir, ignore_errors=True)
        row["build"] = measure([*moetrt, "build", str(onnx_path), "-o", str(outdir), "--target", "h100"], log)
        if not args.keep:
            for path in (fused, onnx_path):
                for p in path.parent.glob(f"{path.name}*"):
                    p.unlink()
            shutil.rmtree(outdir, ignore_errors=True)
        # What a user runs: the checkpoint straight to a build directory, in one process.
        row["build_from_checkpoint"] = measure(
            [*moetrt, "build", str(ckpt), "-o", str(outdir), "--target", "h100", "--precision", "bf16"], log
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(outdir, ignore_errors=True)
    table = [
        "| layers | weights GB | export s / peak GB | fuse s / peak GB | build ONNX s / peak GB "
        "| build checkpoint s / peak GB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[k]['seconds']} / {r[k]['peak_rss_gb']}"
            + ("" if r[k]["rc"] == 0 else f" (exit {r[k]['rc']})")
            for k in STEPS
        ]  # type: ignore[index]
        table.append(f"| {r['layers']} | {r['weights_gb']} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows}, indent=1)
    )
    print("\n".join(table))
    return 0 if all(r[k]["rc"] == 0 for r in rows for k in STEPS) else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
