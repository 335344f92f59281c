"""The router kernels' two forms of their weights: the whole slice loaded before the wait, or streamed in a K loop.

A router program whose weight slice (BE x its share of H, padded to a power of two) holds at most
plan.ROUTER_PRELOAD_ELEMENTS elements loads it before its programmatic-dependent-launch wait
(`triton_moe._router_weights_first`), larger slices stream in the loop. The op runs under Triton's CPU
interpreter (a child process, as in test_kernels.py) with router tiles that take each form, one of them with a
slice padded past its columns and a last slice past H (H = 1000), in float32, against the reference's logits and
output.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from moetrt.core.tolerances import tolerance
from moetrt.op.spec import MoEAttributes

ATTRS = MoEAttributes(
    8,
    2,
    1000,
    32,
    norm_topk_prob=True,
    shared_intermediate_size=32,
    has_shared_gate=True,
    output_router_logits=True,
)
# (name, router tile, loads the slice before the wait)
FORMS = [
    ("loop", {"BE": 16, "BK": 64, "SPLIT": 1}, False),  # 16 x 1024 columns: past the limit
    ("whole_padded", {"BE": 16, "BK": 64, "SPLIT": 3}, True),  # 384 columns padded to 512; the last past H
    ("whole_exact", {"BE": 8, "BK": 32, "SPLIT": 2}, True),
]
TOKENS = 3


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from moetrt_testing.interpreter import run_in_interpreter

    return run_in_interpreter(__file__)


@pytest.mark.parametrize("form", FORMS, ids=lambda form: form[0])
def test_router_forms_match_the_reference(
    form: tuple[str, dict[str, int], bool], results: dict[str, Any]
) -> None:
    from moetrt.kernels.triton_moe import _router_preloads

    name, tile, preloads = form
    assert bool(_router_preloads(ATTRS.hidden_size, tile["SPLIT"], tile["BE"], tile["BK"])) == preloads
    out = results[name]
    assert out["logits_err"] <= tolerance("fp32"), out
    assert out["output_err"] <= tolerance("fp32"), out


def _child() -> dict[str, Any]:
    import torch

    from moetrt.core.tolerances import relative_error
    from moetrt.kernels.configs import default_config
    from moetrt.kernels.plan import bucket_of
    from moetrt.kernels.torch_ops import moe_forward_triton
    from moetrt.op.reference import moe_reference, random_inputs

    inputs = random_inputs(ATTRS, TOKENS, dtype=torch.float32, seed=7)
    want = moe_reference(inputs, ATTRS)
    out = {}
    for name, tile, _preloads in FORMS:
        config = default_config(ATTRS, "float32", bucket_of(TOKENS))
        config["router"].update(tile)
        got = moe_forward_triton(inputs, ATTRS, config)
        out[name] = {
            "logits_err": relative_error(got["router_logits"], want["router_logits"]),
            "output_err": relative_error(got["output"], want["output"]),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(_child()))
    sys.exit(0)
