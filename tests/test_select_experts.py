"""The kernels' routing (`triton_common.select_experts`) against the op's reference (`op.reference.route`).

A small kernel routes random float32 logits through `select_experts` under Triton's CPU interpreter (in a child
process, as in test_kernels.py) for every routing form the op has (tests/moetrt_testing/routing_cases.py):
softmax with and without renormalisation, sigmoid, top-k before the softmax, a correction bias with expert
groups and scaling, odd and even top-k, one and several tokens per program. The expert ids must equal the
reference's, in its order, and the weights must match to float32 rounding. Inputs hold no near-ties (choice
values within float32 rounding of each other, which either side may break its own way); exact ties (equal
logits) are tested against the stable order, the lower expert id first, which the kernel promises and
torch.topk does not. tests/gpu/test_gpu_select_experts.py runs the same cases on a GPU.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from moetrt_testing.routing_cases import CASES, check_case, check_ties, run_case


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from moetrt_testing.interpreter import run_in_interpreter

    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
def test_kernel_routing_equals_reference(case: tuple[Any, ...], results: dict[str, Any]) -> None:
    check_case(case, results[case[0]])


def test_exact_ties_take_the_lower_expert_first(results: dict[str, Any]) -> None:
    check_ties(results)


if __name__ == "__main__":
    out: dict[str, Any] = {case[0]: run_case(case) for case in CASES}
    print(json.dumps(out))
    sys.exit(0)
