"""GPU: the kernels' routing (`triton_common.select_experts`) compiled and run on the device for every routing case
of tests/moetrt_testing/routing_cases.py, against the op's reference (the CPU test, tests/test_select_experts.py,
runs them under Triton's interpreter, whose reductions never combine two partial (best, second) pairs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from moetrt_testing.routing_cases import CASES, check_case, check_ties, run_case

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return {case[0]: run_case(case, "cuda") for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
def test_kernel_routing_equals_reference_on_the_gpu(case: tuple[Any, ...], results: dict[str, Any]) -> None:
    check_case(case, results[case[0]])


def test_exact_ties_take_the_lower_expert_first_on_the_gpu(results: dict[str, Any]) -> None:
    check_ties(results)
