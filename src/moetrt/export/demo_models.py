"""Built-in demo models: tiny, seeded, random-weight configs of seven MoE families, built locally.

`demo:<family>` is the whole causal LM (a cached decoder, or `input_ids -> logits` without a cache);
`demo:<family>:block` is the
first MoE block of the same model (`hidden_states -> hidden_states`). Weights are random but initialised so
that activations stay O(1) and routing is not degenerate (no zero routers, no zero biases).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetrt.core.errors import MoetrtError
from moetrt.export.loaded import (
    CACHED,
    EXAMPLE_BATCH,
    EXAMPLE_SEQ,
    DecoderForm,
    FirstOutput,
    LoadedModel,
    causal_lm,
    is_moe_block,
    random_hidden_inputs,
    token_dynamic_shapes,
)

DEMO_FAMILIES: tuple[str, ...] = (
    "qwen3_next",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
)
DEFAULT_DEMO = DEMO_FAMILIES[0]

_VOCAB = 512
_COMMON: dict[str, Any] = {
    "vocab_size": _VOCAB,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

# Per-family overrides on top of _COMMON; kept tiny so that every family exports in seconds.
_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_next": {
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "head_dim": 16,
        "intermediate_size": 128,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
    },
    "qwen3_moe": {
        "num_hidden_layers": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
    "mixtral": {
        "num_hidden_layers": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "olmoe": {
        "num_hidden_layers": 2,
        "eos_token_id": None,  # the stock id lies outside the tiny vocabulary
        "pad_token_id": None,
        "num_key_value_heads": 4,
        "intermediate_size": 32,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
    },
    "qwen2_moe": {
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
    },
    "deepseek_v3": {
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE, as in the real model
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "head_dim": 8,
    },
    "gpt_oss": {
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 16,
        "head_dim": 16,
        "intermediate_size": 32,
        "num_local_experts": 16,
        "num_experts_per_tok": 4,
        "swiglu_limit": 7.0,
    },
}

# Sequence length that crosses every internal chunk: Qwen3-Next's gated delta rule runs in 64-token chunks
# (130 = three chunks, the last one partial); GPT-OSS's sliding window above is 16 tokens.
_LONG_SEQ = {"qwen3_next": 130}


def demo_config(family: str, num_layers: int | None = None) -> Any:
    """The tiny Hugging Face config of a demo family (experts set to the export-friendly implementation)."""
    from transformers import AutoConfig

    _check_family(family)
    overrides = {**_COMMON, **_CONFIGS[family]}
    if num_layers is not None:  # deeper variants (fusion speed vs depth); layer types repeat their pattern
        overrides["num_hidden_layers"] = num_layers
        if "layer_types" in overrides:
            pattern = overrides["layer_types"]
            overrides["layer_types"] = [pattern[i % len(pattern)] for i in range(num_layers)]
    config = AutoConfig.for_model(family, **overrides)
    config._experts_implementation = "batched_mm"  # the eager experts loop is data-dependent
    config._attn_implementation = "eager"
    return config


def build_demo(
    family: str,
    block: bool = False,
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
    form: DecoderForm = CACHED,
) -> LoadedModel:
    """Build `demo:<family>` (whole causal LM) or `demo:<family>:block` (its first MoE block)."""
    from transformers import AutoModelForCausalLM

    _check_family(family)
    config = demo_config(family, num_layers)
    torch.manual_seed(0)  # from_config draws the initial weights from the global generator
    model = AutoModelForCausalLM.from_config(config)
    init_demo_weights(model, config, seed=_family_seed(family))
    model = model.to(dtype).eval()

    long_seq = _LONG_SEQ.get(family, 72)
    if block:
        moe = next((m for m in model.modules() if is_moe_block(m)), None)
        if moe is None:  # pragma: no cover - every demo config has MoE layers
            raise MoetrtError(f"demo:{family} has no MoE block", "report this as a bug")
        module: nn.Module = FirstOutput(moe).eval()
        make_inputs = random_hidden_inputs(config.hidden_size, dtype)
        return LoadedModel(
            module=module,
            example_inputs=make_inputs(EXAMPLE_BATCH, EXAMPLE_SEQ),
            input_names=["hidden_states"],
            output_names=["output"],
            dynamic_shapes=token_dynamic_shapes("hidden_states"),
            make_inputs=make_inputs,
            num_moe_blocks=1,
            spec=f"demo:{family}:block",
            dtype=dtype,
            long_seq=long_seq,
            description=f"first MoE block of the tiny {family} demo ({type(moe).__name__})",
        )

    return causal_lm(
        model,
        config.vocab_size,
        f"demo:{family}",
        dtype,
        f"tiny {family} causal LM ({config.num_hidden_layers} layers, hidden {config.hidden_size})",
        long_seq,
        form,
    )


def init_demo_weights(model: nn.Module, config: Any, seed: int) -> None:
    """Seeded random weights with fan-in scaling, so activations are O(1) and routing is non-trivial.

    Matrices get N(0, 1/fan_in); embeddings N(0, 1); vectors (norm scales, biases, decay parameters) keep
    their initial value plus small noise, so norms stay near their identity and biases are non-zero.
    """
    gen = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if id(param) in embeddings:
                param.copy_(noise)
            elif param.dim() == 1:
                param.add_(0.05 * noise)
            else:
                param.copy_(noise * _fan_in(name, param, hidden) ** -0.5)
        for name, buf in model.named_buffers():
            # DeepSeek-V3's load-balancing bias only shifts which experts are chosen.
            if name.endswith("score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def _fan_in(name: str, param: torch.Tensor, hidden: int) -> int:
    if param.dim() == 3 and name.endswith("gate_up_proj"):
        return hidden  # [E, 2I, H] or transposed [E, H, 2I]: the reduction runs over hidden
    if param.dim() == 3 and name.endswith("down_proj"):
        return param.shape[2] if param.shape[1] == hidden else param.shape[1]
    fan_in = 1
    for size in param.shape[1:]:
        fan_in *= size
    return max(fan_in, 1)


def _family_seed(family: str) -> int:
    return 1000 + DEMO_FAMILIES.index(family)


def _check_family(family: str) -> None:
    if family not in DEMO_FAMILIES:
        raise MoetrtError(
            f"unknown demo family {family!r}",
            f"use one of: {', '.join('demo:' + f for f in DEMO_FAMILIES)} (append ':block' for one MoE block)",
        )
