"""The TensorRT plugin's enqueue path on a real GPU, called the way TensorRT calls it: raw device pointers in
the op's input order, a raw CUDA stream handle and a workspace sized by the plugin's `get_workspace_size` rule
for the profile's max tokens. Kernels come out of the plugin's serialized fields (fields → bundle → launcher),
exactly as at engine deserialization. Compared with the PyTorch reference on several shapes and dtypes.

Run on a CUDA machine: `python -m pytest -m gpu tests/gpu/test_plugin_enqueue.py -v`.
"""

from __future__ import annotations

import os

import pytest
import torch

from moetrt.core import dtypes
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.op.presets import like
from moetrt.op.reference import moe_reference, random_inputs
from moetrt.op.spec import MoEAttributes
from moetrt.trt import io_rules
from moetrt.trt.fields import PluginState, state_from_fields, state_to_fields
from moetrt.trt.plugin import _launcher, compile_kernel_bytes, current_sm, field_arrays

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VARIANTS = {
    "qwen3_next_like": like("qwen3_next", 64, 10, 256, 128, output_router_logits=True),
    "mixtral_like": like("mixtral", 8, 2, 256, 512, norm_topk_prob=False),
    "deepseek_like": like("deepseek_v3", 32, 4, 128, 64, n_group=4, topk_group=2),
    "gpt_oss_like": like("gpt_oss_20b", 16, 4, 128, 128),
}
TOKENS = (1, 7, 64, 333)
MAX_TOKENS = 512


def _deserialized_state(attrs: MoEAttributes, dtype: str) -> PluginState:
    """Build-phase state (cubins for this GPU) → serialized fields → runtime-phase state."""
    sm = current_sm()
    workers = min(8, os.cpu_count() or 1)
    built = PluginState(attrs, dtype, {sm: compile_kernel_bytes(attrs, dtype, sm, workers=workers)})
    return state_from_fields(field_arrays(state_to_fields(built)))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", dtypes.NAMES)
def test_enqueue_matches_reference(variant: str, dtype: str) -> None:
    attrs = VARIANTS[variant]
    state = _deserialized_state(attrs, dtype)
    launcher = _launcher(state.bundle_for(current_sm()), state.attrs)
    # As the plugin's get_workspace_size does for a profile of 1..MAX_TOKENS tokens.
    bounds = [bucket["bound"] for bucket in launcher.bundle.buckets.values()]
    workspace_bytes = io_rules.workspace_size(
        launcher, (MAX_TOKENS, attrs.hidden_size), (1, attrs.hidden_size), bounds
    )
    workspace = torch.empty(max(workspace_bytes, 256), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()  # not the default stream: the plugin must use the one it is given
    torch_dtype = dtypes.precision(dtype).torch
    for tokens in TOKENS:
        assert launcher.workspace_size(tokens) <= workspace_bytes, (tokens, workspace_bytes)
        inputs = random_inputs(attrs, tokens, dtype=torch_dtype, device="cuda", seed=tokens)
        ordered = [inputs[name].contiguous() for name in attrs.present_inputs()]
        outputs = [torch.full((tokens, attrs.hidden_size), float("nan"), dtype=torch_dtype, device="cuda")]
        if attrs.output_router_logits:
            outputs.append(
                torch.full((tokens, attrs.num_experts), float("nan"), dtype=torch_dtype, device="cuda")
            )
        in_descs = [io_rules.TensorDesc(tuple(t.shape), dtype) for t in ordered]
        out_descs = [io_rules.TensorDesc(tuple(t.shape), dtype) for t in outputs]
        torch.cuda.synchronize()
        call = io_rules.enqueue_call(
            state.attrs,
            state.dtype,
            in_descs,
            out_descs,
            [t.data_ptr() for t in ordered],
            [t.data_ptr() for t in outputs],
            workspace.data_ptr(),
            stream.cuda_stream,
        )
        io_rules.enqueue(launcher, call)
        stream.synchronize()
        reference = moe_reference({k: v.cpu() for k, v in inputs.items()}, attrs)
        for name, out in zip(attrs.present_outputs(), outputs):
            assert torch.isfinite(out.float()).all(), (variant, dtype, tokens, name)
            err = relative_error(out.cpu(), reference[name])
            print(f"{variant} {dtype} T={tokens} {name}: rel err {err:.2e}")
            assert err <= tolerance(dtype), (variant, dtype, tokens, name, err)


def test_enqueue_zero_tokens_touches_nothing() -> None:
    attrs = VARIANTS["mixtral_like"]
    state = _deserialized_state(attrs, "fp16")
    launcher = _launcher(state.bundle_for(current_sm()), state.attrs)
    descs = [
        io_rules.TensorDesc(tuple(0 if d == "T" else d for d in s), "fp16")
        for s in attrs.input_shapes("T").values()
    ]
    call = io_rules.enqueue_call(
        state.attrs,
        "fp16",
        descs,
        [io_rules.TensorDesc((0, 256), "fp16")],
        [256] * len(descs),
        [256],
        256,
        torch.cuda.current_stream().cuda_stream,
    )
    assert call is None
    io_rules.enqueue(launcher, call)  # no launch, no error
