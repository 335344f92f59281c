"""The standard-op body of the fused ``moetrt::MoE`` op: one model-local ONNX function per variant.

Every distinct `MoEAttributes` gets its own function, told apart by the ONNX function ``overload`` field
(IR 10). The attributes are baked into the body as constants, so the function declares no attributes and a
runtime that does not know the plugin (onnxruntime, TensorRT without the plugin) runs the body unchanged.

The body computes exactly `moetrt.op.reference.moe_reference`: inputs upcast to float32, router
(softmax | sigmoid, grouped top-k, score-correction bias, renorm, scaling), experts in the gather form
(per (token, slot) pair: gather the expert's weights, two batched MatMuls, GLU activation), weighted sum over
the k slots, optional shared expert, outputs cast back to the dtype of ``hidden_states``. The gather form has
the same cost profile as the graph that transformers' batched_mm experts export, so decomposing never makes a
model slower than it was before fusion. Ops used exist unchanged from opset 15 on.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moetrt.op import spec
from moetrt.op.quant import FP8_E4M3_MAX
from moetrt.op.spec import DOMAIN, OP_TYPE, MoEAttributes

MIN_OPSET = 15  # CastLike
#: The extra output of a body made with `expose_ids`: the selected experts [T, k] (int64), for diagnosis.
EXPERT_IDS_OUTPUT = "expert_ids"


def overload_name(attrs: MoEAttributes) -> str:
    """A short stable name for one variant: readable prefix + hash of every attribute."""
    digest = hashlib.sha1(repr(sorted(attrs.to_onnx_attributes().items())).encode()).hexdigest()[:10]
    prefix = f"{attrs.scoring}_{attrs.activation}_e{attrs.num_experts}_k{attrs.top_k}"
    return f"{prefix}_{digest}"


class _BodyBuilder:
    """Appends nodes with fresh value names; constants become Constant nodes inside the body."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, hint: str = "", outputs: int = 1, **attrs: object) -> list[str]:
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def one(self, op_type: str, *inputs: str, hint: str = "", **attrs: object) -> str:
        return self.op(op_type, *inputs, hint=hint, **attrs)[0]

    def const(self, value: object, dtype: type = np.int64, hint: str = "c") -> str:
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def f32(self, value: float, hint: str = "f") -> str:
        return self.const(value, dtype=np.float32, hint=hint)


def _scalar_tensor(value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], dtype=np.float32))


def _linear(b: _BodyBuilder, x: str, weight: str) -> str:
    """x [.., in] @ weight[out, in].T (nn.Linear layout)."""
    return b.one("MatMul", x, b.one("Transpose", weight, perm=[1, 0]))


def _halves(b: _BodyBuilder, x: str, half: int) -> tuple[str, str]:
    """Split the last axis of a 2-D value into its first and second half."""
    axis = b.const([1])
    first = b.one("Slice", x, b.const([0]), b.const([half]), axis, hint="gate")
    second = b.one("Slice", x, b.const([half]), b.const([2 * half]), axis, hint="up")
    return first, second


def _silu(b: _BodyBuilder, x: str) -> str:
    return b.one("Mul", x, b.one("Sigmoid", x))


def _glu(b: _BodyBuilder, gate_up: str, attrs: MoEAttributes) -> str:
    gate, up = _halves(b, gate_up, attrs.intermediate_size)
    if attrs.activation == "silu_glu":
        return b.one("Mul", _silu(b, gate), up)
    if attrs.activation == "gelu_glu":
        erf = b.one("Erf", b.one("Mul", gate, b.f32(1.0 / math.sqrt(2.0))))
        gelu = b.one("Mul", b.one("Mul", gate, b.f32(0.5)), b.one("Add", erf, b.f32(1.0)))
        return b.one("Mul", gelu, up)
    if attrs.activation == "gelu_tanh_glu":
        cube = b.one("Mul", b.one("Mul", gate, gate), gate)
        inner = b.one("Add", gate, b.one("Mul", cube, b.f32(0.044715)))
        tanh = b.one("Tanh", b.one("Mul", inner, b.f32(math.sqrt(2.0 / math.pi))))
        gelu = b.one("Mul", b.one("Mul", gate, b.f32(0.5)), b.one("Add", tanh, b.f32(1.0)))
        return b.one("Mul", gelu, up)
    # swiglu_clamped (GPT-OSS): gate clamped above, up clamped both sides, (up + 1) * gate * sigmoid(alpha gate)
    limit = attrs.swiglu_limit
    gate = b.one("Clip", gate, "", b.f32(limit))
    up = b.one("Clip", up, b.f32(-limit), b.f32(limit))
    glu = b.one("Mul", gate, b.one("Sigmoid", b.one("Mul", gate, b.f32(attrs.swiglu_alpha))))
    return b.one("Mul", b.one("Add", up, b.f32(1.0)), glu)


