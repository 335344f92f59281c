"""The benchmark's MoE shapes, their random inputs, and the float32 references the rows are checked against.

Token-dependent inputs (hidden states, router weights and biases) come from the oracle's own `random_inputs`, so
the skewed routing case is the oracle's recipe. Expert weights (gigabytes at real sizes) are drawn directly on the
device with the same scales: the oracle draws on the CPU from one generator, which takes minutes at 22 GB.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moetrt.core import tolerances
from moetrt.op.presets import PRESETS, like
from moetrt.op.reference import (
    glu_activation,
    input_scales,
    moe_reference,
    random_inputs,
    route,
    router_logits,
    shared_expert,
)
from moetrt.op.spec import FP8_BLOCK, NATIVE, WEIGHT_FORMATS, MoEAttributes
from moetrt.passes.quantize_experts import choose_block

TOKEN_INPUTS = ("hidden_states", "router_weight", "router_bias", "score_correction_bias")


@dataclass(frozen=True)
class Shape:
    """One benchmarked MoE block: `family` picks the transformers block that computes the same function."""

    name: str
    family: str  # qwen3_next | qwen3_moe | mixtral | deepseek_v3 | gpt_oss
    attrs: MoEAttributes
    summary: str


# The real shapes are the package's presets (`moetrt tune/aot --preset`), so bench and tuning agree.
_ALL = (
    Shape(
        "qwen3_next",
        "qwen3_next",
        PRESETS["qwen3_next"],
        "E512 k10 H2048 I512, shared I512 + sigmoid gate, softmax+renorm",
    ),
    Shape("qwen3_30b", "qwen3_moe", PRESETS["qwen3_30b"], "E128 k8 H2048 I768, softmax+renorm"),
    Shape("mixtral", "mixtral", PRESETS["mixtral"], "E8 k2 H4096 I14336, softmax top-2"),
    Shape(
        "deepseek_v3",
        "deepseek_v3",
        PRESETS["deepseek_v3"],
        "E256 k8 H7168 I2048, sigmoid+bias, groups 8/4, scale 2.5, shared I2048",
    ),
    Shape(
        "gpt_oss_20b",
        "gpt_oss",
        PRESETS["gpt_oss_20b"],
        "E32 k4 H2880 I2880, biases, clamped SwiGLU, top-k then softmax",
    ),
    # Same variants at toy sizes: the CPU smoke test runs these.
    Shape("tiny_qwen3_next", "qwen3_next", like("qwen3_next", 16, 4, 64, 32), "tiny qwen3_next"),
    Shape("tiny_qwen3_30b", "qwen3_moe", like("qwen3_30b", 16, 4, 64, 48), "tiny qwen3_30b"),
    Shape("tiny_mixtral", "mixtral", like("mixtral", 8, 2, 64, 96), "tiny mixtral"),
    Shape(
        "tiny_deepseek_v3",
        "deepseek_v3",
        like("deepseek_v3", 16, 4, 64, 32, n_group=4, topk_group=2),
        "tiny deepseek_v3",
    ),
    Shape("tiny_gpt_oss", "gpt_oss", like("gpt_oss_20b", 8, 2, 64, 64), "tiny gpt_oss"),
)
SHAPES: dict[str, Shape] = {shape.name: shape for shape in _ALL}
GPU_DEFAULT_SHAPES = ("qwen3_next", "qwen3_30b", "mixtral", "deepseek_v3", "gpt_oss_20b")
CPU_DEFAULT_SHAPES = tuple(
    f"tiny_{name}" for name in ("qwen3_next", "qwen3_30b", "mixtral", "deepseek_v3", "gpt_oss")
)


def weight_bytes(attrs: MoEAttributes, itemsize: int) -> int:
    """Bytes of every expert and shared-expert weight (one copy)."""
    shapes = attrs.input_shapes(1)
    total = 0
    for name, shape in shapes.items():
        if name in TOKEN_INPUTS:
            continue
        count = 1
        for dim in shape:
            count *= int(dim)
        total += count
    return total * itemsize


def make_weights(
    attrs: MoEAttributes, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """Expert and shared-expert weights, random (never zero), drawn on `device` with the oracle's scales."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = input_scales(attrs)
    weights = {}
    for name, shape in attrs.input_shapes(1).items():
        if name in TOKEN_INPUTS:
            continue
        tensor = torch.randn(tuple(int(d) for d in shape), generator=gen, dtype=dtype, device=device)
        weights[name] = tensor.mul_(scales[name])
    return weights


def make_token_inputs(
    attrs: MoEAttributes, num_tokens: int, dtype: torch.dtype, device: torch.device, seed: int, skew: float
) -> dict[str, torch.Tensor]:
    """Hidden states and router inputs from the oracle's `random_inputs` (its skew recipe included)."""
    # Only the router-side tensors are taken; a one-wide expert keeps the oracle's draw cheap.
    slim = dataclasses.replace(attrs, intermediate_size=1, shared_intermediate_size=0, has_shared_gate=False)
    drawn = random_inputs(slim, num_tokens, dtype=dtype, device="cpu", seed=seed, skew=skew)
    return {name: drawn[name].to(device) for name in TOKEN_INPUTS if name in drawn}


