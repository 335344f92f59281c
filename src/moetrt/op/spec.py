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
Quantized experts (``weight_format`` fp8_block | int4 | mxfp4, layouts in ``op/quant.py``): the two expert
weights hold uint8 codes ([E, N, K], or [E, N, K/2] for 4-bit codes), with ``expert_gate_up_scale`` /
``expert_down_scale`` (and int4's ``expert_*_zero``) as further inputs. With ``activation_format`` fp8_block
(fp8_block weights only) the routed experts' inputs, x and the activation (held in the op's dtype), are
quantized to e4m3 per token and weight_block-wide block of the reduction, scale = amax / 448
(``op/quant.fp8_activations``), so both GEMMs can run on fp8 tensor cores (SM 8.9+).
Inputs:  hidden_states [T, H] (fp32 | fp16 | bf16; every native weight has the same dtype).
Outputs: output [T, H] (dtype of hidden_states); router_logits [T, E] when ``output_router_logits``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moetrt.core import dtypes

DOMAIN = "moetrt"
# The op contract's version, imported with DOMAIN by every fused model. 2: 4-bit codes in runs of NIBBLE_RUN
# (version 1 paired k = 2j and 2j + 1 in byte j; such models are refused, op/fused_node.py)
DOMAIN_VERSION = 2
NIBBLE_RUNS_SINCE = 2
OP_TYPE = "MoE"
PLUGIN_NAME = OP_TYPE
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "moetrt"

