"""The one metric and its bounds: numpy and torch agree, non-finite or misshapen outputs never pass."""

from __future__ import annotations

import math

import numpy as np
import torch

from moetrt.core.tolerances import TOLERANCES, max_abs_error, relative_error, tolerance


def test_bounds_by_precision_in_any_spelling() -> None:
    assert TOLERANCES == {"fp32": 1e-5, "fp16": 5e-3, "bf16": 1e-2}
    assert tolerance(torch.bfloat16) == tolerance("bfloat16") == 1e-2 and tolerance("float16") == 5e-3


def test_relative_error_numpy_and_torch_agree() -> None:
    want = np.random.default_rng(0).standard_normal((4, 8))
    got = want * (1 + 1e-3)
    expected = 1e-3
    assert math.isclose(relative_error(got, want), expected, rel_tol=1e-9)
    assert math.isclose(relative_error(torch.from_numpy(got), torch.from_numpy(want)), expected, rel_tol=1e-9)
    assert math.isclose(max_abs_error(got, want), float(np.abs(got - want).max()))


def test_non_finite_misshapen_and_zero_references() -> None:
    want = np.ones((2, 3))
    assert relative_error(np.full((2, 3), np.nan), want) == math.inf
    assert relative_error(np.ones((3, 2)), want) == math.inf
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.ones(3), np.zeros(3)) == math.inf
