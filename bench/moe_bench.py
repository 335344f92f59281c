#!/usr/bin/env python3
"""MoE block benchmark: moetrt's fused MoE against the transformers experts implementations (BENCH.md).

    PYTHONPATH=src python3 bench/moe_bench.py --out DIR [--shapes qwen3_next,...] [--tokens 1,8,64]
        [--impls moetrt,batched_mm,...] [--repeats N] [--quick] [--device cuda|cpu]

One process measures the ceilings (device copy bandwidth, a bf16 8192^3 GEMM), then for every shape, token
count and routing (random, plus one skewed case per shape) times each implementation on the same inputs and
weights, checks it against the float32 oracle, and computes the floor from the experts the routing actually
hits. moetrt's AOT cubins are compiled (or loaded, --bundle) for every shape before anything is timed.
Writes DIR/results.json, DIR/moe_bench.png and DIR/table.txt; prints a summary table last. bench/README.md
describes the method, the budgets and the results.json fields.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Run from a checkout without installing: the package lives in ../src.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))

import peers
import workloads

from moetrt.core.devices import sm_from_capability
from moetrt.core.dtypes import kernel_name_of, precision
from moetrt.core.errors import MoetrtError
from moetrt.core.files import write_bytes_atomic, write_text_atomic
from moetrt.core.tolerances import tolerance
from moetrt.tune import floors
from moetrt.tune import timing as measure

IMPLS = ("moetrt", "moetrt+graph", "eager", "batched_mm", "grouped_mm", "compile", "graph", "liger")
IMPL_HELP = (
    "moetrt: moe_forward through the AOT-cubin launcher; moetrt+graph: the same replayed from a CUDA "
    "graph; eager / batched_mm / grouped_mm: transformers experts implementations; compile: grouped_mm "
    "under torch.compile; graph: the fastest transformers peer of the row replayed from a CUDA graph; liger: "
    "Liger-Kernel's fused MoE (Triton) for the routed experts, given the transformers router's choice"
)
# Row name of an --impls entry where they differ (a graph row is renamed after the peer it replays).
ROW_NAMES = {"compile": "grouped_mm+compile", "graph": "peer+graph"}
DTYPES = {name: precision(name).torch for name in ("bf16", "fp16", "fp32")}
DEFAULT_TOKENS = (1, 2, 8, 64, 512, 4096)
QUICK_TOKENS = (1, 8, 64)
SKEW = 2.0  # oracle random_inputs skew: ~95 % of token-expert pairs land on top_k + 2 experts
COPY_BYTES = 1 << 30  # per buffer: 2 GiB read + written
MEMORY_MARGIN = 6 << 30  # activations, workspaces, graph pools, allocator slack
SLOW_CALL_S = 0.05
DEADLINE_NOTE = "run deadline (--deadline-s) reached"
COMPILE_TYPICAL_S = 15.0


def _fail(message: str, hint: str = "") -> None:
    raise MoetrtError(message, hint)


# ---------------------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for results.json, moe_bench.png, table.txt")
    parser.add_argument(
        "--shapes",
        help=f"comma list from {', '.join(workloads.SHAPES)} "
        "(default: the five real shapes on cuda, their tiny versions on cpu)",
    )
    parser.add_argument(
        "--tokens", help="comma list of token counts (default 1,2,8,64,512,4096; --quick: 1,8,64)"
    )
    parser.add_argument("--impls", help=f"comma list from {', '.join(IMPLS)} (default: all). {IMPL_HELP}")
    parser.add_argument(
        "--repeats", type=int, help="timed calls per row, median reported (default 30; --quick 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per implementation first (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tokens 1,8,64, 5 repeats, no compile"
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cuda (default) or cpu (smoke test: host clock instead of CUDA events)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument(
        "--skew-tokens",
        type=int,
        default=512,
        help="token count of the skewed-routing row of each shape (0: none; default 512, capped "
        "at the largest --tokens)",
    )
    parser.add_argument(
        "--graph-max-tokens",
        type=int,
        default=64,
        help="CUDA-graph replay rows up to this many tokens (default 64)",
    )
    parser.add_argument(
        "--compile-budget-s",
        type=float,
        default=90.0,
        help="total seconds torch.compile may take; later compile rows are skipped (default 90)",
    )
    parser.add_argument(
        "--impl-budget-s",
        type=float,
        default=2.0,
        help="seconds of timed calls per row and implementation; slower ones (the eager loop) "
        "get fewer repeats, stated in the row (default 2)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="after this many seconds the eager loop, torch.compile and peer CUDA-graph rows are skipped "
        "(default 240)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=320.0,
        help="rows that would start after this many seconds are skipped, stated in the row, so the run "
        "ends with its table and plot inside a bounded time (default 320; 0: none)",
    )
    parser.add_argument(
        "--batched-mm-max-gb",
        type=float,
        default=8.0,
        help="skip batched_mm where its per-call gather of expert weights exceeds this (default 8)",
    )
    parser.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="SHAPE=PATH",
        help="moetrt kernel bundle compiled ahead of time for SHAPE (repeatable); without one, the shape's "
        "cubins are compiled here at the start of the run, before anything is timed",
    )
    parser.add_argument(
        "--no-rerun",
        action="store_true",
        help="if an implementation breaks the CUDA context (illegal address, ...), do not re-run the "
        "remaining shapes without it in a fresh process",
    )
    # Internal: the fresh process of such a re-run reuses the parent's ceilings, so every floor of the run
    # shares one pair of ceilings.
    parser.add_argument("--ceilings", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traceback", action="store_true", help="print the traceback of every failing row")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        _fail(
            "--device cuda but torch sees no CUDA device",
            "run on a GPU machine, or use --device cpu for the smoke run",
        )
    args.dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    )
    default_shapes = (
        workloads.GPU_DEFAULT_SHAPES if args.device.type == "cuda" else workloads.CPU_DEFAULT_SHAPES
    )
    args.shapes = _names(args.shapes, default_shapes, workloads.SHAPES, "shape")
    args.impls = _names(args.impls, IMPLS, IMPLS, "implementation")
    args.tokens = _ints(args.tokens, QUICK_TOKENS if args.quick else DEFAULT_TOKENS, "--tokens")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 30
    if args.repeats < 1 or args.warmup < 1:
        _fail("--repeats and --warmup must be at least 1")
    if args.quick or args.device.type == "cpu":
        args.compile_budget_s = 0.0
    if args.ceilings:
        try:
            copy_gbps, tflops = (float(v) for v in args.ceilings.split(","))
        except ValueError:
            _fail(f"--ceilings must be COPY_GBPS,GEMM_TFLOPS, got {args.ceilings!r}")
        if copy_gbps <= 0 or tflops <= 0:
            _fail(f"--ceilings must be positive, got {args.ceilings!r}")
        args.ceilings = (copy_gbps, tflops)
    args.bundles = {}
    for item in args.bundle:
        name, sep, path = item.partition("=")
        if not sep or name not in workloads.SHAPES:
            _fail(
                f"--bundle {item!r} is not SHAPE=PATH with a known shape",
                "e.g. --bundle qwen3_next=qwen3_next.bin",
            )
        if not Path(path).is_file():
            _fail(f"--bundle {name}: no file {path}", "compile one with the kernels' AOT step and carry it")
        args.bundles[name] = Path(path)
    return args


def _names(text: str | None, default: tuple[str, ...], known: Any, what: str) -> list[str]:
    names = list(default) if not text else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        _fail(f"unknown {what} {', '.join(unknown) or '(empty list)'}", f"choose from {', '.join(known)}")
    return names


def _ints(text: str | None, default: tuple[int, ...], flag: str) -> list[int]:
    if not text:
        return list(default)
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        _fail(f"{flag} must be a comma list of integers, got {text!r}", "e.g. --tokens 1,8,64")
    if not values or values[0] < 1:
        _fail(f"{flag} needs positive integers, got {text!r}", "e.g. --tokens 1,8,64")
    return values


# ------------------------------------------------------------------------------------------------------ rows


def new_row(shape: str, tokens: int, routing: str, impl: str) -> dict[str, Any]:
    return {
        "shape": shape,
        "T": tokens,
        "routing": routing,
        "impl": impl,
        "us_median": None,
        "us_min": None,
        "us_max": None,
        "rel_err": None,
        "distinct_experts": None,
        "floor_us": None,
        "pct_of_floor": None,
        "status": "error",
        "repeats": 0,
        "note": None,
    }


def _add_note(row: dict[str, Any], text: str) -> None:
    row["note"] = text if not row["note"] else f"{row['note']}; {text}"


def rows_past_deadline(rows: list[dict[str, Any]]) -> int:
    """Rows skipped because --deadline-s was reached (`complete` says only that the run ended); a re-run's
    rows carry the deadline among other notes."""
    return sum(1 for row in rows if row["status"] == "skipped" and DEADLINE_NOTE in (row["note"] or ""))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300]


@dataclass
class Case:
    """One row's inputs (per weight copy), references and floor."""

    shape: workloads.Shape
    tokens: int
    routing: str
    inputs: list[dict[str, torch.Tensor]]
    references: list[tuple[str, torch.Tensor]]
    distinct: int
    floor: float
    calls: dict[str, Callable[[], list[Callable[[], torch.Tensor]]]] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device: torch.device = args.device
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.compile_spent = 0.0
        self.cuda_broken: str | None = None
        # (shape, row impl) that was running when the context broke: the rerun leaves that implementation out
        self.broken_by: tuple[str, str] | None = None
        self.current: tuple[str, str] | None = None
        self.reruns: list[dict[str, Any]] = []
        self.checkpoint: Callable[[], None] | None = None  # writes results.json (complete: false)
        self.flush = measure.L2Flusher(self.device)
        self._moe_forward: Callable[..., Any] | None = None
        self._moe_forward_error: str | None = None
        self._bundles: dict[str, Any] = {}  # shape -> KernelBundle, or the exception that prevented it
        self.kernel_info: dict[str, dict[str, Any]] = {}  # shape -> where its cubins came from, compile time

    # -------------------------------------------------------------------------------------------- helpers
    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", flush=True)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    def past_deadline(self) -> bool:
        return self.args.deadline_s > 0 and time.perf_counter() - self.start > self.args.deadline_s

    def moe_forward(self) -> Callable[..., Any]:
        if self._moe_forward is None and self._moe_forward_error is None:
            try:
                from moetrt.kernels.torch_ops import moe_forward

                self._moe_forward = moe_forward
            except Exception as err:  # any import-time failure means: kernels unavailable here
                self._moe_forward_error = f"moetrt kernels unavailable: {_short(err)}"
        if self._moe_forward is None:
            raise RuntimeError(self._moe_forward_error)
        return self._moe_forward

    def healthy(self) -> bool:
        """False once the CUDA context is lost (an illegal access makes every later call fail)."""
        if self.cuda_broken:
            return False
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception as err:
                self.mark_broken(_short(err))
                return False
        return True

    def mark_broken(self, message: str) -> None:
        self.cuda_broken = message
        self.broken_by = self.current
        self.log(f"CUDA context lost while running {self.current}: {message}")

    # ------------------------------------------------------------------------------------------- ceilings
    def ceilings(self) -> tuple[float, float]:
        if self.args.ceilings:
            copy_gbps, tflops = self.args.ceilings
            self.log(f"ceilings of the parent run: copy {copy_gbps:g} GB/s, GEMM {tflops:g} TFLOP/s")
            return copy_gbps, tflops
        quick = self.args.quick or self.device.type == "cpu"
        copy_bytes = (64 << 20) if quick else COPY_BYTES
        size = 512 if quick else 8192
        copy_gbps = measure.copy_bandwidth_gbps(self.device, copy_bytes, repeats=max(self.args.repeats, 20))
        tflops = measure.gemm_tflops(self.device, self.args.dtype, size, repeats=max(self.args.repeats, 20))
        self.log(
            f"ceilings: copy {copy_gbps:.0f} GB/s ({2 * copy_bytes / 1e9:.2f} GB moved), "
            f"{str(self.args.dtype).removeprefix('torch.')} GEMM {size}^3 {tflops:.1f} TFLOP/s"
        )
        return copy_gbps, tflops

    # --------------------------------------------------------------------------------------------- shapes
    def weight_copies(self, shape: workloads.Shape) -> int:
        """2 copies (rotated so L2 never holds a call's weights) where memory allows, else 1 (L2 is flushed
        before every timed call either way). The float32 oracle upcasts one whole copy per row."""
        itemsize = self.args.dtype.itemsize
        one = workloads.weight_bytes(shape.attrs, itemsize)
        per_copy = one * (2 if shape.family == "gpt_oss" else 1)  # transformers' GPT-OSS layout is a copy
        reference = one * 4 // itemsize
        if self.device.type != "cuda":
            return 2
        free, _ = torch.cuda.mem_get_info(self.device)
        return 2 if 2 * per_copy + reference + MEMORY_MARGIN <= free else 1

    def run_shape(self, shape: workloads.Shape, copy_gbps: float, gemm_tflops: float) -> None:
        args, attrs = self.args, shape.attrs
        self.current = (shape.name, "setup")
        cases = [(t, "random", 0.0) for t in args.tokens]
        if args.skew_tokens > 0:
            cases.append((min(args.skew_tokens, max(args.tokens)), "skewed", SKEW))
        if self.past_deadline():
            self._rows_error(shape, cases, DEADLINE_NOTE, status="skipped")
            self.log(f"shape {shape.name}: skipped, {DEADLINE_NOTE}")
            return
        if not self.healthy():
            self._rows_error(
                shape, cases, f"CUDA context unusable after an earlier error ({self.cuda_broken})"
            )
            return
        copies = self.weight_copies(shape)
        gb = workloads.weight_bytes(attrs, args.dtype.itemsize) / 1e9
        self.log(f"shape {shape.name}: {shape.summary}; {gb:.2f} GB of weights per copy, {copies} copies")
        weights: list[dict[str, torch.Tensor]] = []
        blocks: list[peers.HFBlock] = []
        peer_error = None
        try:
            weights.append(workloads.make_weights(attrs, args.dtype, self.device, seed=args.seed))
            weights.extend({k: v.clone() for k, v in weights[0].items()} for _ in range(copies - 1))
        except Exception as err:
            self._rows_error(shape, cases, f"weights: {_short(err)}")
            weights.clear()  # before _free(): the partial copies must not stay cached
            self._free()
            return
        if any(i in args.impls for i in ("eager", "batched_mm", "grouped_mm", "compile", "graph", "liger")):
            try:
                probe = workloads.make_token_inputs(attrs, 1, args.dtype, self.device, args.seed, 0.0)
                blocks = [
                    peers.HFBlock(
                        shape.family,
                        attrs,
                        peers.hf_state(shape.family, workloads.assemble(attrs, probe, w), attrs),
                    )
                    for w in weights
                ]
            except Exception as err:
                peer_error = f"transformers block: {_short(err)}"
                self.log(f"  {peer_error}")
        compiled_blocks: list[peers.HFBlock] | None = None
        for tokens, routing, skew in cases:
            if not self.healthy():
                self._rows_error(
                    shape,
                    [(tokens, routing, skew)],
                    f"CUDA context unusable after an earlier error ({self.cuda_broken})",
                )
                continue
            self.current = (shape.name, "setup")
            if self.past_deadline():
                self._rows_error(shape, [(tokens, routing, skew)], DEADLINE_NOTE, status="skipped")
                continue
            try:
                case = self.make_case(shape, tokens, routing, skew, weights, copy_gbps, gemm_tflops)
            except Exception as err:
                self._rows_error(shape, [(tokens, routing, skew)], f"inputs/reference: {_short(err)}")
                self.log(f"  T={tokens} {routing}: {_short(err)}")
                continue
            for impl in args.impls:
                if self.past_deadline():
                    if impl not in ("moetrt+graph", "graph") or self._graph_row(tokens):
                        self.skip(case, ROW_NAMES.get(impl, impl), DEADLINE_NOTE)
                    continue
                try:
                    if impl == "moetrt":
                        self.run_moetrt(case, graph=False)
                    elif impl == "moetrt+graph":
                        if self._graph_row(tokens):
                            self.run_moetrt(case, graph=True)
                    elif impl in peers.EXPERTS_IMPLEMENTATIONS:
                        self.run_peer(case, impl, blocks, peer_error)
                    elif impl == "compile":
                        if compiled_blocks is None and blocks and self._compile_allowed():
                            # One weight copy: each copy would be one more compile (L2 is flushed anyway).
                            compiled_blocks = [blocks[0].sibling(blocks[0].module.state_dict())]
                        self.run_compiled(case, compiled_blocks, peer_error)
                    elif impl == "graph" and self._graph_row(tokens):
                        self.run_peer_graph(case)
                    elif impl == "liger":
                        self.run_liger(case, blocks, peer_error)
                except Exception as err:  # measure() records its own failures; this is the set-up around it
                    row = new_row(shape.name, tokens, routing, ROW_NAMES.get(impl, impl))
                    row.update(distinct_experts=case.distinct, floor_us=_sig(case.floor), note=_short(err))
                    self.rows.append(row)
                    self.log(f"    {impl:<22} error: {_short(err)}")
                    if self.args.traceback:
                        traceback.print_exc()
            del case
            # A run killed from outside (a hung kernel, the machine's time limit) keeps every finished case.
            if self.checkpoint is not None:
                self.checkpoint()
        del weights, blocks, compiled_blocks
        self._free()

    def _graph_row(self, tokens: int) -> bool:
        return self.device.type == "cuda" and tokens <= self.args.graph_max_tokens

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda" and self.healthy():
            torch.cuda.empty_cache()

    def _rows_error(
        self,
        shape: workloads.Shape,
        cases: list[tuple[int, str, float]],
        message: str,
        status: str = "error",
    ) -> None:
        for tokens, routing, _ in cases:
            for impl in self.args.impls:
                if impl in ("moetrt+graph", "graph") and not self._graph_row(tokens):
                    continue
                name = ROW_NAMES.get(impl, impl)
                row = new_row(shape.name, tokens, routing, name)
                row.update(note=message, status=status)
                self.rows.append(row)

    def make_case(
        self,
        shape: workloads.Shape,
        tokens: int,
        routing: str,
        skew: float,
        weights: list[dict[str, torch.Tensor]],
        copy_gbps: float,
        gemm_tflops: float,
    ) -> Case:
        attrs, args = shape.attrs, self.args
        token_inputs = workloads.make_token_inputs(
            attrs,
            tokens,
            args.dtype,
            self.device,
            seed=args.seed + 1000 * tokens + (1 if skew else 0),
            skew=skew,
        )
        inputs = [workloads.assemble(attrs, token_inputs, w) for w in weights]
        distinct = workloads.distinct_experts(inputs[0], attrs)
        nbytes = floors.moe_bytes(attrs, tokens, distinct, args.dtype.itemsize)
        flops = floors.moe_flops(attrs, tokens)
        floor = floors.floor_us(nbytes, flops, copy_gbps, gemm_tflops)
        references = [("fp32 router", workloads.reference_output(inputs[0], attrs))]
        gc.collect()
        if self.device.type == "cuda":
            # The oracle's float32 upcast of the weights (45 GB for deepseek_v3) must not stay cached.
            torch.cuda.empty_cache()
        if args.dtype != torch.float32:
            rounded, flipped = workloads.reference_output_rounded_router(inputs[0], attrs)
            if flipped > 0:
                references.append(
                    (
                        f"{str(args.dtype).removeprefix('torch.')}-rounded router "
                        f"({100 * flipped:.1f}% of tokens route differently)",
                        rounded,
                    )
                )
        self.log(
            f"  T={tokens} {routing}: {distinct} distinct experts, floor {floor:.1f} us "
            f"({nbytes / 1e6:.1f} MB, {flops / 1e9:.2f} GFLOP)"
        )
        return Case(shape, tokens, routing, inputs, references, distinct, floor)

    # ---------------------------------------------------------------------------------------- measurement
    def measure(
        self,
        case: Case,
        impl: str,
        make_calls: Callable[[], list[Callable[[], torch.Tensor]]],
        compile_row: bool = False,
        routing: Callable[[], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Warm up, check (outputs poisoned first), time; every failure lands in the row, never raises.

        `routing` (the implementation's own expert ids for the row's first inputs): where they differ from
        the oracle's (a near-tie of router scores decided the other way), the row is also judged against
        the reference routed the same way, and records how many tokens differ and that error."""
        args = self.args
        row = new_row(case.shape.name, case.tokens, case.routing, impl)
        row["distinct_experts"] = case.distinct
        row["floor_us"] = _sig(case.floor)
        self.rows.append(row)
        self.current = (case.shape.name, impl)
        try:
            calls = make_calls()
            # First call per copy: kernel loading, autotuning, compilation (timed on the host clock).
            first_s = measure.wall_time_s(lambda: [call() for call in calls], self.device)
            if compile_row:
                self.compile_spent += first_s
            if compile_row or first_s > 1.0:
                _add_note(row, f"first calls {first_s:.1f} s{' (compile)' if compile_row else ''}")
            per_call_s = measure.wall_time_s(calls[0], self.device)
            slow = per_call_s > SLOW_CALL_S  # the eager loop at large T: one warm-up round is plenty
            for _ in range(0 if slow else args.warmup - 1):
                for call in calls:
                    call()

            errors, labels = [], []
            for call in calls[:1] if slow else calls:
                # Poison the block the output came from: an unwritten element shows as NaN in the next call.
                poisoned = call()
                poisoned.fill_(float("nan"))
                del poisoned
                out = call()
                err, label = self.check(out, case.references)
                errors.append(err)
                labels.append(label)
                del out
            if any(e is None for e in errors):
                row["status"] = "failed"
                _add_note(row, "output holds NaN/Inf")
            else:
                if routing is not None:
                    try:
                        same = self.same_routing_error(case, routing, calls[0])
                    except Exception as err:  # the row stands on the other references
                        same = None
                        _add_note(row, f"own routing not read: {_short(err)}")
                    if same is not None:
                        differs, err = same
                        row["routing_differs"] = _sig(differs)
                        row["rel_err_same_routing"] = _sig(err) if err is not None else None
                        if err is not None and err < max(errors):
                            errors, labels = (
                                [err],
                                [f"reference routed like it ({100 * differs:.2f}% of tokens)"],
                            )
                row["rel_err"] = float(f"{max(errors):.3e}")
                ok = max(errors) <= tolerance(args.dtype)
                row["status"] = "ok" if ok else "failed"
                if labels[0] != case.references[0][0]:
                    _add_note(row, f"checked against the {labels[0]}")

            repeats = args.repeats
            if per_call_s * repeats > args.impl_budget_s:
                repeats = max(3, min(repeats, int(args.impl_budget_s / max(per_call_s, 1e-9))))
                _add_note(row, f"repeats capped at {repeats} ({per_call_s * 1e3:.0f} ms per call)")
            timing = measure.time_calls(calls, self.device, repeats, self.flush)
            row.update(
                us_median=_sig(timing.median_us),
                us_min=_sig(timing.min_us),
                us_max=_sig(timing.max_us),
                repeats=timing.repeats,
                pct_of_floor=_sig(floors.pct_of_floor(case.floor, timing.median_us)),
            )
            if len(calls) > 1:
                _add_note(row, f"weights rotated over {len(calls)} copies")
        except Exception as err:
            row["status"] = "error"
            _add_note(row, _short(err))
            if self.args.traceback:
                traceback.print_exc()
            out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError)
        else:
            out_of_memory = False
        if out_of_memory:  # outside the handler: the traceback no longer pins the failed call's tensors
            self._free()
        self.healthy()
        self.log(
            f"    {impl:<22} {_fmt(row['us_median'])} us  rel_err {_fmt(row['rel_err'])}  "
            f"{row['status']}{'  (' + row['note'] + ')' if row['note'] else ''}"
        )
        return row

    def same_routing_error(
        self, case: Case, routing: Callable[[], torch.Tensor], call: Callable[[], torch.Tensor]
    ) -> tuple[float, float | None] | None:
        """(fraction of tokens the implementation routes unlike the oracle, its error against the reference
        routed like it), or None where it routes every token as the oracle does."""
        attrs = case.shape.attrs
        ids = routing()
        differs = workloads.routing_differs(case.inputs[0], attrs, ids)
        if differs == 0:
            return None
        ref, _ = workloads.reference_output_routed(case.inputs[0], attrs, ids)
        return differs, workloads.relative_error(call(), ref)

    def check(
        self, out: torch.Tensor, references: list[tuple[str, torch.Tensor]]
    ) -> tuple[float | None, str]:
        best: tuple[float | None, str] = (None, references[0][0])
        for label, ref in references:
            err = workloads.relative_error(out, ref)
            if err is None:
                return None, label
            if best[0] is None or err < best[0]:
                best = (err, label)
        return best

    def skip(self, case: Case, impl: str, reason: str) -> None:
        row = new_row(case.shape.name, case.tokens, case.routing, impl)
        row.update(distinct_experts=case.distinct, floor_us=_sig(case.floor), status="skipped", note=reason)
        self.rows.append(row)
        self.log(f"    {impl:<22} skipped: {reason}")

    # ------------------------------------------------------------------------------------ implementations
    def prepare_kernels(self) -> None:
        """Load or compile every selected shape's AOT cubins before anything is timed, and report it once.

        Compiling here, before the ceilings, keeps it out of every timed region and out of moe_forward's own
        first-use compile (the bundle is passed to every call)."""
        if self.device.type != "cuda" or not any(i.startswith("moetrt") for i in self.args.impls):
            return
        for name in self.args.shapes:
            try:
                self.moetrt_bundle(workloads.SHAPES[name])
            except Exception as err:
                self.log(f"moetrt kernels for {name}: {_short(err)} (its moetrt rows will say so)")

    def moetrt_bundle(self, shape: workloads.Shape) -> Any:
        """The shape's AOT cubins: carried with --bundle, else compiled here once (None on the CPU, where the
        fused op does not run)."""
        if self.device.type != "cuda":
            return None
        if shape.name not in self._bundles:
            try:
                self._bundles[shape.name] = self._load_or_compile_bundle(shape)
            except Exception as err:
                self._bundles[shape.name] = err
                self.kernel_info[shape.name] = {"source": "error", "error": _short(err)}
        cached = self._bundles[shape.name]
        if isinstance(cached, Exception):
            raise RuntimeError(f"moetrt kernel bundle: {_short(cached)}")
        return cached

    def _load_or_compile_bundle(self, shape: workloads.Shape) -> Any:
        from moetrt.kernels.aot import KernelBundle, compile_kernels

        dtype = kernel_name_of(self.args.dtype)
        major, minor = torch.cuda.get_device_capability(self.device)
        sm = sm_from_capability(major, minor)
        start = time.perf_counter()
        if shape.name in self.args.bundles:
            path = self.args.bundles[shape.name]
            bundle = KernelBundle.from_bytes(path.read_bytes())
            if bundle.moe_attributes() != shape.attrs or bundle.dtype != dtype or bundle.sm != sm:
                raise ValueError(
                    f"{path} holds cubins for {bundle.dtype} sm_{bundle.sm} and other attributes than "
                    f"{shape.name} {dtype} sm_{sm}; compile a bundle for this shape, dtype and GPU"
                )
            source = f"carried ({path.name})"
        else:
            bundle = compile_kernels(shape.attrs, dtype, sm, workers=min(16, os.cpu_count() or 1))
            source = "compiled here"
        seconds = time.perf_counter() - start
        self.kernel_info[shape.name] = {
            "source": source,
            "seconds": round(seconds, 2),
            "kernels": len(bundle.kernels),
            "bytes": sum(len(k.cubin) for k in bundle.kernels.values()),
            "sm": sm,
            "dtype": dtype,
            "triton": bundle.triton_version,
        }
        self.log(
            f"moetrt cubins for {shape.name} {dtype} sm_{sm}: {len(bundle.kernels)} kernels {source} "
            f"in {seconds:.1f} s (triton {bundle.triton_version})"
        )
        return bundle

    def run_moetrt(self, case: Case, graph: bool) -> None:
        attrs = case.shape.attrs

        def make_calls() -> list[Callable[[], torch.Tensor]]:
            moe_forward = self.moe_forward()
            bundle = self.moetrt_bundle(case.shape)
            params = inspect.signature(moe_forward).parameters
            calls = []
            for inputs in case.inputs:
                kwargs: dict[str, Any] = {}
                # The prepared bundle: moe_forward would otherwise compile one inside the first (untimed) call.
                if bundle is not None and "bundle" in params:
                    kwargs["bundle"] = bundle
                # As an engine's bindings: the output buffer is the caller's (measure() poisons it).
                if "outputs" in params:
                    kwargs["outputs"] = {"output": torch.empty_like(inputs["hidden_states"])}
                calls.append(
                    lambda inputs=inputs, kwargs=kwargs: moe_forward(inputs, attrs, **kwargs)["output"]
                )
            if graph:
                return [measure.CapturedCall(call, self.device) for call in calls]
            return calls

        row = self.measure(
            case, "moetrt+graph" if graph else "moetrt", make_calls, routing=self._moetrt_routing(case)
        )
        if graph and row["status"] != "error":
            _add_note(row, "CUDA-graph replay")

    def _moetrt_routing(self, case: Case) -> Callable[[], torch.Tensor] | None:
        if self.device.type != "cuda":
            return None
        try:
            from moetrt.kernels.torch_ops import moe_expert_ids
        except ImportError:  # an older tree under comparison
            return None
        bundle = self.moetrt_bundle(case.shape)
        return lambda: moe_expert_ids(case.inputs[0], case.shape.attrs, bundle)

    def _peer_calls(
        self, case: Case, impl: str, blocks: list[peers.HFBlock]
    ) -> Callable[[], list[Callable[[], torch.Tensor]]]:
        def make_calls() -> list[Callable[[], torch.Tensor]]:
            calls = []
            for block, inputs in zip(blocks, case.inputs):
                block.set_router(inputs)
                block.set_implementation(impl)
                calls.append(lambda block=block, hidden=inputs["hidden_states"]: block(hidden))
            return calls

        return make_calls

    def run_peer(self, case: Case, impl: str, blocks: list[peers.HFBlock], peer_error: str | None) -> None:
        if impl not in peers.available_implementations():
            self.skip(case, impl, f"not in this transformers ({_transformers_version()})")
            return
        if peer_error or not blocks:
            self.measure(case, impl, lambda: _raise(peer_error or "no transformers block"))
            return
        attrs = case.shape.attrs
        if impl == "batched_mm":
            gather = case.tokens * attrs.top_k * floors.expert_bytes(attrs, self.args.dtype.itemsize)
            if gather > self.args.batched_mm_max_gb * 1e9:
                self.skip(
                    case,
                    impl,
                    f"would gather {gather / 1e9:.0f} GB of expert weights per call "
                    f"(--batched-mm-max-gb {self.args.batched_mm_max_gb:g})",
                )
                return
        if impl == "eager" and self.over_budget():
            self.skip(case, impl, "run time budget (--budget-s) spent")
            return
        make_calls = self._peer_calls(case, impl, blocks)
        hidden = case.inputs[0]["hidden_states"]
        row = self.measure(case, impl, make_calls, routing=lambda: blocks[0].routing(hidden))
        if row["status"] == "ok" and impl != "eager":
            case.calls[impl] = make_calls

    def run_liger(self, case: Case, blocks: list[peers.HFBlock], peer_error: str | None) -> None:
        why_not = peers.liger_unsupported(case.shape.family)
        if why_not:
            self.skip(case, "liger", why_not)
            return
        if peer_error or not blocks:
            self.measure(case, "liger", lambda: _raise(peer_error or "no transformers block"))
            return

        def make_calls() -> list[Callable[[], torch.Tensor]]:
            calls = []
            for block, inputs in zip(blocks, case.inputs):
                block.set_router(inputs)
                liger = peers.LigerBlock(block, inputs)
                calls.append(lambda liger=liger, h=inputs["hidden_states"]: liger(h))
            return calls

        hidden = case.inputs[0]["hidden_states"]
        self.measure(case, "liger", make_calls, routing=lambda: blocks[0].routing(hidden))

    def _compile_allowed(self) -> bool:
        # A compile cannot be interrupted: start one only with room left for a typical one.
        room = self.args.compile_budget_s - self.compile_spent
        return room >= min(COMPILE_TYPICAL_S, self.args.compile_budget_s) and not self.over_budget()

    def run_compiled(self, case: Case, blocks: list[peers.HFBlock] | None, peer_error: str | None) -> None:
        impl = "grouped_mm+compile"
        if self.args.compile_budget_s <= 0:
            self.skip(case, impl, "torch.compile off (--quick / cpu / --compile-budget-s 0)")
            return
        if "grouped_mm" not in peers.available_implementations():
            self.skip(case, impl, f"grouped_mm not in this transformers ({_transformers_version()})")
            return
        if not self._compile_allowed():
            self.skip(
                case,
                impl,
                f"compile budget spent ({self.compile_spent:.0f} s of "
                f"{self.args.compile_budget_s:g} s) or run budget spent",
            )
            return
        if peer_error or not blocks:
            self.measure(case, impl, lambda: _raise(peer_error or "no transformers block"))
            return
        _raise_recompile_limits()

        def make_calls() -> list[Callable[[], torch.Tensor]]:
            calls = []
            for block, inputs in zip(blocks, case.inputs):
                block.set_router(inputs)
                block.set_implementation("grouped_mm")
                compiled = block.compiled()
                calls.append(
                    lambda module=compiled, hidden=inputs["hidden_states"]: peers.block_forward(
                        module, hidden
                    )
                )
            return calls

        row = self.measure(case, impl, make_calls, compile_row=True)
        if row["status"] == "ok":
            case.calls[impl] = make_calls

    def run_peer_graph(self, case: Case) -> None:
        """The row's fastest correct transformers peer, replayed from a CUDA graph (no Python launch cost)."""
        if self.over_budget():
            self.skip(case, "peer+graph", "run time budget (--budget-s) spent")
            return
        ranked = sorted(
            (
                r
                for r in self.rows
                if r["shape"] == case.shape.name
                and r["T"] == case.tokens
                and r["routing"] == case.routing
                and r["impl"] in case.calls
                and r["status"] == "ok"
            ),
            key=lambda r: r["us_median"],
        )
        if not ranked:
            self.skip(case, "peer+graph", "no transformers peer passed in this row")
            return
        failures = []
        for candidate in ranked:
            name = candidate["impl"]
            make = case.calls[name]

            def make_calls(
                make: Callable[[], list[Callable[[], torch.Tensor]]] = make,
            ) -> list[Callable[[], torch.Tensor]]:
                return [measure.CapturedCall(call, self.device) for call in make()]

            row = self.measure(case, f"{name}+graph", make_calls)
            if row["status"] != "error":
                _add_note(row, "CUDA-graph replay of the fastest capturable peer")
                if failures:
                    _add_note(row, "; ".join(failures))
                return
            failures.append(f"{name} not capturable")
            self.rows.remove(row)
            if not self.healthy():
                break
        self.skip(case, "peer+graph", "; ".join(failures))

    # -------------------------------------------------------------------------------------------- output
    def environment(self, copy_gbps: float, gemm_tflops: float) -> dict[str, Any]:
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            device = (
                f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs)"
            )
            driver = _driver_version()
        else:
            device = f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
            driver = None
        try:
            import triton

            triton_version = triton.__version__
        except Exception:
            triton_version = None
        torch_version = torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
        return {
            "device": device,
            "driver": driver,
            "torch": torch_version,
            "triton": triton_version,
            "transformers": _transformers_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": _command_line(self.args.argv),
            "copy_GBps": _sig(copy_gbps),
            "gemm_TFLOPs": _sig(gemm_tflops),
            "dtype": str(self.args.dtype).removeprefix("torch."),
            "tolerance": tolerance(self.args.dtype),
            "l2_flushed": self.device.type == "cuda",
        }

    def write(self, out_dir: Path, env: dict[str, Any], complete: bool) -> None:
        results = {
            **env,
            "moetrt_kernels": self.kernel_info,
            "reruns": self.reruns,
            "complete": complete,
            "rows_past_deadline": rows_past_deadline(self.rows),
            "rows": self.rows,
        }
        write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- formatting


