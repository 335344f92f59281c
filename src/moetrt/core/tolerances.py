"""How close is close enough, and how closeness is measured: one metric and one bound per precision.

The metric is the relative norm error ``‖got − want‖ / ‖want‖`` computed in float64, against a float32 (or
float64) reference. Verify, build parity, the fusion check, the tuner, the GPU parity script and the benchmark
all judge with these.
"""

from __future__ import annotations

import math
from typing import Any

from moetrt.core.dtypes import Precision, precision

#: Relative norm error allowed for an output computed in each precision.
TOLERANCES: dict[str, float] = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 1e-2}

#: Relative error allowed between an ONNX block and its fused form (or an activation subgraph and the op's
#: formula) when the fusion pass checks them; both run in float32 (half graphs are widened), so the bound is
#: tight: only the op's own float32 rounding differs.
FUSION_CHECK_TOLERANCE = 1e-4


def tolerance(dtype: str | Precision | Any) -> float:
    """The bound for a precision, named any way `dtypes.precision` accepts."""
    return TOLERANCES[precision(dtype).name]


def relative_error(got: Any, want: Any) -> float:
    """‖got − want‖ / ‖want‖ in float64 (numpy arrays or torch tensors, any device); inf when `got` is not
    finite or the shapes differ; 0 for two zero tensors."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf
    if hasattr(got, "detach"):  # torch
        got64, want64 = got.detach().double(), want.detach().to(got.device).double()
        if not bool(got64.isfinite().all()):
            return math.inf
        diff, ref = float((got64 - want64).norm()), float(want64.norm())
    else:
        import numpy as np

        got64, want64 = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if not np.isfinite(got64).all():
            return math.inf
        diff, ref = float(np.linalg.norm(got64 - want64)), float(np.linalg.norm(want64))
    if ref > 0:
        return diff / ref
    return 0.0 if diff == 0 else math.inf


def max_abs_error(got: Any, want: Any) -> float:
    """Largest absolute difference in float64 (0 for empty tensors)."""
    if hasattr(got, "detach"):
        diff = (got.detach().double() - want.detach().to(got.device).double()).abs()
        return float(diff.max()) if diff.numel() else 0.0
    import numpy as np

    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))
    return float(diff.max()) if diff.size else 0.0
