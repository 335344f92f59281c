"""MoE inputs drawn on the GPU and the float32 reference of the op computed there, for real-size shapes.

Same scales as the oracle's `random_inputs` (`reference.input_scales`), drawn on the device because the oracle
draws on the CPU from one generator, which takes minutes at 22 GB; the reference upcasts one expert at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moetrt.op.spec import MoEAttributes


@dataclass(frozen=True)
class GpuReference:
    output: Any  # float32 [T, H]
    distinct_experts: int  # routed experts hit by at least one token


def gpu_random_inputs(
    attrs: MoEAttributes, num_tokens: int, dtype: Any, seed: int = 0, names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Random (never zero) CUDA inputs with the oracle's scales, drawn on the GPU (real shapes hold GBs).

    `names` limits which inputs are drawn (e.g. only hidden_states over weights drawn once)."""
    import torch

    from moetrt.op.reference import input_scales

    gen = torch.Generator(device="cuda").manual_seed(seed)
    scales = input_scales(attrs)
    out = {}
    wanted = set(names) if names is not None else None
    for name, shape in attrs.input_shapes(num_tokens).items():
        if wanted is not None and name not in wanted:
            continue
        tensor = torch.empty(shape, dtype=dtype, device="cuda")  # type: ignore[arg-type]
        flat = tensor.view(-1)
        for lo in range(
            0, flat.numel(), 1 << 28
        ):  # chunks: a float32 copy of the largest weights would not fit
            hi = min(flat.numel(), lo + (1 << 28))
            flat[lo:hi] = (torch.randn(hi - lo, generator=gen, device="cuda") * scales[name]).to(dtype)
        out[name] = tensor
    return out


#: Experts quantized at a time on the GPU (MXFP4's nearest-code search holds 8 floats per weight).
QUANTIZE_CHUNK = 32


def gpu_quantized_experts(native: dict[str, Any], attrs: MoEAttributes) -> dict[str, Any]:
    """The op's inputs with the routed experts quantized to attrs' format, round to nearest on the GPU, QUANTIZE_CHUNK
    experts at a time. `native` holds the native-weight inputs (gpu_random_inputs of the native op); native attrs:
    `native` itself."""
    import torch

    from moetrt.op import quant

    if not attrs.is_quantized:
        return native
    inputs = dict(native)
    for which in ("gate_up", "down"):
        weight = native[f"expert_{which}_weight"]
        parts = [
            quant.quantize(
                attrs.weight_format,
                attrs.weight_block,
                weight[lo : lo + QUANTIZE_CHUNK],
                attrs.has_weight_zero_point,
            )
            for lo in range(0, weight.shape[0], QUANTIZE_CHUNK)
        ]
        inputs[f"expert_{which}_weight"] = torch.cat([q.codes for q in parts])
        inputs[f"expert_{which}_scale"] = torch.cat([q.scale for q in parts])
        if attrs.has_weight_zero_point:
            inputs[f"expert_{which}_zero"] = torch.cat([q.zero for q in parts])
    return inputs


def gpu_quantized_inputs(
    native: dict[str, Any], attrs: MoEAttributes
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`gpu_quantized_experts`, the same inputs with those experts dequantized to float32 for `gpu_reference` of
    `attrs.with_native_weights()`). Native attrs: `native` twice."""
    import torch

    from moetrt.op import quant

    inputs = gpu_quantized_experts(native, attrs)
    if not attrs.is_quantized:
        return native, native
    oracle = dict(native)
    for which in ("gate_up", "down"):
        shape = native[f"expert_{which}_weight"].shape
        codes, scale = inputs[f"expert_{which}_weight"], inputs[f"expert_{which}_scale"]
        zero = inputs.get(f"expert_{which}_zero")
        # written chunk by chunk into one float32 tensor: a list of chunks and their concatenation would hold
        # the experts twice (DeepSeek-V3's gate_up: 2 x 28 GB)
        dequantized = torch.empty(shape, dtype=torch.float32, device=codes.device)
        for lo in range(0, shape[0], QUANTIZE_CHUNK):
            hi = lo + QUANTIZE_CHUNK
            chunk = quant.QuantizedWeight(codes[lo:hi], scale[lo:hi], None if zero is None else zero[lo:hi])
            dequantized[lo:hi] = quant.dequantize(attrs.weight_format, attrs.weight_block, chunk, shape[-1])
        oracle[f"expert_{which}_weight"] = dequantized
    return inputs, oracle


def gpu_reference(
    inputs: dict[str, Any], attrs: MoEAttributes, fp8_activation_block: int = 0
) -> GpuReference:
    """float32 output of the op on CUDA inputs with the oracle's routing and activation, one expert at a time
    (moe_reference upcasts every weight at once, which does not fit at real sizes). `fp8_activation_block`: the
    routed experts' inputs quantized as fp8 activations are (a quantized op's `fp8_activation_block`, with
    `attrs` its `with_native_weights()` and the inputs its dequantized copy)."""
    import torch
    import torch.nn.functional as F

    from moetrt.op.reference import expert_activations, glu_activation, route, shared_expert

    io_dtype = inputs["hidden_states"].dtype

    x = inputs["hidden_states"].float()
    bias = inputs.get("router_bias")
    logits = F.linear(x, inputs["router_weight"].float(), None if bias is None else bias.float())
    scb = inputs.get("score_correction_bias")
    weights, ids = route(logits, attrs, None if scb is None else scb.float())
    out = torch.zeros_like(x)
    experts = torch.unique(ids).tolist()
    for e in experts:
        token_idx, slot = torch.where(ids == e)
        gu_b = inputs["expert_gate_up_bias"][e].float() if attrs.has_expert_bias else None
        d_b = inputs["expert_down_bias"][e].float() if attrs.has_expert_bias else None
        h = expert_activations(x[token_idx], fp8_activation_block, io_dtype)
        gate_up = F.linear(h, inputs["expert_gate_up_weight"][e].float(), gu_b)
        act = expert_activations(glu_activation(gate_up, attrs), fp8_activation_block, io_dtype)
        y = F.linear(act, inputs["expert_down_weight"][e].float(), d_b)
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    if attrs.has_shared_expert:
        gate_w = inputs["shared_gate_weight"].float() if attrs.has_shared_gate else None
        out += shared_expert(
            x, inputs["shared_gate_up_weight"].float(), inputs["shared_down_weight"].float(), gate_w
        )
    return GpuReference(out, len(experts))
