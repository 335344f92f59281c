"""The fused MoE op contract shared by the graph pass, the kernels, the plugin and the runtime.

One ONNX node per MoE block: domain ``moetrt``, op type ``MoE`` (= the TensorRT plugin name), attributes
``plugin_version`` / ``plugin_namespace`` for the TensorRT ONNX parser, and the routing / expert variant as
attributes below. The node lists only the inputs that are present, in the canonical order of
``INPUT_ORDER``; the ``has_*`` attributes say which are there. docs/moe_op.md is the prose version.

Weight layouts (canonical = ``nn.Linear`` layout, reduction dim contiguous):
    router_weight            [E, H]
    router_bias              [E]
    score_correction_bias    [E]
    expert_gate_up_weight    [E, 2*I, H]   rows 0..I-1 = gate, rows I..2I-1 = up
    expert_gate_up_bias      [E, 2*I]
    expert_down_weight       [E, H, I]
    expert_down_bias         [E, H]
    shared_gate_up_weight    [2*Is, H]     rows 0..Is-1 = gate, rows Is.. = up
    shared_down_weight       [H, Is]
    shared_gate_weight       [1, H]        output scaled by sigmoid(x @ w.T)
Inputs:  hidden_states [T, H] (fp32 | fp16 | bf16; every weight has the same dtype).
Outputs: output [T, H] (dtype of hidden_states); router_logits [T, E] when ``output_router_logits``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DOMAIN = "moetrt"
OP_TYPE = "MoE"
PLUGIN_NAME = OP_TYPE
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "moetrt"

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu_glu", "gelu_glu", "gelu_tanh_glu", "swiglu_clamped")

INPUT_ORDER = (
    "hidden_states",
    "router_weight",
    "router_bias",
    "score_correction_bias",
    "expert_gate_up_weight",
    "expert_gate_up_bias",
    "expert_down_weight",
    "expert_down_bias",
    "shared_gate_up_weight",
    "shared_down_weight",
    "shared_gate_weight",
)
OUTPUT_ORDER = ("output", "router_logits")
#: Attributes on the node for TensorRT's ONNX parser, not part of the op's variant.
NODE_ONLY_ATTRIBUTES = frozenset({"plugin_version", "plugin_namespace"})
REQUIRED_ATTRIBUTES = ("num_experts", "top_k", "hidden_size", "intermediate_size")


@dataclass(frozen=True)
class MoEAttributes:
    """Every variant the fused op covers. Defaults describe a plain softmax top-k SiLU-GLU MoE."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    scoring: str = "softmax"
    # GPT-OSS: top-k on the raw logits, then softmax over the k selected (equals softmax→top-k→renorm).
    topk_before_score: bool = False
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    activation: str = "silu_glu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    has_router_bias: bool = False
    has_score_correction_bias: bool = False
    has_expert_bias: bool = False
    shared_intermediate_size: int = 0  # 0: no shared expert
    has_shared_gate: bool = False
    output_router_logits: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)!r} is not a positive integer")
        if not isinstance(self.shared_intermediate_size, int) or self.shared_intermediate_size < 0:
            problems.append(f"shared_intermediate_size {self.shared_intermediate_size!r} is negative")
        for name in ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} {value!r} is not a positive finite number")
        if problems:  # the checks below compare these fields
            raise ValueError("invalid MoE attributes: " + "; ".join(problems))
        if self.scoring not in SCORINGS:
            problems.append(f"scoring {self.scoring!r} not in {SCORINGS}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} not in {ACTIVATIONS}")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k {self.top_k} outside 1..num_experts ({self.num_experts})")
        if self.n_group < 1 or self.num_experts % self.n_group:
            problems.append(f"n_group {self.n_group} does not divide num_experts {self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group {self.topk_group} outside 1..n_group ({self.n_group})")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            problems.append("top_k larger than the experts left after group selection")
        if self.topk_before_score and self.scoring != "softmax":
            problems.append("topk_before_score needs softmax scoring")
        if self.has_shared_gate and not self.shared_intermediate_size:
            problems.append("has_shared_gate without a shared expert")
        if problems:
            raise ValueError("invalid MoE attributes: " + "; ".join(problems))

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_intermediate_size > 0

    def present_inputs(self) -> tuple[str, ...]:
        """Names of the node's inputs, in order (absent optional inputs are left out, not empty)."""
        present = {
            "router_bias": self.has_router_bias,
            "score_correction_bias": self.has_score_correction_bias,
            "expert_gate_up_bias": self.has_expert_bias,
            "expert_down_bias": self.has_expert_bias,
            "shared_gate_up_weight": self.has_shared_expert,
            "shared_down_weight": self.has_shared_expert,
            "shared_gate_weight": self.has_shared_gate,
        }
        return tuple(name for name in INPUT_ORDER if present.get(name, True))

    def present_outputs(self) -> tuple[str, ...]:
        return OUTPUT_ORDER if self.output_router_logits else OUTPUT_ORDER[:1]

    def input_shapes(self, num_tokens: int | str = "T") -> dict[str, tuple[int | str, ...]]:
        """Expected shape of every present input (num_tokens may be symbolic)."""
        e, h, i, s = self.num_experts, self.hidden_size, self.intermediate_size, self.shared_intermediate_size
        shapes: dict[str, tuple[int | str, ...]] = {
            "hidden_states": (num_tokens, h),
            "router_weight": (e, h),
            "router_bias": (e,),
            "score_correction_bias": (e,),
            "expert_gate_up_weight": (e, 2 * i, h),
            "expert_gate_up_bias": (e, 2 * i),
            "expert_down_weight": (e, h, i),
            "expert_down_bias": (e, h),
            "shared_gate_up_weight": (2 * s, h),
            "shared_down_weight": (h, s),
            "shared_gate_weight": (1, h),
        }
        return {name: shapes[name] for name in self.present_inputs()}

    def to_onnx_attributes(self) -> dict[str, Any]:
        """Attributes as written on the ONNX node (bools as ints; plugin fields included)."""
        attrs: dict[str, Any] = {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            attrs[field.name] = int(value) if isinstance(value, bool) else value
        return attrs

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, Any]) -> MoEAttributes:
        """Inverse of to_onnx_attributes. Raises ValueError for an unknown key (the plugin fields are known),
        a missing required field or a value outside the contract."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(attrs) - names - NODE_ONLY_ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown MoE attribute(s) {', '.join(unknown)}")
        missing = [name for name in REQUIRED_ATTRIBUTES if name not in attrs]
        if missing:
            raise ValueError(f"missing MoE attribute(s) {', '.join(missing)}")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in attrs:
                continue
            value = attrs[field.name]
            if isinstance(value, bytes):
                value = value.decode()
            try:
                if field.type in ("bool", bool):
                    value = _as_bool(field.name, value)
                elif field.type in ("int", int):
                    value = _as_int(field.name, value)
                elif field.type in ("float", float):
                    value = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{field.name} {value!r} is not a valid value ({err})") from None
            kwargs[field.name] = value
        return cls(**kwargs)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("not an integer")
    return int(value)


def _as_bool(name: str, value: Any) -> bool:
    if value not in (0, 1, True, False):
        raise ValueError("not 0 or 1")
    return bool(value)
