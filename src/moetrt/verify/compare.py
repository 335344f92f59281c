"""The one comparator: an output against its reference, as a `VerifyRow`, and the report of many rows.

`moetrt verify`, build parity and `verify_loaded` (engines, onnxruntime sessions) all judge with it; the metric
and the bounds are `core.tolerances`'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moetrt.core.progress import quiet_loggers
from moetrt.core.tolerances import max_abs_error, relative_error

#: (batch, seq), or (batch, seq, past) for a cached decoder: seq new tokens after past earlier ones.
Shape = tuple[int, ...]


def shape_text(shape: Shape) -> str:
    """`2x16`, or `2x1+130` for one new token after 130 earlier ones."""
    text = f"{shape[0]}x{shape[1]}"
    return f"{text}+{shape[2]}" if len(shape) > 2 else text


def past_of(shape: Shape) -> int:
    return shape[2] if len(shape) > 2 else 0


@dataclass(frozen=True)
class VerifyRow:
    shape: Shape  # (batch, seq) or (batch, seq, past)
    output: str
    max_abs_err: float
    rel_err: float
    tolerance: float
    passed: bool
    note: str = ""


@dataclass
class VerifyReport:
    artifact: str
    reference: str
    dtype: str
    rows: list[VerifyRow] = field(default_factory=list)
    seconds: float = 0.0
    #: lines printed under the table: what a diagnosis found (routing flips, layers, the dtype)
    findings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    def format_table(self) -> str:
        header = ("shape", "output", "max abs err", "rel err", "tolerance", "result")
        lines = [
            (
                shape_text(row.shape),
                row.output,
                f"{row.max_abs_err:.3e}",
                f"{row.rel_err:.3e}",
                f"{row.tolerance:.0e} ({self.dtype})",
                ("PASS" if row.passed else "FAIL") + (f" ({row.note})" if row.note else ""),
            )
            for row in self.rows
        ]
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        out = [line.rstrip() for line in out]
        out += self.findings
        verdict = "PASS" if self.passed else "FAIL"
        failed = sum(not row.passed for row in self.rows)
        out.append(
            f"{verdict}: {len(self.rows) - failed}/{len(self.rows)} checks within tolerance "
            f"({self.artifact} vs {self.reference}, {self.seconds:.1f} s)"
        )
        return "\n".join(out)


def default_shapes(example_shape: Shape, long_seq: int, decoder: bool = False) -> list[Shape]:
    """Batch 1; a batch above the export example; a sequence that crosses every internal chunk. A cached
    decoder adds a prefill after earlier tokens and two decode steps (one token after a short and after a long
    past), each past computed by the reference model itself."""
    example_batch, example_seq = example_shape[:2]
    shapes: list[Shape] = [(1, 7), (example_batch + 1, 16), (2, max(long_seq, example_seq + 1))]
    if decoder:
        shapes = [(b, s, 0) for b, s in shapes] + [(2, 16, 9), (1, 1, 7), (2, 1, max(long_seq, 16))]
    return shapes


def compare_outputs(out: Any, ref: Any, shape: Shape, name: str, tolerance: float) -> VerifyRow:
    """One row: relative norm error of `out` (numpy or torch) against `ref`; misshapen or non-finite fails."""
    if tuple(out.shape) != tuple(ref.shape):
        note = f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        return VerifyRow(shape, name, float("inf"), float("inf"), tolerance, False, note)
    if hasattr(out, "detach"):  # torch tensors on any device: compared on the CPU
        out, ref = out.detach().cpu(), ref.detach().cpu()
    rel = relative_error(out, ref)
    if rel == float("inf") and not _all_finite(out):
        return VerifyRow(shape, name, float("inf"), float("inf"), tolerance, False, "non-finite output")
    return VerifyRow(shape, name, max_abs_error(out, ref), rel, tolerance, rel <= tolerance)


def _all_finite(values: Any) -> bool:
    if hasattr(values, "detach"):
        return bool(values.double().isfinite().all())
    import numpy as np

    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Polygraphy logs every iteration (and a missing-colour warning) to stdout: keep only errors, and
    quiet transformers too."""
    from polygraphy.logger import G_LOGGER

    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        with quiet_loggers("transformers"):
            yield
    finally:
        G_LOGGER.module_severity = severity