def assemble(
    attrs: MoEAttributes, tokens: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The op's named inputs (only those present, as spec.INPUT_ORDER lists them)."""
    merged = {**weights, **tokens}
    return {name: merged[name] for name in attrs.present_inputs()}


def _float_or_none(inputs: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    return inputs[name].float() if name in inputs else None


def oracle_logits(inputs: dict[str, torch.Tensor], attrs: MoEAttributes) -> torch.Tensor:
    """Router logits in float32 from the (low-precision) inputs, as the oracle computes them."""
    return router_logits(
        inputs["hidden_states"].float(),
        inputs["router_weight"].float(),
        _float_or_none(inputs, "router_bias"),
    )


def oracle_routing(
    inputs: dict[str, torch.Tensor], attrs: MoEAttributes, logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = oracle_logits(inputs, attrs) if logits is None else logits
    return route(logits, attrs, _float_or_none(inputs, "score_correction_bias"))


def distinct_experts(inputs: dict[str, torch.Tensor], attrs: MoEAttributes) -> int:
    """How many different experts the oracle's routing sends at least one token to."""
    _, ids = oracle_routing(inputs, attrs)
    return int(torch.unique(ids).numel())


def reference_output(inputs: dict[str, torch.Tensor], attrs: MoEAttributes) -> torch.Tensor:
    """The oracle's float32 output [T, H] (moe_reference computes in float32; its result is kept in float32)."""
    upcast = {name: tensor.float() if name == "hidden_states" else tensor for name, tensor in inputs.items()}
    return moe_reference(upcast, attrs, compute_dtype=torch.float32)["output"]


def reference_output_rounded_router(
    inputs: dict[str, torch.Tensor], attrs: MoEAttributes
) -> tuple[torch.Tensor, float]:
    """Float32 output with routing decided on router logits rounded to the inputs' dtype.

    A router GEMM in bf16/fp16 rounds its logits, which flips the top-k choice on tokens whose k-th and
    (k+1)-th scores lie closer than that rounding (about 7 % of tokens for Qwen3-Next at bf16). Both choices are
    correct roundings of the same block; this second reference is the one such an implementation follows.
    Returns (output, fraction of tokens whose expert set differs from the oracle's routing).
    """
    dtype = inputs["hidden_states"].dtype
    _, ids = oracle_routing(inputs, attrs, oracle_logits(inputs, attrs).to(dtype).float())
    return reference_output_routed(inputs, attrs, ids)


def routing_differs(inputs: dict[str, torch.Tensor], attrs: MoEAttributes, ids: torch.Tensor) -> float:
    """Fraction of tokens whose expert set under `ids` [T, k] differs from the oracle's routing."""
    _, oracle_ids = oracle_routing(inputs, attrs)
    differs = (ids.long().sort(dim=-1).values != oracle_ids.sort(dim=-1).values).any(dim=-1)
    return float(differs.float().mean().item()) if differs.numel() else 0.0


def reference_output_routed(
    inputs: dict[str, torch.Tensor], attrs: MoEAttributes, ids: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Float32 output of the block when tokens go to the experts `ids` [T, k] (another implementation's
    choice), their weights computed by the oracle for that choice (op.reference.route with ids).
    Returns (output, fraction of tokens whose expert set differs from the oracle's routing)."""
    ids = ids.long()
    weights, _ = route(
        oracle_logits(inputs, attrs), attrs, _float_or_none(inputs, "score_correction_bias"), ids=ids
    )
    hidden = inputs["hidden_states"].float()
    out = torch.zeros_like(hidden)
    # Same expert loop as the oracle, upcasting one expert at a time (the full float32 copy is already
    # the memory peak of a row).
    for expert in torch.unique(ids).tolist():
        token_idx, slot = torch.where(ids == expert)
        gate_up = torch.nn.functional.linear(
            hidden[token_idx],
            inputs["expert_gate_up_weight"][expert].float(),
            inputs["expert_gate_up_bias"][expert].float() if "expert_gate_up_bias" in inputs else None,
        )
        y = torch.nn.functional.linear(
            glu_activation(gate_up, attrs),
            inputs["expert_down_weight"][expert].float(),
            inputs["expert_down_bias"][expert].float() if "expert_down_bias" in inputs else None,
        )
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    if attrs.has_shared_expert:
        out = out + shared_expert(
            hidden,
            inputs["shared_gate_up_weight"].float(),
            inputs["shared_down_weight"].float(),
            _float_or_none(inputs, "shared_gate_weight"),
        )
    return out, routing_differs(inputs, attrs, ids)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    """The library's metric (core.tolerances); None when the output holds NaN/Inf (never a pass)."""
    err = tolerances.relative_error(out.detach().reshape(ref.shape), ref)
    return None if math.isinf(err) else err


#: The --formats entries the quantized benchmarks take: a weight format, or fp8 weights with fp8 activations.
FORMAT_ENTRIES = (*WEIGHT_FORMATS, f"{FP8_BLOCK}+a8")


def with_weight_format(base: MoEAttributes, entry: str) -> MoEAttributes:
    """`base` with its routed experts in a --formats entry's format ("native", "fp8_block", "int4", "mxfp4", at
    the block `moetrt build` and `moetrt tune` choose: the default, or the largest that divides the shape's
    reductions, e.g. int4 groups of 64 for GPT-OSS's 2880), "+a8" adding fp8 activations ("fp8_block+a8")."""
    fmt, _, acts = entry.partition("+")
    return dataclasses.replace(
        base,
        weight_format=fmt,
        weight_block=choose_block(fmt, base, None) if fmt != NATIVE else 0,
        activation_format=FP8_BLOCK if acts == "a8" else NATIVE,
    )