def _dequantized_rows(b: _BodyBuilder, attrs: MoEAttributes, which: str, ids: str, n: int, k: int) -> str:
    """Gather the selected experts' codes and scales and dequantize them to float32 [S, N, K] (op/quant.py's
    arithmetic: a lookup table of code values, scales repeated over their block)."""
    from moetrt.op.quant import e2m1_table, fp8_e4m3_table

    fmt, block = attrs.weight_format, attrs.weight_block
    codes = b.one("Gather", f"expert_{which}_weight", ids, axis=0, hint=f"{which}_codes")
    scale = b.one("Gather", f"expert_{which}_scale", ids, axis=0, hint=f"{which}_scale")
    if fmt == spec.FP8_BLOCK:
        values = b.one(
            "Gather",
            b.const(fp8_e4m3_table(), np.float32, "fp8_values"),
            b.one("Cast", codes, to=TensorProto.INT64),
        )
        rows, cols = spec.scale_shape(fmt, block, n, k)
        tiles = b.one("Unsqueeze", scale, b.const([2, 4]))  # [S, R, 1, C, 1]
        tiles = b.one("Expand", tiles, b.const([1, 1, block, 1, block]))
        full = b.one("Reshape", tiles, b.const([-1, rows * block, cols * block]))
        full = b.one("Slice", full, b.const([0, 0]), b.const([n, k]), b.const([1, 2]))
        return b.one("Mul", values, full, hint=f"{which}_dequantized")
    # Two codes a byte, taken apart in float32 arithmetic (exact; TensorRT has no uint8 bitwise ops).
    byte = b.one("Cast", codes, to=TensorProto.FLOAT)
    high = b.one("Floor", b.one("Div", byte, b.f32(16.0)))
    low = b.one("Sub", byte, b.one("Mul", high, b.f32(16.0)))
    # runs of NIBBLE_RUN codes (op.quant): the low nibbles of a run's bytes, then its high nibbles
    run_shape = b.const([0, 0, k // spec.NIBBLE_RUN, spec.NIBBLE_RUN // 2])
    runs = b.one("Concat", b.one("Reshape", low, run_shape), b.one("Reshape", high, run_shape), axis=-1)
    nibbles = b.one("Reshape", runs, b.const([-1, n, k]))  # [S, N, K] float32 codes in k order

    def per_code(x: str) -> str:  # [S, N, K / G] -> [S, N, K]
        expanded = b.one("Expand", b.one("Unsqueeze", x, b.const([-1])), b.const([1, 1, 1, block]))
        return b.one("Reshape", expanded, b.const([-1, n, k]))

    if fmt == spec.INT4:
        if attrs.has_weight_zero_point:
            zero = b.one("Cast", b.one("Gather", f"expert_{which}_zero", ids, axis=0), to=TensorProto.FLOAT)
            centred = b.one("Sub", nibbles, per_code(zero))
        else:
            centred = b.one("Sub", nibbles, b.f32(spec.INT4_SYMMETRIC_ZERO))
        return b.one("Mul", centred, per_code(scale), hint=f"{which}_dequantized")
    values = b.one(
        "Gather",
        b.const(e2m1_table(), np.float32, "e2m1_values"),
        b.one("Cast", nibbles, to=TensorProto.INT64),
    )
    exponent = b.one("Sub", b.one("Cast", scale, to=TensorProto.FLOAT), b.f32(127.0))
    return b.one("Mul", values, per_code(b.one("Pow", b.f32(2.0), exponent)), hint=f"{which}_dequantized")


def _fp8_activations(b: _BodyBuilder, a: str, k: int, block: int) -> str:
    """`op.quant.fp8_activations` of float32 rows a [R, K]: per row and block of K, scale = amax / 448 and the
    values rounded to the nearest e4m3 number (ties to even), in float32 arithmetic: 2^(e - 3) apart in
    [2^e, 2^(e+1)), 2^-9 below 2^-6. A slightly wrong floor(log2) at a power of two picks a grid on which
    the value rounds the same, so this equals the cast to e4m3 for every value (op/function_body_test.py)."""
    cols = -(-k // block)
    if cols * block != k:
        a = b.one("Pad", a, b.const([0, 0, 0, cols * block - k]))
    tiles = b.one("Reshape", a, b.const([-1, cols, block]))
    amax = b.op("TopK", b.one("Abs", tiles), b.const([1]), axis=-1, outputs=2)[0]  # [R, C, 1]
    scale = b.one(
        "Where",
        b.one("Greater", amax, b.f32(0.0)),
        b.one("Div", amax, b.f32(FP8_E4M3_MAX)),
        b.f32(1.0),
    )
    v = b.one("Div", tiles, scale)
    log2 = b.one("Div", b.one("Log", b.one("Abs", v)), b.f32(math.log(2.0)))
    exponent = b.one("Max", b.one("Floor", log2), b.f32(-6.0))  # Log(0) = -inf: the subnormal grid
    step = b.one("Pow", b.f32(2.0), b.one("Sub", exponent, b.f32(3.0)))
    q = b.one("Mul", b.one("Round", b.one("Div", v, step)), step)
    values = b.one("Reshape", b.one("Mul", q, scale), b.const([-1, cols * block]))
    if cols * block != k:
        values = b.one("Slice", values, b.const([0]), b.const([k]), b.const([1]))
    return values


def _route(b: _BodyBuilder, logits: str, attrs: MoEAttributes, correction: str | None) -> tuple[str, str]:
    """logits [T, E] -> (weights [T, k] float32, ids [T, k] int64), as `reference.route`."""
    k = b.const([attrs.top_k])
    last = b.const([-1])
    if attrs.topk_before_score:
        top, ids = b.op("TopK", logits, k, outputs=2, axis=-1, largest=1, sorted=1)
        return b.one("Softmax", top, axis=-1), ids

    scores = b.one("Softmax", logits, axis=-1) if attrs.scoring == "softmax" else b.one("Sigmoid", logits)
    choice = scores if correction is None else b.one("Add", scores, correction)
    if attrs.n_group > 1:
        per_group = attrs.num_experts // attrs.n_group
        grouped = b.one("Reshape", choice, b.const([-1, attrs.n_group, per_group]))
        best = b.op("TopK", grouped, b.const([min(2, per_group)]), outputs=2, axis=-1, largest=1, sorted=1)[0]
        group_scores = b.one("ReduceSum", best, last, keepdims=0)  # [T, G]
        group_ids = b.op("TopK", group_scores, b.const([attrs.topk_group]), outputs=2, axis=-1)[1]
        zeros = b.one("ConstantOfShape", b.one("Shape", group_scores), value=_scalar_tensor(0.0))
        ones = b.one("ConstantOfShape", b.one("Shape", group_ids), value=_scalar_tensor(1.0))
        group_mask = b.one("ScatterElements", zeros, group_ids, ones, axis=1)  # [T, G] 1.0 where kept
        expert_mask = b.one("Expand", b.one("Unsqueeze", group_mask, last), b.const([1, 1, per_group]))
        expert_mask = b.one("Reshape", expert_mask, b.const([0, attrs.num_experts]))
        keep = b.one("Greater", expert_mask, b.f32(0.5))
        choice = b.one("Where", keep, choice, b.f32(-np.inf))
    ids = b.op("TopK", choice, k, outputs=2, axis=-1, largest=1, sorted=1)[1]
    weights = b.one("GatherElements", scores, ids, axis=1)
    if attrs.norm_topk_prob:
        total = b.one("Add", b.one("ReduceSum", weights, last, keepdims=1), b.f32(1e-20))
        weights = b.one("Div", weights, total)
    if attrs.routed_scaling_factor != 1.0:
        weights = b.one("Mul", weights, b.f32(attrs.routed_scaling_factor))
    return weights, ids


def make_moe_function(
    attrs: MoEAttributes, overload: str | None = None, opset: int = 18, expose_ids: bool = False
) -> onnx.FunctionProto:
    """The standard-op body of the fused op for one variant (`opset`: the model's default-domain opset).

    `expose_ids` adds a last output, `EXPERT_IDS_OUTPUT`: the experts the body selected, so a diagnosis can
    see the routing onnxruntime actually took (not part of the op's contract; never written by the fusion).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"the MoE function body needs opset >= {MIN_OPSET}, got {opset}")
    b = _BodyBuilder()
    names = attrs.present_inputs()
    # Expert tables are gathered in their stored dtype and only the selected rows are cast: casting the
    # whole [E, ...] tables to float32 on every call would cost more than the experts' own work.
    x = {
        name: b.one("Cast", name, to=TensorProto.FLOAT, hint=f"{name}_f32")
        for name in names
        if not name.startswith("expert_")
    }
    hidden = x["hidden_states"]

    def gathered(name: str) -> str:
        rows = b.one("Gather", name, ids_flat, axis=0)
        return b.one("Cast", rows, to=TensorProto.FLOAT, hint=f"{name}_rows_f32")

    def expert_rows(which: str) -> str:
        """The selected experts' gate_up or down weights, float32 [S, N, K] (dequantized when quantized)."""
        if not attrs.is_quantized:
            return gathered(f"expert_{which}_weight")
        n, k = (
            (2 * attrs.intermediate_size, hidden_dim)
            if which == "gate_up"
            else (hidden_dim, attrs.intermediate_size)
        )
        return _dequantized_rows(b, attrs, which, ids_flat, n, k)

    logits = _linear(b, hidden, x["router_weight"])
    if attrs.has_router_bias:
        logits = b.one("Add", logits, x["router_bias"])
    weights, ids = _route(b, logits, attrs, x.get("score_correction_bias"))

    # Gather form: one row per (token, slot) pair, S = T * k, ordered token-major like TopK's output.
    flat = b.const([-1])
    ids_flat = b.one("Reshape", ids, flat)
    hidden_dim = attrs.hidden_size
    routed_hidden = hidden
    if attrs.has_fp8_activations:  # the routed experts' input as their fp8 GEMM sees it
        routed_hidden = _fp8_activations(b, hidden, hidden_dim, attrs.fp8_activation_block)
    tokens = b.one("Unsqueeze", routed_hidden, b.const([1]))  # [T, 1, H]
    tokens = b.one("Expand", tokens, b.const([1, attrs.top_k, 1]))
    tokens = b.one("Reshape", tokens, b.const([-1, hidden_dim, 1]))  # [S, H, 1]
    w_gate_up = expert_rows("gate_up")  # [S, 2I, H]
    gate_up = b.one("Squeeze", b.one("MatMul", w_gate_up, tokens), flat)  # [S, 2I]
    if attrs.has_expert_bias:
        gate_up = b.one("Add", gate_up, gathered("expert_gate_up_bias"))
    act = _glu(b, gate_up, attrs)  # [S, I]
    if attrs.has_fp8_activations:  # held in the op's dtype, then quantized for the down GEMM
        held = b.one("Cast", b.one("CastLike", act, "hidden_states"), to=TensorProto.FLOAT)
        act = _fp8_activations(b, held, attrs.intermediate_size, attrs.fp8_activation_block)
    w_down = expert_rows("down")  # [S, H, I]
    down = b.one("Squeeze", b.one("MatMul", w_down, b.one("Unsqueeze", act, flat)), flat)  # [S, H]
    if attrs.has_expert_bias:
        down = b.one("Add", down, gathered("expert_down_bias"))
    weighted = b.one("Mul", down, b.one("Reshape", weights, b.const([-1, 1])))
    per_slot = b.one("Reshape", weighted, b.const([-1, attrs.top_k, hidden_dim]))
    out = b.one("ReduceSum", per_slot, b.const([1]), keepdims=0)  # [T, H]

    if attrs.has_shared_expert:
        gate, up = _halves(b, _linear(b, hidden, x["shared_gate_up_weight"]), attrs.shared_intermediate_size)
        shared = _linear(b, b.one("Mul", _silu(b, gate), up), x["shared_down_weight"])
        if attrs.has_shared_gate:
            shared = b.one("Mul", b.one("Sigmoid", _linear(b, hidden, x["shared_gate_weight"])), shared)
        out = b.one("Add", out, shared)

    outputs = list(attrs.present_outputs())
    b.nodes.append(helper.make_node("CastLike", [out, "hidden_states"], [outputs[0]]))
    if attrs.output_router_logits:
        b.nodes.append(helper.make_node("CastLike", [logits, "hidden_states"], [outputs[1]]))
    if expose_ids:
        outputs.append(EXPERT_IDS_OUTPUT)
        b.nodes.append(helper.make_node("Identity", [ids], [EXPERT_IDS_OUTPUT]))
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(names),
        outputs,
        b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[],
        overload=overload if overload is not None else overload_name(attrs),
    )


def make_moe_node(
    attrs: MoEAttributes, inputs: list[str], outputs: list[str], overload: str, name: str = ""
) -> onnx.NodeProto:
    """A fused node (proto form) that calls the function `make_moe_function(attrs, overload)`."""
    node = helper.make_node(
        OP_TYPE, inputs, outputs, name=name or None, domain=DOMAIN, **attrs.to_onnx_attributes()
    )
    node.overload = overload
    return node
