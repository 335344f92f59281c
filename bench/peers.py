"""The Hugging Face transformers MoE blocks as peers, loaded with exactly the weights moetrt gets.

Each shape's block (Qwen3NextSparseMoeBlock, Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, DeepseekV3MoE,
GptOssMLP) is built on the meta device from a config with the benchmark's sizes, then given the benchmark's
tensors with `load_state_dict(assign=True)`: no second allocation for the layouts transformers shares with the
op contract, a converted copy for GPT-OSS (gate_up [E, H, 2I] with gate/up interleaved, down [E, I, H]).

The experts implementation is switched through `config._experts_implementation` ("eager", "batched_mm",
"grouped_mm"), which the experts module reads on every forward in transformers 5.x.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
from torch import nn

from moetrt.op.spec import MoEAttributes

EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
ROUTER_KEYS = ("gate.weight", "router.weight", "router.bias", "gate.e_score_correction_bias")

# family -> (modeling module, block class, config class)
_BLOCKS = {
    "qwen3_next": ("qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextConfig"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig"),
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config"),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig"),
}


def hf_config(family: str, attrs: MoEAttributes) -> Any:
    _, _, config_name = _BLOCKS[family]
    config_cls = getattr(importlib.import_module(f"transformers.models.{_BLOCKS[family][0]}"), config_name)
    a = attrs
    common: dict[str, Any] = {
        "hidden_size": a.hidden_size,
        "num_experts_per_tok": a.top_k,
        "num_hidden_layers": 1,
    }
    if family == "qwen3_next":
        kwargs = {
            "num_experts": a.num_experts,
            "moe_intermediate_size": a.intermediate_size,
            "shared_expert_intermediate_size": a.shared_intermediate_size,
            "norm_topk_prob": a.norm_topk_prob,
            "hidden_act": "silu",
        }
    elif family == "qwen3_moe":
        kwargs = {
            "num_experts": a.num_experts,
            "moe_intermediate_size": a.intermediate_size,
            "norm_topk_prob": a.norm_topk_prob,
            "hidden_act": "silu",
        }
    elif family == "mixtral":
        kwargs = {
            "num_local_experts": a.num_experts,
            "intermediate_size": a.intermediate_size,
            "hidden_act": "silu",
        }
    elif family == "deepseek_v3":
        kwargs = {
            "n_routed_experts": a.num_experts,
            "moe_intermediate_size": a.intermediate_size,
            "n_shared_experts": a.shared_intermediate_size // a.intermediate_size,
            "n_group": a.n_group,
            "topk_group": a.topk_group,
            "routed_scaling_factor": a.routed_scaling_factor,
            "norm_topk_prob": a.norm_topk_prob,
            "hidden_act": "silu",
        }
    elif family == "gpt_oss":
        kwargs = {
            "num_local_experts": a.num_experts,
            "intermediate_size": a.intermediate_size,
            "swiglu_alpha": a.swiglu_alpha,
            "swiglu_limit": a.swiglu_limit,
        }
    else:
        raise ValueError(f"unknown block family {family!r}")
    config = config_cls(**common, **kwargs)
    config._experts_implementation = "eager"
    return config


def _check_family(family: str, attrs: MoEAttributes) -> None:
    """The transformers block must compute the op's function; refuse a mismatch instead of benchmarking it."""
    if family == "deepseek_v3" and attrs.shared_intermediate_size % attrs.intermediate_size:
        raise ValueError("DeepseekV3MoE's shared expert is a multiple of moe_intermediate_size")
    # transformers < 5.18 hard-codes alpha 1.702 and limit 7.0 in GptOssExperts; later ones read the config,
    # but the benchmark's shapes use those values, so every version is held to them.
    gpt_oss_activation = (attrs.activation, attrs.swiglu_alpha, attrs.swiglu_limit)
    if family == "gpt_oss" and gpt_oss_activation != ("swiglu_clamped", 1.702, 7.0):
        raise ValueError("GptOssExperts uses clamped SwiGLU with alpha 1.702 and limit 7.0")


