"""The function body of every variant equals `moe_reference` under onnxruntime (fp32 ≤ 1e-5, fp16 ≤ 5e-3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from moetrt.op.function_body import make_moe_function, make_moe_node, overload_name
from moetrt.op.reference import moe_reference, random_inputs
from moetrt.op.spec import DOMAIN, DOMAIN_VERSION, MoEAttributes

_BASE = {"num_experts": 8, "top_k": 2, "hidden_size": 16, "intermediate_size": 12}

VARIANTS: dict[str, MoEAttributes] = {
    "softmax_plain": MoEAttributes(**_BASE),
    "softmax_renorm": MoEAttributes(**_BASE, norm_topk_prob=True),
    "topk_before_softmax_swiglu_bias": MoEAttributes(
        **_BASE,
        topk_before_score=True,
        activation="swiglu_clamped",
        swiglu_limit=1.5,
        swiglu_alpha=1.3,
        has_expert_bias=True,
        has_router_bias=True,
    ),
    "sigmoid_grouped_bias_scaled_shared": MoEAttributes(
        **{**_BASE, "top_k": 3},
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        has_score_correction_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        shared_intermediate_size=10,
    ),
    "sigmoid_ungrouped_unnormalised": MoEAttributes(**_BASE, scoring="sigmoid"),
    "gelu_shared_gate_logits": MoEAttributes(
        **_BASE,
        activation="gelu_glu",
        shared_intermediate_size=6,
        has_shared_gate=True,
        output_router_logits=True,
    ),
    "gelu_tanh_top1": MoEAttributes(**{**_BASE, "top_k": 1}, activation="gelu_tanh_glu"),
}


def run_single_node(attrs: MoEAttributes, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """One fused node + its function in a model, run by onnxruntime."""
    overload = overload_name(attrs)
    names = list(attrs.present_inputs())
    outputs = list(attrs.present_outputs())
    elem = helper.np_dtype_to_tensor_dtype(inputs["hidden_states"].numpy().dtype)
    graph = helper.make_graph(
        [make_moe_node(attrs, names, outputs, overload, name="moe0")],
        "single_moe",
        [
            helper.make_tensor_value_info(
                n, helper.np_dtype_to_tensor_dtype(inputs[n].numpy().dtype), list(inputs[n].shape)
            )
            for n in names
        ],
        [helper.make_tensor_value_info(n, elem, ["T", None]) for n in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[make_moe_function(attrs, overload)],
        ir_version=10,
    )
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: inputs[n].numpy() for n in names})


def rel_err(out: np.ndarray, ref: torch.Tensor) -> float:
    ref64 = ref.double().numpy()
    return float(np.linalg.norm(out.astype(np.float64) - ref64) / np.linalg.norm(ref64))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_body_matches_reference_fp32(variant: str, num_tokens: int) -> None:
    attrs = VARIANTS[variant]
    inputs = random_inputs(attrs, num_tokens, seed=num_tokens)
    got = run_single_node(attrs, inputs)
    ref = moe_reference(inputs, attrs, compute_dtype=torch.float64)
    assert rel_err(got[0], ref["output"]) <= 1e-5
    if attrs.output_router_logits:
        assert rel_err(got[1], ref["router_logits"]) <= 1e-5


def test_body_matches_reference_fp16() -> None:
    attrs = VARIANTS["sigmoid_grouped_bias_scaled_shared"]
    inputs = random_inputs(attrs, 17, dtype=torch.float16, seed=3)
    got = run_single_node(attrs, inputs)
    assert got[0].dtype == np.float16
    assert rel_err(got[0], moe_reference(inputs, attrs)["output"]) <= 5e-3


def test_swiglu_clamp_is_exercised() -> None:
    # A small limit and large inputs make sure the clamps change the result (else the check is vacuous).
    attrs = VARIANTS["topk_before_softmax_swiglu_bias"]
    inputs = random_inputs(attrs, 9, seed=1)
    inputs["hidden_states"] = inputs["hidden_states"] * 6
    unclamped = moe_reference(
        inputs,
        MoEAttributes(
            **{**_BASE},
            topk_before_score=True,
            activation="swiglu_clamped",
            swiglu_limit=1e6,
            swiglu_alpha=1.3,
            has_expert_bias=True,
            has_router_bias=True,
        ),
    )
    ref = moe_reference(inputs, attrs)
    assert rel_err(unclamped["output"].numpy(), ref["output"]) > 1e-2
    assert rel_err(run_single_node(attrs, inputs)[0], ref["output"]) <= 1e-5


def test_overload_names_differ_per_variant() -> None:
    names = {overload_name(a) for a in VARIANTS.values()}
    assert len(names) == len(VARIANTS)
    assert overload_name(VARIANTS["softmax_plain"]) == overload_name(MoEAttributes(**_BASE))


def run_single_node_bf16(attrs: MoEAttributes, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Like run_single_node for bf16 tensors: onnxruntime takes no bf16 arrays from numpy, so the model gets
    float32 inputs cast to bf16 in front of the node and its bf16 outputs cast to float32 behind it."""
    overload = overload_name(attrs)
    names = list(attrs.present_inputs())
    outputs = list(attrs.present_outputs())
    nodes = [helper.make_node("Cast", [f"{n}_f32"], [n], to=onnx.TensorProto.BFLOAT16) for n in names]
    nodes.append(make_moe_node(attrs, names, outputs, overload, name="moe0"))
    nodes += [helper.make_node("Cast", [n], [f"{n}_f32"], to=onnx.TensorProto.FLOAT) for n in outputs]
    graph = helper.make_graph(
        nodes,
        "single_moe_bf16",
        [
            helper.make_tensor_value_info(f"{n}_f32", onnx.TensorProto.FLOAT, list(inputs[n].shape))
            for n in names
        ],
        [helper.make_tensor_value_info(f"{n}_f32", onnx.TensorProto.FLOAT, ["T", None]) for n in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[make_moe_function(attrs, overload)],
        ir_version=10,
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {f"{n}_f32": inputs[n].float().numpy() for n in names})


@pytest.mark.parametrize(
    "variant",
    ["sigmoid_grouped_bias_scaled_shared", "topk_before_softmax_swiglu_bias", "gelu_shared_gate_logits"],
)
def test_body_runs_in_bf16(variant: str) -> None:
    # The body casts bf16 inputs to float32 and its outputs back, so it runs where bf16 kernels are missing.
    attrs = VARIANTS[variant]
    inputs = random_inputs(attrs, 23, dtype=torch.bfloat16, seed=4)
    got = run_single_node_bf16(attrs, inputs)
    ref = moe_reference(inputs, attrs)
    assert rel_err(got[0], ref["output"].float()) <= 1e-2
    if attrs.output_router_logits:
        assert rel_err(got[1], ref["router_logits"].float()) <= 1e-2


#: Quantized experts: (format, block, zero points) on variants with biases, a shared expert and router logits.
QUANTIZED = [
    ("fp8_block", 16, False),
    ("fp8_block", 128, False),
    ("int4", 4, False),
    ("int4", 4, True),
    ("mxfp4", 32, False),
]


@pytest.mark.parametrize(("fmt", "block", "zero"), QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantized_body_dequantizes_like_the_reference(
    fmt: str, block: int, zero: bool, dtype: torch.dtype
) -> None:
    """The body's dequantization (gathered codes, lookup tables, repeated scales) is the reference's, exactly
    up to float32 sums; the bound is the dtype's."""
    base = {**_BASE, "hidden_size": 64, "intermediate_size": 32}
    attrs = MoEAttributes(
        **base,
        weight_format=fmt,
        weight_block=block,
        has_weight_zero_point=zero,
        shared_intermediate_size=8,
        has_expert_bias=True,
        output_router_logits=True,
    )
    inputs = random_inputs(attrs, 11, dtype=dtype, seed=7)
    assert inputs["expert_gate_up_weight"].dtype == torch.uint8
    got = run_single_node(attrs, inputs)
    ref = moe_reference(inputs, attrs, compute_dtype=torch.float64)
    bound = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel_err(got[0], ref["output"]) <= bound
    assert rel_err(got[1], ref["router_logits"]) <= bound


def test_body_fp8_rounding_equals_the_cast() -> None:
    """`_fp8_activations` in float32 arithmetic = `op.quant.fp8_activations` (torch's cast to e4m3) for every
    e4m3 value, the ties between neighbours, values next to powers of two, subnormals, zeros, and a short
    last block."""
    from moetrt.op.function_body import _BodyBuilder, _fp8_activations
    from moetrt.op.quant import fp8_activations, fp8_e4m3_table

    table = fp8_e4m3_table()
    finite = np.unique(table[np.isfinite(table)])
    ties = (finite[:-1] + finite[1:]) / 2
    near = np.concatenate([np.nextafter(finite, np.inf), np.nextafter(finite, -np.inf)])
    values = np.concatenate([finite, ties, near, [0.0, -0.0, 448.0, -448.0]]).astype(np.float32)
    rng = np.random.default_rng(3)
    rows = []
    for start in range(0, values.size, 127):  # 127 values and the row's own 448 set each block's scale to 1
        chunk = values[start : start + 127]
        rows.append(
            np.concatenate([chunk, np.zeros(127 - chunk.size, np.float32), [448.0]]).astype(np.float32)
        )
    exact = np.stack(rows)  # [R, 128]: one block per row, scale 1: the rounding itself
    scaled = rng.standard_normal((5, 300)).astype(np.float32) * np.float32(3.0)  # scales, a block of 44
    scaled[1, 128:256] = 0.0  # an all-zero block
    for x, block in ((exact, 128), (scaled, 128)):
        b = _BodyBuilder()
        out = _fp8_activations(b, "x", x.shape[1], block)
        b.nodes.append(helper.make_node("Identity", [out], ["y"]))
        graph = helper.make_graph(
            b.nodes,
            "fp8",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        want = fp8_activations(torch.from_numpy(x), block).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activation_body_matches_the_reference(dtype: torch.dtype) -> None:
    """fp8 activations: the body quantizes x and the activation (held in the op's dtype) per token and block
    as the reference does; both differ from the weight-only op by more than the quantization noise floor."""
    base = {**_BASE, "hidden_size": 256, "intermediate_size": 160}
    attrs = MoEAttributes(
        **base,
        weight_format="fp8_block",
        weight_block=128,
        activation_format="fp8_block",
        shared_intermediate_size=8,
        has_expert_bias=True,
    )
    inputs = random_inputs(attrs, 9, dtype=dtype, seed=5)
    if dtype == torch.bfloat16:  # onnxruntime's CPU MatMul has no bf16: run the body on float32 inputs
        inputs = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in inputs.items()}
    got = run_single_node(attrs, inputs)
    ref = moe_reference(inputs, attrs, compute_dtype=torch.float64)
    assert rel_err(got[0], ref["output"]) <= 1e-5
    weight_only = moe_reference(inputs, dataclasses.replace(attrs, activation_format="native"), torch.float64)
    assert rel_err(weight_only["output"].numpy(), ref["output"]) > 1e-3