def _raise_recompile_limits() -> None:
    """Every shape and weight copy adds guarded entries for the one compiled function; past dynamo's default
    limit (8) it would silently run eagerly under the compile label, so raise the limit and fail loudly."""
    config = torch._dynamo.config
    for name, value in (
        ("cache_size_limit", 256),
        ("recompile_limit", 256),
        ("accumulated_cache_size_limit", 4096),
        ("accumulated_recompile_limit", 4096),
        ("fail_on_recompile_limit_hit", True),
    ):
        if hasattr(config, name):
            setattr(config, name, value)


def _raise(message: str) -> list[Callable[[], torch.Tensor]]:
    raise RuntimeError(message)


def _sig(value: float, digits: int = 4) -> float:
    """Round to significant digits (fixed decimals would zero a tiny CPU rate or floor)."""
    return float(f"{value:.{digits}g}")


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-2)):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:
        return "not installed"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return None


def _command_line(argv: list[str]) -> str:
    prefix = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return prefix + shlex.join(["python3", os.path.relpath(__file__), *argv])


def full_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'shape':<17}{'T':>6} {'routing':<8}{'impl':<24}{'median_us':>11}{'min_us':>11}{'max_us':>11}"
        f"{'rel_err':>10}{'distinct':>9}{'floor_us':>10}{'%floor':>9}  status  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['shape']:<17}{r['T']:>6} {r['routing']:<8}{r['impl']:<24}{_fmt(r['us_median']):>11}"
            f"{_fmt(r['us_min']):>11}{_fmt(r['us_max']):>11}{_fmt(r['rel_err'], 3):>10}"
            f"{_fmt(r['distinct_experts']):>9}{_fmt(r['floor_us']):>10} {_fmt(r['pct_of_floor'], 3):>8}"
            f"  {r['status']:<7} {r['note'] or ''}"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per (shape, T, routing): moetrt's best against the best correct transformers peer."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["T"], r["routing"]), []).append(r)
    header = (
        f"{'shape':<17}{'T':>6} {'routing':<8}{'floor_us':>9} | {'moetrt_us':>10}{'%floor':>9}{'rel_err':>10}"
        f" {'variant':<13}| {'best peer':<24}{'us':>10}{'%floor':>9} | {'speedup':>7}"
    )
    lines = [header, "-" * len(header)]
    for (shape, tokens, routing), group in groups.items():
        ours = _best([r for r in group if r["impl"].startswith("moetrt")])
        theirs = _best([r for r in group if not r["impl"].startswith("moetrt")])
        floor = group[0]["floor_us"]
        if ours:
            mine = (
                f"{_fmt(ours['us_median']):>10} {_fmt(ours['pct_of_floor'], 3):>8}{_fmt(ours['rel_err'], 3):>10} "
                f"{ours['impl']:<13}"
            )
        else:
            failed = [r for r in group if r["impl"].startswith("moetrt")]
            status = failed[0]["status"] if failed else "not run"
            mine = f"{status:>29} {'':<13}"
        peer = (
            f"{theirs['impl']:<24}{_fmt(theirs['us_median']):>10} {_fmt(theirs['pct_of_floor'], 3):>8}"
            if theirs
            else f"{'none passed':<24}{'-':>10}{'-':>9}"
        )
        speedup = f"{theirs['us_median'] / ours['us_median']:>6.2f}x" if ours and theirs else f"{'-':>7}"
        lines.append(f"{shape:<17}{tokens:>6} {routing:<8}{_fmt(floor):>9} | {mine}| {peer} | {speedup}")
    return "\n".join(lines)


