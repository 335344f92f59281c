"""Lower bounds on one MoE block call: the bytes it must move and the FLOPs it must do, over measured ceilings.

Bytes count each tensor read or written once: the weights of the distinct experts the routing actually hits
(a token-expert pair on an expert already loaded costs no more weight traffic), the shared expert, the router,
the input activations and the output. FLOPs count the three expert GEMMs per token-expert pair, the shared
expert and the router (elementwise work is negligible next to them).
"""

from __future__ import annotations

import math

from moetrt.op.spec import MoEAttributes, stored_dtype


def expert_bytes(attrs: MoEAttributes, itemsize: int) -> int:
    """One routed expert: gate_up [2I, H] + down [H, I] (+ biases [2I] and [H]); quantized experts count their
    codes, scales and zero points as stored (`spec.stored_dtype`), so the floor is the quantized one."""
    h, i = attrs.hidden_size, attrs.intermediate_size
    biases = ((2 * i + h) if attrs.has_expert_bias else 0) * itemsize
    if not attrs.is_quantized:
        return 3 * i * h * itemsize + biases
    stored = 0
    for name, shape in attrs.input_shapes(1).items():
        kind = stored_dtype(name, attrs)
        if kind is not None:  # one expert's part: the shape without the experts dimension
            stored += math.prod(int(d) for d in shape[1:]) * (4 if kind == "float32" else 1)
    return stored + biases


def shared_bytes(attrs: MoEAttributes, itemsize: int) -> int:
    h, s = attrs.hidden_size, attrs.shared_intermediate_size
    elements = 3 * s * h + (h if attrs.has_shared_gate else 0)
    return elements * itemsize


def router_bytes(attrs: MoEAttributes, itemsize: int) -> int:
    e, h = attrs.num_experts, attrs.hidden_size
    elements = e * h + (e if attrs.has_router_bias else 0) + (e if attrs.has_score_correction_bias else 0)
    return elements * itemsize


def activation_bytes(attrs: MoEAttributes, num_tokens: int, itemsize: int) -> int:
    """Hidden states read once, output written once (router logits too when the op returns them)."""
    elements = 2 * num_tokens * attrs.hidden_size
    if attrs.output_router_logits:
        elements += num_tokens * attrs.num_experts
    return elements * itemsize


def moe_bytes(attrs: MoEAttributes, num_tokens: int, distinct_experts: int, itemsize: int) -> int:
    if not 0 <= distinct_experts <= attrs.num_experts:
        raise ValueError(f"distinct_experts {distinct_experts} outside 0..{attrs.num_experts}")
    return (
        distinct_experts * expert_bytes(attrs, itemsize)
        + shared_bytes(attrs, itemsize)
        + router_bytes(attrs, itemsize)
        + activation_bytes(attrs, num_tokens, itemsize)
    )


def moe_flops(attrs: MoEAttributes, num_tokens: int) -> int:
    """Multiply-adds x 2 of the router, the routed experts (top_k per token) and the shared expert."""
    t, h, e = num_tokens, attrs.hidden_size, attrs.num_experts
    router = 2 * t * h * e
    experts = 2 * t * attrs.top_k * 3 * attrs.intermediate_size * h
    shared = 2 * t * 3 * attrs.shared_intermediate_size * h + (2 * t * h if attrs.has_shared_gate else 0)
    return router + experts + shared


def floor_us(num_bytes: int, flops: int, copy_gbps: float, gemm_tflops: float) -> float:
    """max(bytes / copy bandwidth, FLOPs / GEMM rate), in microseconds."""
    if copy_gbps <= 0 or gemm_tflops <= 0:
        raise ValueError("ceilings must be positive")
    return max(num_bytes / (copy_gbps * 1e9), flops / (gemm_tflops * 1e12)) * 1e6


def pct_of_floor(floor: float, time_us: float) -> float:
    """100 x floor / measured time: 100 means the call runs at the floor."""
    return 100.0 * floor / time_us