def hf_state(family: str, inputs: dict[str, torch.Tensor], attrs: MoEAttributes) -> dict[str, torch.Tensor]:
    """The block's state dict built from the op's named inputs (no copy where the layouts agree)."""
    i, s = attrs.intermediate_size, attrs.shared_intermediate_size
    state: dict[str, torch.Tensor] = {}
    if family == "gpt_oss":
        state["router.weight"] = inputs["router_weight"]
        state["router.bias"] = inputs["router_bias"]
        state.update(gpt_oss_expert_state(inputs, i))
        return state
    state["gate.weight"] = inputs["router_weight"]
    state["experts.gate_up_proj"] = inputs["expert_gate_up_weight"]
    state["experts.down_proj"] = inputs["expert_down_weight"]
    if family == "deepseek_v3":
        state["gate.e_score_correction_bias"] = inputs["score_correction_bias"]
    if attrs.has_shared_expert:
        prefix = "shared_experts" if family == "deepseek_v3" else "shared_expert"
        gate_up = inputs["shared_gate_up_weight"]
        state[f"{prefix}.gate_proj.weight"] = gate_up[:s]
        state[f"{prefix}.up_proj.weight"] = gate_up[s:]
        state[f"{prefix}.down_proj.weight"] = inputs["shared_down_weight"]
    if attrs.has_shared_gate:
        state["shared_expert_gate.weight"] = inputs["shared_gate_weight"]
    return state