def kernels_line(info: dict[str, dict[str, Any]]) -> str:
    """Where each shape's moetrt cubins came from and what compiling them cost (outside every timing)."""
    if not info:
        return "moetrt cubins: none prepared (cpu run or moetrt not selected)"
    parts = []
    for shape, entry in info.items():
        if entry["source"] == "error":
            parts.append(f"{shape} unavailable ({entry['error']})")
        else:
            parts.append(f"{shape} {entry['kernels']} kernels {entry['source']} in {entry['seconds']:.1f} s")
    return "moetrt cubins (AOT, before any timing): " + "; ".join(parts)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    timed = [r for r in rows if r["status"] == "ok" and r["us_median"] is not None]
    return min(timed, key=lambda r: r["us_median"]) if timed else None


def plot(rows: list[dict[str, Any]], path: Path, env: dict[str, Any]) -> str | None:
    """Median time vs T per shape (random routing), one line per implementation, floor dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        return f"plot skipped: {_short(err)}"
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return "plot skipped: no rows"
    cols = min(3, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        random_rows = [r for r in rows if r["shape"] == shape and r["routing"] == "random"]
        floor = sorted({(r["T"], r["floor_us"]) for r in random_rows if r["floor_us"] is not None})
        if floor:
            ax.plot([t for t, _ in floor], [f for _, f in floor], "k--", label="floor", linewidth=1.2)
        for impl in dict.fromkeys(r["impl"] for r in random_rows):
            points = sorted(
                (r["T"], r["us_median"])
                for r in random_rows
                if r["impl"] == impl and r["status"] == "ok" and r["us_median"]
            )
            if points:
                style = "-o" if impl.startswith("moetrt") else "-."
                ax.plot([t for t, _ in points], [u for _, u in points], style, label=impl, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("median µs (correct rows)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.set_visible(False)
    fig.suptitle(f"MoE block, {env['dtype']} — {env['device']} — {env['date']}", fontsize=9)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return None


# -------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("highest")  # the float32 oracle must not run in TF32
    bench = Bench(args)
    bench.log(
        f"moe_bench on {args.device} {str(args.dtype).removeprefix('torch.')}: shapes {','.join(args.shapes)}; "
        f"tokens {','.join(map(str, args.tokens))}; impls {','.join(args.impls)}; repeats {args.repeats}"
    )
    with torch.inference_mode():
        bench.prepare_kernels()
        copy_gbps, gemm_tflops = bench.ceilings()
        bench._free()
        env = bench.environment(copy_gbps, gemm_tflops)
        bench.log(
            f"device {env['device']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, "
            f"transformers {env['transformers']}"
        )
        bench.checkpoint = lambda: bench.write(out_dir, env, complete=False)
        for name in args.shapes:
            bench.run_shape(workloads.SHAPES[name], copy_gbps, gemm_tflops)
            bench.checkpoint()
    reset_context = False
    plan = rerun_plan(args, bench.broken_by) if bench.cuda_broken and not args.no_rerun else None
    if plan:
        reset_context = release_broken_context(bench)
        if rerun(bench, plan, copy_gbps, gemm_tflops):
            bench.cuda_broken = None
    bench.write(out_dir, env, complete=True)
    plot_note = plot(bench.rows, out_dir / "moe_bench.png", env)
    table = full_table(bench.rows)
    summary = summary_table(bench.rows)
    kernels = kernels_line(bench.kernel_info)
    write_text_atomic(out_dir / "table.txt", f"{table}\n\n{kernels}\n\n{summary}\n")
    print(table, flush=True)
    if plot_note:
        print(plot_note)
    print(kernels)
    failed = [r for r in bench.rows if r["status"] == "failed"]
    errors = [r for r in bench.rows if r["status"] == "error"]
    print(
        f"\n{env['device']} | copy {env['copy_GBps']} GB/s | GEMM {env['gemm_TFLOPs']} TFLOP/s | "
        f"{len(bench.rows)} rows, {len(failed)} failed correctness, {len(errors)} errors | "
        f"{time.perf_counter() - bench.start:.0f} s | results in {out_dir}"
    )
    for item in bench.reruns:
        print(
            f"re-run in a fresh process: {','.join(item['shapes'])} with {','.join(item['impls'])}, "
            f"because {item['reason']}"
        )
    print(summary, flush=True)
    code = 1 if bench.cuda_broken else 0
    if reset_context:
        # torch's CUDA state points into the context released above: leave without its destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ---------------------------------------------------------------------------------------- broken context


def impl_option(row_impl: str) -> str:
    """The --impls entry a row came from (compile and graph rows name the peer they are built on)."""
    if row_impl in IMPLS:
        return row_impl
    if row_impl.endswith("+compile"):
        return "compile"
    if row_impl.endswith("+graph"):
        return "graph"
    return row_impl


def rerun_plan(
    args: argparse.Namespace, broken_by: tuple[str, str] | None
) -> tuple[list[str], list[str]] | None:
    """(shapes, impls) to re-run in a fresh process: from the shape where the CUDA context broke on, without
    the implementation that broke it (both moetrt variants if it was one of them). None when the break
    happened outside any implementation (ceilings, inputs), where a re-run would only break again."""
    if broken_by is None:
        return None
    shape, row_impl = broken_by
    option = impl_option(row_impl)
    if option not in IMPLS or shape not in args.shapes:
        return None
    left_out = {"moetrt", "moetrt+graph"} if option.startswith("moetrt") else {option}
    if option == "grouped_mm":
        left_out.add("compile")  # the compiled peer is grouped_mm under torch.compile
    impls = [impl for impl in args.impls if impl not in left_out]
    if not impls:
        return None
    return args.shapes[args.shapes.index(shape) :], impls


def release_broken_context(bench: Bench) -> bool:
    """Give the GPU memory of the broken context back so the fresh process has the whole device: a sticky
    error keeps every allocation alive until the primary context is reset. True when it was reset (no
    torch CUDA call may follow in this process)."""
    if bench.device.type != "cuda":
        return False
    gc.collect()
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            bench.log("cuda-python missing: the broken context keeps its memory during the re-run")
            return False
    try:
        err, device = driver.cuCtxGetDevice()
        if err == driver.CUresult.CUDA_SUCCESS:
            (err,) = driver.cuDevicePrimaryCtxReset(device)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver error {err}")
    except Exception as err:
        bench.log(f"could not reset the broken CUDA context ({_short(err)}); its memory stays held")
        return False
    return True


def rerun(bench: Bench, plan: tuple[list[str], list[str]], copy_gbps: float, gemm_tflops: float) -> bool:
    """Run `plan` in a fresh process (same options and ceilings) and merge its rows: for the re-run shapes,
    this process keeps only the rows of the implementations left out (they say what broke); the fresh
    process supplies every other row. True when the fresh process completed."""
    args = bench.args
    shapes, impls = plan
    elapsed = time.perf_counter() - bench.start
    dtype_flag = next(name for name, dtype in DTYPES.items() if dtype == args.dtype)
    left_out = sorted(set(args.impls) - set(impls))
    bench.log(
        f"re-running {','.join(shapes)} without {','.join(left_out)} in a fresh process "
        f"(the CUDA context broke in {bench.broken_by[1] if bench.broken_by else '?'})"
    )
    with tempfile.TemporaryDirectory(prefix="moe_bench_rerun_") as tmp:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--out", tmp,
            "--device", args.device.type,
            "--dtype", dtype_flag,
            "--shapes", ",".join(shapes),
            "--impls", ",".join(impls),
            "--tokens", ",".join(map(str, args.tokens)),
            "--repeats", str(args.repeats),
            "--warmup", str(args.warmup),
            "--skew-tokens", str(args.skew_tokens),
            "--graph-max-tokens", str(args.graph_max_tokens),
            "--compile-budget-s", f"{max(0.0, args.compile_budget_s - bench.compile_spent):.1f}",
            "--impl-budget-s", str(args.impl_budget_s),
            "--budget-s", f"{max(0.0, args.budget_s - elapsed):.1f}",
            "--deadline-s", f"{max(1.0, args.deadline_s - elapsed):.1f}" if args.deadline_s > 0 else "0",
            "--batched-mm-max-gb", str(args.batched_mm_max_gb),
            "--seed", str(args.seed),
            "--ceilings", f"{copy_gbps!r},{gemm_tflops!r}",
            "--no-rerun",
        ]  # fmt: skip
        argv += [f"--bundle={name}={path}" for name, path in args.bundles.items()]
        argv += ["--quick"] if args.quick else []
        argv += ["--traceback"] if args.traceback else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(argv, env=env, check=False)
        child_path = Path(tmp) / "results.json"
        child = json.loads(child_path.read_text()) if child_path.is_file() else None
    if child is None:
        bench.log(f"the fresh process wrote no results (exit {proc.returncode}); rows stay as they are")
        return False
    bench.rows = merge_rerun(bench.rows, child["rows"], shapes, left_out, args.shapes)
    for name, info in child.get("moetrt_kernels", {}).items():
        bench.kernel_info.setdefault(name, info)
    bench.reruns.append(
        {
            "shapes": shapes,
            "impls": impls,
            "reason": f"{bench.broken_by[1] if bench.broken_by else '?'} broke the CUDA context "
            f"({bench.cuda_broken})",
            "complete": bool(child.get("complete")),
        }
    )
    return proc.returncode == 0 and bool(child.get("complete"))


def merge_rerun(
    rows: list[dict[str, Any]],
    rerun_rows: list[dict[str, Any]],
    rerun_shapes: list[str],
    left_out: list[str],
    all_shapes: list[str],
) -> list[dict[str, Any]]:
    """This process's rows with the re-run shapes' rows replaced by the fresh process's, except those of the
    implementations left out of the re-run (they hold the error that broke the context)."""
    kept = [r for r in rows if r["shape"] not in rerun_shapes or impl_option(r["impl"]) in left_out]
    for row in rerun_rows:
        _add_note(row, "fresh process after the CUDA context broke")
    return _ordered(kept + rerun_rows, all_shapes)


def _ordered(rows: list[dict[str, Any]], shapes: list[str]) -> list[dict[str, Any]]:
    """Rows grouped by shape in run order, then by routing and T (stable within a group)."""
    order = {name: i for i, name in enumerate(shapes)}
    return sorted(rows, key=lambda r: (order.get(r["shape"], len(order)), r["routing"] != "random", r["T"]))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return run(args)
    except MoetrtError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