SCORINGS = ("softmax", "sigmoid")
# Expert weight formats (layouts and arithmetic in `op/quant.py`, docs/moe_op.md).
NATIVE, FP8_BLOCK, INT4, MXFP4 = "native", "fp8_block", "int4", "mxfp4"
WEIGHT_FORMATS = (NATIVE, FP8_BLOCK, INT4, MXFP4)
#: Block / group size of each format when a checkpoint does not say (MXFP4's is fixed by the format).
DEFAULT_BLOCK = {FP8_BLOCK: 128, INT4: 128, MXFP4: 32}
MXFP4_GROUP = 32
INT4_SYMMETRIC_ZERO = 8
# 4-bit codes are stored in runs of this many along the reduction (op.quant: the byte order)
NIBBLE_RUN = 8
#: `--weights` choices and the formats they store.
WEIGHTS_OPTIONS = {"native": NATIVE, "fp8": FP8_BLOCK, "int4": INT4, "mxfp4": MXFP4}
# What the routed experts' GEMMs take as activations: the op's dtype, or e4m3 with one scale per token and
# weight block of the reduction (fp8_block weights only; `op/quant.fp8_activations`).
ACTIVATION_FORMATS = (NATIVE, FP8_BLOCK)
#: `--activations` choices and the formats they name.
ACTIVATIONS_OPTIONS = {"native": NATIVE, "fp8": FP8_BLOCK}
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
    # quantized experts only (after every native input, so native nodes keep their input positions)
    "expert_gate_up_scale",
    "expert_down_scale",
    "expert_gate_up_zero",
    "expert_down_zero",
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
    weight_format: str = NATIVE  # the routed experts' storage; router and shared expert stay native
    weight_block: int = 0  # fp8_block: square block side; int4 / mxfp4: group along the reduction
    has_weight_zero_point: bool = False  # int4 with zero points (asymmetric)
    activation_format: str = NATIVE  # fp8_block: the routed experts' inputs quantized to e4m3 per block

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
        if self.weight_format not in WEIGHT_FORMATS:
            problems.append(f"weight_format {self.weight_format!r} not in {WEIGHT_FORMATS}")
        else:
            for k in (self.hidden_size, self.intermediate_size):
                why = check_block(self.weight_format, self.weight_block, k)
                if why:
                    problems.append(why)
                    break
        if self.has_weight_zero_point and self.weight_format != INT4:
            problems.append("has_weight_zero_point is for int4 weights only")
        if self.activation_format not in ACTIVATION_FORMATS:
            problems.append(f"activation_format {self.activation_format!r} not in {ACTIVATION_FORMATS}")
        elif self.activation_format == FP8_BLOCK and self.weight_format != FP8_BLOCK:
            problems.append("fp8_block activations need fp8_block weights")
        if problems:
            raise ValueError("invalid MoE attributes: " + "; ".join(problems))

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_intermediate_size > 0

    @property
    def is_quantized(self) -> bool:
        return self.weight_format != NATIVE

    @property
    def has_fp8_activations(self) -> bool:
        return self.activation_format == FP8_BLOCK

    @property
    def fp8_activation_block(self) -> int:
        """The block of the reduction each fp8 activation scale covers; 0 for activations in the op's dtype."""
        return self.weight_block if self.has_fp8_activations else 0

    def with_native_weights(self) -> MoEAttributes:
        """The same op with its routed experts in the activations' dtype (what a quantized op dequantizes to;
        fp8 activations are dropped with the weights, so this is the weight-only comparison)."""
        return dataclasses.replace(
            self, weight_format=NATIVE, weight_block=0, has_weight_zero_point=False, activation_format=NATIVE
        )

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
            "expert_gate_up_scale": self.is_quantized,
            "expert_down_scale": self.is_quantized,
            "expert_gate_up_zero": self.has_weight_zero_point,
            "expert_down_zero": self.has_weight_zero_point,
        }
        return tuple(name for name in INPUT_ORDER if present.get(name, True))

    def present_outputs(self) -> tuple[str, ...]:
        return OUTPUT_ORDER if self.output_router_logits else OUTPUT_ORDER[:1]

    def input_shapes(self, num_tokens: int | str = "T") -> dict[str, tuple[int | str, ...]]:
        """Expected shape of every present input (num_tokens may be symbolic)."""
        e, h, i, s = self.num_experts, self.hidden_size, self.intermediate_size, self.shared_intermediate_size
        fmt, block = self.weight_format, self.weight_block
        gate_up_scale = (e, *scale_shape(fmt, block, 2 * i, h))
        down_scale = (e, *scale_shape(fmt, block, h, i))
        shapes: dict[str, tuple[int | str, ...]] = {
            "hidden_states": (num_tokens, h),
            "router_weight": (e, h),
            "router_bias": (e,),
            "score_correction_bias": (e,),
            "expert_gate_up_weight": (e, 2 * i, packed_k(fmt, h)),
            "expert_gate_up_bias": (e, 2 * i),
            "expert_down_weight": (e, h, packed_k(fmt, i)),
            "expert_gate_up_scale": gate_up_scale,
            "expert_down_scale": down_scale,
            "expert_gate_up_zero": gate_up_scale,
            "expert_down_zero": down_scale,
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


def stored_dtype(name: str, attrs: MoEAttributes) -> str | None:
    """The element type input `name` is stored in when it is not the activations' dtype: quantized experts'
    codes and zero points "uint8", their scales "float32" ("uint8" e8m0 for mxfp4); None for every other input
    (it has the dtype of hidden_states)."""
    if not (attrs.is_quantized and name.startswith("expert_")):
        return None
    if name.endswith(("_weight", "_zero")):
        return "uint8"
    if name.endswith("_scale"):
        return "uint8" if attrs.weight_format == MXFP4 else "float32"
    return None


def stored_dtype_name(name: str, attrs: MoEAttributes) -> str | None:
    """`stored_dtype` in the short names TensorRT bindings and the plugin use ("fp32", "uint8"); None: the
    activations' dtype."""
    stored = stored_dtype(name, attrs)
    return dtypes.name_of(stored) if stored == "float32" else stored


def packed_k(weight_format: str, k: int) -> int:
    """The stored last dim of an expert weight whose reduction is `k` (two 4-bit codes a byte)."""
    return k if weight_format in (NATIVE, FP8_BLOCK) else k // 2


def scale_shape(weight_format: str, block: int, n: int, k: int) -> tuple[int, ...]:
    """The per-expert scale (and zero point) shape of an [N, K] weight; () for native weights."""
    if weight_format == NATIVE:
        return ()
    if weight_format == FP8_BLOCK:
        return (-(-n // block), -(-k // block))
    return (n, k // block)


def check_block(weight_format: str, block: int, k: int) -> str | None:
    """Why a block size does not fit a reduction of `k` (None when it fits)."""
    if weight_format == NATIVE:
        return None if block == 0 else f"weight_block {block} given for native weights"
    if block < 1:
        return f"weight_block {block} is not positive"
    if weight_format == MXFP4 and block != MXFP4_GROUP:
        return f"mxfp4 groups are {MXFP4_GROUP} wide, not {block}"
    if weight_format in (INT4, MXFP4) and (k % block or block % 2):
        return f"group {block} does not divide the reduction {k} into even groups"
    if weight_format in (INT4, MXFP4) and k % NIBBLE_RUN:
        return f"4-bit codes are stored in runs of {NIBBLE_RUN}, which do not divide the reduction {k}"
    return None


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("not an integer")
    return int(value)


def _as_bool(name: str, value: Any) -> bool:
    if value not in (0, 1, True, False):
        raise ValueError("not 0 or 1")
    return bool(value)