def hf_router_state(family: str, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the router tensors of the block's state dict (they change per row; expert weights do not)."""
    if family == "gpt_oss":
        return {"router.weight": tokens["router_weight"], "router.bias": tokens["router_bias"]}
    state = {"gate.weight": tokens["router_weight"]}
    if family == "deepseek_v3":
        state["gate.e_score_correction_bias"] = tokens["score_correction_bias"]
    return state


def gpt_oss_expert_state(inputs: dict[str, torch.Tensor], intermediate: int) -> dict[str, torch.Tensor]:
    """Canonical [E, 2I, H] gate-then-up / [E, H, I] -> GPT-OSS [E, H, 2I] interleaved / [E, I, H]."""
    i = intermediate
    gate_up = inputs["expert_gate_up_weight"]
    num_experts, _, hidden = gate_up.shape
    # hf[e, h, 2j] = gate[e, j, h]; hf[e, h, 2j + 1] = up[e, j, h]
    interleaved = torch.stack((gate_up[:, :i, :], gate_up[:, i:, :]), dim=-1)  # [E, I, H, 2]
    bias = inputs["expert_gate_up_bias"]
    return {
        "experts.gate_up_proj": interleaved.permute(0, 2, 1, 3)
        .reshape(num_experts, hidden, 2 * i)
        .contiguous(),
        "experts.gate_up_proj_bias": torch.stack((bias[:, :i], bias[:, i:]), dim=-1).reshape(
            num_experts, 2 * i
        ),
        "experts.down_proj": inputs["expert_down_weight"].transpose(1, 2).contiguous(),
        "experts.down_proj_bias": inputs["expert_down_bias"],
    }


def available_implementations() -> tuple[str, ...]:
    """Experts implementations this transformers install registers (eager always)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ("eager",)
    return ("eager", *(name for name in EXPERTS_IMPLEMENTATIONS[1:] if name in ALL_EXPERTS_FUNCTIONS))


class HFBlock:
    """One transformers MoE block with the benchmark's weights and a switchable experts implementation."""

    def __init__(
        self, family: str, attrs: MoEAttributes, state: dict[str, torch.Tensor], config: Any | None = None
    ) -> None:
        _check_family(family, attrs)
        self.family = family
        self.attrs = attrs
        self.config = hf_config(family, attrs) if config is None else config
        module_name, block_name, _ = _BLOCKS[family]
        block_cls = getattr(
            importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}"), block_name
        )
        with torch.device("meta"):
            self.module: nn.Module = block_cls(self.config)
        # Router tensors get their own storage: set_router() overwrites them in place every row.
        self._load({k: v.clone() if k in ROUTER_KEYS else v for k, v in state.items()}, strict=True)
        self.module.eval().requires_grad_(False)
        self._compiled: nn.Module | None = None

    def _load(self, state: dict[str, torch.Tensor], strict: bool) -> None:
        expected = {name: tuple(t.shape) for name, t in self.module.state_dict().items()}
        unknown = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state)) if strict else []
        if unknown or missing:
            raise ValueError(
                f"{type(self.module).__name__} layout differs from this benchmark's mapping: "
                f"unknown {unknown}, missing {missing}"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, block expects {expected[name]}")
        self.module.load_state_dict(state, strict=strict, assign=True)

    def set_router(self, tokens: dict[str, torch.Tensor]) -> None:
        """Copy a row's router tensors in (the router is drawn per row; expert weights stay). In place, so a
        compiled module sees the same parameters and does not recompile."""
        current = self.module.state_dict()
        with torch.no_grad():
            for name, tensor in hf_router_state(self.family, tokens).items():
                if tuple(current[name].shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"{name}: shape {tuple(tensor.shape)}, block expects {tuple(current[name].shape)}"
                    )
                current[name].copy_(tensor)

    def compiled(self) -> nn.Module:
        """The block under torch.compile, shapes dynamic so one compile serves every token count > 1."""
        if self._compiled is None:
            self._compiled = torch.compile(self.module, dynamic=True)
        return self._compiled

    def set_implementation(self, name: str) -> None:
        self.config._experts_implementation = name

    def sibling(self, state: dict[str, torch.Tensor]) -> HFBlock:
        """Another block over the same tensors with its own config (e.g. a compiled one that must not recompile
        when this one switches implementation)."""
        return HFBlock(self.family, self.attrs, state, config=copy.deepcopy(self.config))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return block_forward(self.module, hidden)

    def router(self) -> nn.Module:
        """The block's router: every family's returns (logits, top-k weights, top-k expert ids)."""
        return self.module.router if self.family == "gpt_oss" else self.module.gate

    def routing(self, hidden: torch.Tensor) -> torch.Tensor:
        """The expert ids [T, k] this block sends `hidden` [T, H] to (its own router, its own dtype)."""
        with torch.no_grad():
            return self.router()(hidden)[2].reshape(hidden.shape[0], -1)


# Liger-Kernel's fused MoE (pure Triton): routed SiLU-GLU experts without biases, routing given to it.
LIGER_FAMILIES = ("qwen3_next", "qwen3_moe", "mixtral", "deepseek_v3")


def liger_unsupported(family: str) -> str | None:
    """Why Liger's fused MoE cannot compute this block, or None."""
    if family not in LIGER_FAMILIES:
        return "Liger's fused MoE has no expert biases or clamped SwiGLU (GPT-OSS's experts)"
    try:
        importlib.import_module("liger_kernel.ops.fused_moe")
    except ImportError as err:
        return f"liger-kernel not installed ({err})"
    return None


class LigerBlock:
    """The transformers block's router and shared expert around Liger-Kernel's fused experts.

    Routing is given to Liger (its function takes top-k ids and weights): the block's own router computes
    it, so the row times the whole block, and its output is judged against the reference routed like it.
    """

    def __init__(self, block: HFBlock, inputs: dict[str, torch.Tensor]) -> None:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        self.block = block
        self.apply = LigerFusedMoEFunction.apply
        self.gate_up = inputs["expert_gate_up_weight"]  # [E, 2I, H], gate rows first: Liger's layout too
        self.down = inputs["expert_down_weight"]  # [E, H, I]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        module = self.block.module
        with torch.no_grad():
            _, weights, ids = self.block.router()(hidden)
            out = self.apply(hidden, self.gate_up, self.down, ids.to(torch.int32), weights.to(hidden.dtype))
            if self.block.family == "qwen3_next":
                out = out + torch.sigmoid(module.shared_expert_gate(hidden)) * module.shared_expert(hidden)
            elif self.block.family == "deepseek_v3":
                out = out + module.shared_experts(hidden)
        return out


def block_forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, H] through a block that takes [batch, seq, H] (GPT-OSS also returns router scores)."""
    out = module(hidden.unsqueeze(0))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(hidden.shape)
