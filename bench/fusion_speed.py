"""How long fusion takes as the model gets deeper: Qwen3-Next-style demo models of several depths.

    PYTHONPATH=src python3 bench/fusion_speed.py --layers 2,8,32 --out docs/fusion_speed.md

Each depth is exported once (not timed), then `fuse_model` is timed (best of `--repeat` runs). The table
shows graph nodes, fused blocks, the time per pass and the time per MoE layer, which stays flat when the
pass is linear in depth.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from moetrt.core.files import write_bytes_atomic
from moetrt.passes.pipeline import fuse_model


@dataclass(frozen=True)
class SpeedRow:
    layers: int
    nodes: int
    fused: int
    seconds: float
    pass_seconds: dict[str, float]

    @property
    def ms_per_layer(self) -> float:
        return self.seconds * 1000 / self.layers


def measure(layers: int, family: str = "qwen3_next", repeat: int = 3) -> SpeedRow:
    from moetrt.export.demo_models import build_demo
    from moetrt.export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="moetrt-speed-") as tmp:
        path = Path(tmp) / f"{family}_{layers}.onnx"
        export_onnx(build_demo(family, num_layers=layers), path)
        model = onnx.load(str(path))
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fuse_model(model)
        elapsed = time.perf_counter() - start
        if best is None or elapsed < best[0]:
            best = (elapsed, result)
    assert best is not None
    elapsed, result = best
    return SpeedRow(
        layers, len(model.graph.node), result.num_fused, elapsed, {s.name: s.seconds for s in result.stats}
    )


def markdown(rows: list[SpeedRow], command: str) -> str:
    names = list(rows[0].pass_seconds)
    lines = [
        "# Fusion speed",
        "",
        "Time of `moetrt.passes.fuse_model` (cleanup, fuse_moe with its numerical checks, pack_weights)",
        'on Qwen3-Next-style demo models of increasing depth (`build_demo("qwen3_next", num_layers=N)`,',
        "fp32, every layer an MoE block). Best of 3 runs; export time not included.",
        "",
        f"Measured with: `{command}`",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}, "
        "2 cores shared with other jobs.",
        "",
        "| layers | graph nodes | fused | total s | ms / layer | "
        + " | ".join(f"{n} s" for n in names)
        + " |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        passes = " | ".join(f"{r.pass_seconds[n]:.2f}" for n in names)
        lines.append(
            f"| {r.layers} | {r.nodes} | {r.fused} | {r.seconds:.2f} | {r.ms_per_layer:.0f} | {passes} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,8,32", help="comma-separated depths")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the markdown table here (atomically)")
    args = parser.parse_args(argv)
    rows = []
    for depth in (int(d) for d in args.layers.split(",")):
        row = measure(depth, repeat=args.repeat)
        print(
            f"{row.layers:>3} layers  {row.nodes:>6} nodes  {row.fused:>3} fused  {row.seconds:7.2f} s  "
            f"{row.ms_per_layer:6.0f} ms/layer",
            flush=True,
        )
        rows.append(row)
    command = "python -m fusion_speed --layers " + args.layers + (f" --out {args.out}" if args.out else "")
    text = markdown(rows, command)
    if args.out:
        write_bytes_atomic(Path(args.out), text.encode())
    else:
        print(text)


if __name__ == "__main__":
    main()
