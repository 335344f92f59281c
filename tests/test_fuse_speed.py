"""Item 8: the default Qwen3-Next demo fuses in <= 10 s, and fusion time grows linearly with depth.

The numbers for 2 / 8 / 32 layers are in docs/fusion_speed.md (`bench/fusion_speed.py`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
measure = importlib.import_module("fusion_speed").measure


@pytest.mark.slow
def test_fusion_time_is_bounded_and_linear_in_depth() -> None:
    shallow, deep = measure(2, repeat=2), measure(8, repeat=2)
    assert (shallow.fused, deep.fused) == (2, 8)  # every layer of the demo is an MoE layer
    assert shallow.seconds <= 10.0
    # 4x the layers: a linear pass takes at most ~4x (plus noise); a quadratic one would take ~16x.
    assert deep.seconds <= 6.0 * shallow.seconds, (shallow, deep)
