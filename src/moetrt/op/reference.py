"""PyTorch oracle for the fused MoE op: every attribute of the contract, computed in float32 (or float64).

This is the definition the ONNX function body, the Triton kernels and the TensorRT plugin are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetrt.op.spec import MoEAttributes


def router_logits(
    hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(hidden, router_weight, router_bias)


def choice_scores(
    logits: torch.Tensor, attrs: MoEAttributes, score_correction_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The [T, E] values the experts are selected on (top-k of these, groups masked to -inf), before any
    group masking: raw logits when top-k comes first, else the scores plus the correction bias."""
    if attrs.topk_before_score:
        return logits
    return _biased(_scores(logits, attrs), score_correction_bias)


def _scores(logits: torch.Tensor, attrs: MoEAttributes) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if attrs.scoring == "softmax" else torch.sigmoid(logits)


def _biased(scores: torch.Tensor, score_correction_bias: torch.Tensor | None) -> torch.Tensor:
    return scores if score_correction_bias is None else scores + score_correction_bias


def route(
    logits: torch.Tensor,
    attrs: MoEAttributes,
    score_correction_bias: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (top-k weights [T, k] in logits' dtype, top-k expert ids [T, k] int64).

    `ids` given: the experts are not selected but taken from `ids` (weights computed for them as for a
    selection), which is how a reference is routed like another implementation.
    """
    k = attrs.top_k
    if attrs.topk_before_score:
        if ids is None:
            ids = torch.topk(logits, k, dim=-1).indices
        return torch.softmax(logits.gather(1, ids), dim=-1), ids

    scores = _scores(logits, attrs)
    if ids is None:
        choice = _biased(scores, score_correction_bias)
        if attrs.n_group > 1:
            num_tokens = choice.shape[0]
            grouped = choice.view(num_tokens, attrs.n_group, attrs.num_experts // attrs.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            group_ids = group_scores.topk(attrs.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, attrs.num_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = torch.topk(choice, k, dim=-1).indices
    weights = scores.gather(1, ids)
    if attrs.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * attrs.routed_scaling_factor, ids


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """The op's GLU activations (spec.ACTIVATIONS): the one definition the fusion's numeric check, the
    function body's tests and the kernels' tests compare with."""
    if activation == "silu_glu":
        return F.silu(gate) * up
    if activation == "gelu_glu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh_glu":
        return F.gelu(gate, approximate="tanh") * up
    if activation != "swiglu_clamped":
        raise ValueError(f"unknown activation {activation!r}")
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def glu_activation(gate_up: torch.Tensor, attrs: MoEAttributes) -> torch.Tensor:
    """[.., 2I] (gate then up) -> [.., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return glu(gate, up, attrs.activation, attrs.swiglu_alpha, attrs.swiglu_limit)


def shared_expert(
    hidden: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gate_weight: torch.Tensor | None,
) -> torch.Tensor:
    out = F.linear(_silu_glu(hidden, gate_up_weight), down_weight)
    if gate_weight is not None:
        out = torch.sigmoid(F.linear(hidden, gate_weight)) * out
    return out


def _silu_glu(hidden: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(hidden, gate_up_weight).chunk(2, dim=-1)
    return glu(gate, up, "silu_glu", 0.0, 0.0)


def moe_reference(
    inputs: dict[str, torch.Tensor],
    attrs: MoEAttributes,
    compute_dtype: torch.dtype = torch.float32,
    ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the op on named inputs (see spec.INPUT_ORDER); returns {"output", ["router_logits"]}.

    Everything is upcast to `compute_dtype`; outputs come back in the dtype of hidden_states. `ids` [T, k]
    routes the tokens to those experts instead of the router's own choice (see `route`).
    """
    missing = [name for name in attrs.present_inputs() if name not in inputs]
    if missing:
        raise ValueError(f"moe_reference: missing inputs {missing}")
    # Expert tables are upcast one expert at a time, so a real-width block never has a float32 copy.
    x = {
        name: inputs[name] if name.startswith("expert_") else inputs[name].to(compute_dtype)
        for name in attrs.present_inputs()
    }
    hidden = x["hidden_states"]
    logits = router_logits(hidden, x["router_weight"], x.get("router_bias"))
    weights, ids = route(logits, attrs, x.get("score_correction_bias"), ids)

    out = torch.zeros_like(hidden)
    io_dtype = inputs["hidden_states"].dtype
    for expert in torch.unique(ids).tolist():
        token_idx, slot = torch.where(ids == expert)
        h = expert_activations(hidden[token_idx], attrs.fp8_activation_block, io_dtype)
        gate_up = F.linear(
            h,
            expert_weight(x, attrs, "gate_up", expert).to(compute_dtype),
            _maybe(x, "expert_gate_up_bias", expert),
        )
        y = F.linear(
            expert_activations(glu_activation(gate_up, attrs), attrs.fp8_activation_block, io_dtype),
            expert_weight(x, attrs, "down", expert).to(compute_dtype),
            _maybe(x, "expert_down_bias", expert),
        )
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    if attrs.has_shared_expert:
        out = out + shared_expert(
            hidden, x["shared_gate_up_weight"], x["shared_down_weight"], x.get("shared_gate_weight")
        )

    dtype = inputs["hidden_states"].dtype
    result = {"output": out.to(dtype)}
    if attrs.output_router_logits:
        result["router_logits"] = logits.to(dtype)
    return result


def expert_activations(a: torch.Tensor, fp8_block: int, io_dtype: torch.dtype) -> torch.Tensor:
    """What a routed expert's GEMM takes as input: `a` itself (fp8_block 0), or with fp8 activations `a` held in
    the op's dtype and quantized per token and block (`MoEAttributes.fp8_activation_block`,
    `op.quant.fp8_activations`)."""
    if not fp8_block:
        return a
    from moetrt.op.quant import fp8_activations

    return fp8_activations(a.to(io_dtype), fp8_block).to(a.dtype)


def expert_weight(x: dict[str, torch.Tensor], attrs: MoEAttributes, which: str, expert: int) -> torch.Tensor:
    """One expert's gate_up or down weight in the canonical [N, K] layout, dequantized when stored quantized
    (float32 then; the stored dtype otherwise)."""
    weight = x[f"expert_{which}_weight"][expert]
    if not attrs.is_quantized:
        return weight
    from moetrt.op.quant import QuantizedWeight, dequantize

    zero = x.get(f"expert_{which}_zero")
    stored = QuantizedWeight(
        weight, x[f"expert_{which}_scale"][expert], None if zero is None else zero[expert]
    )
    k = attrs.hidden_size if which == "gate_up" else attrs.intermediate_size
    return dequantize(attrs.weight_format, attrs.weight_block, stored, k)


def _maybe(x: dict[str, torch.Tensor], name: str, expert: int) -> torch.Tensor | None:
    return x[name][expert].to(x["hidden_states"].dtype) if name in x else None


def input_scales(attrs: MoEAttributes) -> dict[str, float]:
    """Standard deviation of each op input in random test data: weights at 1/sqrt(fan-in), biases small."""
    h, i, s = attrs.hidden_size, attrs.intermediate_size, attrs.shared_intermediate_size
    return {
        "hidden_states": 1.0,
        "router_weight": h**-0.5,
        "router_bias": 0.1,
        "score_correction_bias": 0.05,
        "expert_gate_up_weight": h**-0.5,
        "expert_gate_up_bias": 0.1,
        "expert_down_weight": max(i, 1) ** -0.5,
        "expert_down_bias": 0.1,
        "shared_gate_up_weight": h**-0.5,
        "shared_down_weight": max(s, 1) ** -0.5,
        "shared_gate_weight": h**-0.5,
    }


def random_inputs(
    attrs: MoEAttributes,
    num_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    skew: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Random (never zero) inputs with realistic scales; `skew` > 0 biases the router towards few experts.
    Quantized attributes get the native inputs with their expert weights quantized (`op.quant.quantize`)."""
    if attrs.is_quantized:
        return _quantized_inputs(attrs, num_tokens, dtype, device, seed, skew)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = attrs.hidden_size

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    shapes = attrs.input_shapes(num_tokens)
    scales = input_scales(attrs)
    inputs = {name: randn(*shape, scale=scales[name]) for name, shape in shapes.items()}  # type: ignore[arg-type]
    if skew > 0:
        # A few "hot" experts get a large logit offset through the hidden direction they align with.
        hot = torch.arange(min(attrs.top_k + 2, attrs.num_experts))
        direction = torch.randn(h, generator=gen)
        direction = direction / direction.norm()
        rw = inputs["router_weight"].float().cpu()
        rw[hot] += skew * direction
        inputs["router_weight"] = rw.to(dtype=dtype, device=device)
        hs = inputs["hidden_states"].float().cpu() + 3.0 * direction
        inputs["hidden_states"] = hs.to(dtype=dtype, device=device)
    return inputs


def _quantized_inputs(
    attrs: MoEAttributes,
    num_tokens: int,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    skew: float,
) -> dict[str, torch.Tensor]:
    from moetrt.op.quant import quantize

    inputs = random_inputs(attrs.with_native_weights(), num_tokens, dtype, device, seed, skew)
    for which in ("gate_up", "down"):
        stored = quantize(
            attrs.weight_format,
            attrs.weight_block,
            inputs[f"expert_{which}_weight"].float().cpu(),
            attrs.has_weight_zero_point,
        )
        inputs[f"expert_{which}_weight"] = stored.codes.to(device)
        inputs[f"expert_{which}_scale"] = stored.scale.to(device)
        if stored.zero is not None:
            inputs[f"expert_{which}_zero"] = stored.zero.to(device)
    return inputs
