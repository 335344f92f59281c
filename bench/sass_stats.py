#!/usr/bin/env python3
"""Registers, spills, shared memory and the SASS instruction mix of the MoE kernels, on any machine (no GPU).

Compiles the op's kernel bundle for an SM (`kernels.aot`) and reads each cubin with `cuobjdump` (Triton's wheel
carries it): registers per thread, stack and local memory (spills), shared memory, and the count of each SASS
opcode. Static counts say nothing of time, but they are what a decoder or a tile change costs per loop
iteration, and they can be compared before a GPU is at hand (docs/kernels.md: the quantized decoders).

    PYTHONPATH=src python3 bench/sass_stats.py --preset qwen3_next --weights fp8 --sm 90 [--buckets 1,inf]
        [--stages gate_up,down_rows] [--top 12] [--loops] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
# a register-to-register move (what ptxas emits to put an mma operand's registers together): the operands that
# follow IMAD (its modifiers included) or MOV in SASS_LINE's third group
REGISTER_MOVE = re.compile(r"^(?:\.MOV\.U32 R\d+, RZ, RZ, R\d+| R\d+, R\d+)\s*$")
RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def cuobjdump() -> Path:
    """The cuobjdump of Triton's NVIDIA backend (the CUDA toolkit of the CPU machines has none)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"no cuobjdump at {path}: install Triton's NVIDIA backend (pip install triton)")
    return path


def kernel_stats(cubin: bytes, tool: Path | None = None) -> dict[str, Any]:
    """{"registers", "stack", "local", "static_shared", "instructions", "opcodes": {opcode: count}} of one cubin
    (stack and local memory: spills; static shared memory only: a Triton kernel asks for the rest at launch)."""
    tool = tool or cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [str(tool), "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    resources = {name.lower(): int(value) for name, value in RESOURCE.findall(usage)}
    opcodes = collections.Counter(SASS_OPCODE.findall(sass))
    return {
        "registers": resources.get("reg", 0),
        "stack": resources.get("stack", 0),
        "local": resources.get("local", 0),
        "static_shared": resources.get("shared", 0),
        "instructions": sum(opcodes.values()),
        "opcodes": dict(opcodes.most_common()),
        "loops": sass_loops(sass),
    }


def sass_loops(sass: str) -> list[dict[str, Any]]:
    """The loops of a kernel's SASS, first address first: each backward branch and the instructions from its
    target to it ({"start", "end", "instructions", "opcodes", "register_moves"}). A loop body's count is what
    one iteration issues per warp (branches inside it aside), so two tiles' costs per weight can be compared
    statically, e.g. a 4-bit decode loop's instructions over the codes each thread decodes in one iteration;
    its register-to-register moves (IMAD.MOV.U32 Rd, RZ, RZ, Rs and MOV Rd, Rs) are among them."""
    lines = [(int(addr, 16), op, rest) for addr, op, rest in SASS_LINE.findall(sass)]
    loops = []
    for addr, op, rest in lines:
        target = BRANCH_TARGET.search(rest) if op == "BRA" else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        inside = [(o, r) for a, o, r in lines if start <= a <= addr]
        body = collections.Counter(o for o, _ in inside)
        moves = sum(o in ("IMAD", "MOV") and bool(REGISTER_MOVE.match(r)) for o, r in inside)
        loops.append(
            {
                "start": start,
                "end": addr,
                "instructions": sum(body.values()),
                "opcodes": dict(body.most_common()),
                "register_moves": moves,
            }
        )
    return sorted(loops, key=lambda loop: loop["start"])


def bundle_stats(bundle: Any, stages: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per (bucket, stage) of a KernelBundle: the stage's kernel, its warps, the shared memory it asks
    for at launch and `kernel_stats`."""
    tool = cuobjdump()
    rows, seen = [], {}
    for bucket, entry in bundle.buckets.items():
        for stage, key in entry["variants"].items():
            if stages and stage not in stages:
                continue
            if key not in seen:
                seen[key] = kernel_stats(bundle.kernels[key].cubin, tool)
            kernel = bundle.kernels[key]
            rows.append(
                {
                    "bucket": bucket,
                    "stage": stage,
                    "warps": kernel.num_warps,
                    "shared": kernel.shared,
                    "key": key,
                    **seen[key],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", help="a preset op (moetrt.op.presets)")
    parser.add_argument("--attrs", help="MoE attributes as JSON, instead of --preset")
    parser.add_argument("--weights", default="native", choices=["native", "fp8", "int4", "mxfp4"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sm", type=int, default=90)
    parser.add_argument("--buckets", default="1,16,inf", help="token buckets: 1, 16, 64, 512, inf")
    parser.add_argument("--stages", default="", help="comma list of stages (default: all)")
    parser.add_argument("--top", type=int, default=10, help="opcodes listed per kernel")
    parser.add_argument(
        "--loops", action="store_true", help="also each loop body: instructions per iteration and its opcodes"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args(argv)

    from moetrt.cli import resolve_attrs, with_weights
    from moetrt.core.errors import MoetrtError
    from moetrt.kernels.aot import compile_kernels

    try:
        attrs = with_weights(resolve_attrs(args.preset, args.attrs), args.weights, None, False)
        buckets = tuple(None if b == "inf" else int(b) for b in args.buckets.split(","))
        bundle = compile_kernels(attrs, args.dtype, args.sm, buckets=buckets, workers=max(1, args.jobs))
    except (MoetrtError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = bundle_stats(bundle, set(filter(None, args.stages.split(","))) or None)
    print(
        f"{'bucket':>6} {'stage':12} {'warps':>5} {'regs':>5} {'spill':>6} {'shared':>7} {'instr':>6}  top opcodes"
    )
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in list(r["opcodes"].items())[: args.top])
        spill = r["stack"] + r["local"]
        print(
            f"{r['bucket']:>6} {r['stage']:12} {r['warps']:>5} {r['registers']:>5} {spill:>6} {r['shared']:>7} "
            f"{r['instructions']:>6}  {top}"
        )
        for loop in r["loops"] if args.loops else ():
            ops = ", ".join(f"{op} {n}" for op, n in list(loop["opcodes"].items())[: args.top])
            print(
                f"{'':>6}   loop {loop['start']:#06x}-{loop['end']:#06x}: {loop['instructions']} a pass; {ops}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
