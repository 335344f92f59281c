"""GPU timing shared by the tuner, the benchmark and the parity script: CUDA events around each call with L2
flushed before it, CUDA-graph replay, and the two ceilings (copy bandwidth, GEMM rate).

On the CPU (the benchmark's smoke test) a host clock stands in for the events; nothing else changes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_us: float
    min_us: float
    max_us: float
    repeats: int
    samples_us: tuple[float, ...] = ()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class L2Flusher:
    """Reads a buffer several times the L2 size, so the next call finds none of its data in L2.

    A read, not a write: a flush that writes leaves the L2 full of dirty lines, and the timed call then pays
    for writing them back to DRAM (measured on the H200: 5-8 µs of a one-token call, 35.6 µs becoming 40.8,
    bench/results/2026-12-04-h200-clean-flush). Serving never hands a MoE layer an L2 of 60 MB of dirty data.
    """

    def __init__(self, device: torch.device) -> None:
        self.buffer: torch.Tensor | None = None
        if device.type == "cuda":
            l2_bytes = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
            self.buffer = torch.ones(max(4 * l2_bytes, 64 << 20) // 4, dtype=torch.float32, device=device)
            self.sink = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            torch.sum(self.buffer, 0, out=self.sink)  # every byte read, nothing left dirty


def summarize(samples_us: Sequence[float]) -> Timing:
    return Timing(
        statistics.median(samples_us), min(samples_us), max(samples_us), len(samples_us), tuple(samples_us)
    )


def time_calls(
    calls: Sequence[Callable[[], object]],
    device: torch.device,
    repeats: int,
    flush: Callable[[], None] | None = None,
) -> Timing:
    """Time `repeats` calls, rotating over `calls` (one per weight copy); warm-up is the caller's job."""
    if device.type != "cuda":
        samples = []
        for rep in range(repeats):
            start = time.perf_counter()
            calls[rep % len(calls)]()
            samples.append((time.perf_counter() - start) * 1e6)
        return summarize(samples)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for rep in range(repeats):
        if flush is not None:
            flush()
        starts[rep].record()
        calls[rep % len(calls)]()
        ends[rep].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])


def wall_time_s(call: Callable[[], object], device: torch.device) -> float:
    """One synchronized call on the host clock (warm-up calls: compile time, cost of the eager loop)."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


class CapturedCall:
    """A callable captured into a CUDA graph; calling it replays the graph and returns the static output."""

    def __init__(self, call: Callable[[], torch.Tensor], device: torch.device, warmup: int = 2) -> None:
        # Warm up on a side stream first, as CUDA-graph capture requires (allocator, lazy init, autotuning),
        # and capture on that stream: a launcher's per-stream state exists there once a call has run.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                call()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.output = call()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def copy_bandwidth_gbps(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Device-to-device copy of `num_bytes`, counting bytes read + written."""
    count = num_bytes // 4
    src = torch.randn(count, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timing = time_calls([lambda: dst.copy_(src)], device, repeats)
    return 2 * count * 4 / (timing.median_us * 1e-6) / 1e9


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """A size^3 matrix product on random data in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    timing = time_calls([lambda: torch.mm(a, b, out=c)], device, repeats)
    return 2 * size**3 / (timing.median_us * 1e-6) / 1e12


def time_graph(call: Callable[[], object], repeats: int = 30, device: torch.device | None = None) -> Timing:
    """`call` captured into a CUDA graph and replayed `repeats` times, L2 flushed before each replay."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    captured = CapturedCall(call, device, warmup=1)  # type: ignore[arg-type]
    captured()
    return time_calls([captured], device, repeats, L2Flusher(device))
