"""Rule `moe_gather_experts` on small hand-written gather-form graphs: what it reads, and every refusal's reason.

The graphs are built here node by node (no exporter), so each test pins one routing or expert variant and one
check of the rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from moetrt_testing.graphs import rel_err, run_onnx
from onnx import TensorProto, helper, numpy_helper

from moetrt.op.spec import MoEAttributes
from moetrt.passes import fuse_model
from moetrt.passes.base import node_order, opset_imports
from moetrt.passes.moe_rule import RULE_CORE, RULE_ROUTING, Refusal, RuleRefused, match_moe_block
from moetrt.passes.moe_rule.routing import NO_ROUTING_FORM

E, K, H, I_ = 6, 2, 8, 4  # experts, top-k, hidden, intermediate


def _const(name: str, values: list[int] | list[float], dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    array = np.array(values, dtype=np.int64 if dtype == TensorProto.INT64 else np.float32)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def gather_moe(
    routing: str = "softmax_renorm", activation: str = "silu", largest: int = 1
) -> onnx.ModelProto:
    """x [T, H] -> y [T, H]: a router, `routing`, and experts written in the gather form (batched MatMuls)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((H, E)).astype(np.float32), "router_wT"),
        numpy_helper.from_array(rng.standard_normal((E, 2 * I_, H)).astype(np.float32) * 0.3, "gate_up"),
        numpy_helper.from_array(rng.standard_normal((E, H, I_)).astype(np.float32) * 0.3, "down"),
        numpy_helper.from_array(rng.standard_normal(E).astype(np.float32) * 0.1, "correction"),
    ]
    n = helper.make_node
    nodes = [
        _const("k", [K]),
        _const("last", [-1]),
        _const("one", [1]),
        n("MatMul", ["x", "router_wT"], ["logits"]),
    ]
    weights = "weights"
    if routing.startswith("topk_softmax"):
        nodes += [
            n("TopK", ["logits", "k"], ["topv", "topi"], largest=largest),
            n("Softmax", ["topv"], ["w0"]),
        ]
        if routing.endswith("scaled"):
            nodes += [_const("scale", [2.5], TensorProto.FLOAT), n("Mul", ["w0", "scale"], [weights])]
        else:
            nodes += [n("Identity", ["w0"], [weights])]
    elif routing.startswith("gathered"):
        nodes += [
            n("Sigmoid", ["logits"], ["scores"]),
            n("Add", ["scores", "correction"], ["choice"]),
            n("TopK", ["choice", "k"], ["topv", "topi"], largest=largest),
            n("GatherElements", ["scores", "topi"], ["picked"], axis=1),
            n("ReduceSum", ["picked", "last"], ["sum"], keepdims=1),
            n("Div", ["picked", "sum"], [weights]),
        ]
    else:
        scoring = "Sigmoid" if routing.startswith("sigmoid") else "Softmax"
        nodes += [
            n(scoring, ["logits"], ["scores"], **({"axis": -1} if scoring == "Softmax" else {})),
            n("TopK", ["scores", "k"], ["topv", "topi"], largest=largest),
        ]
        if routing.endswith("renorm"):
            nodes += [
                n("ReduceSum", ["topv", "last"], ["sum"], keepdims=1),
                n("Div", ["topv", "sum"], [weights]),
            ]
        elif routing.endswith("renorm_other"):
            nodes += [
                n("ReduceSum", ["scores", "last"], ["sum"], keepdims=1),
                n("Div", ["topv", "sum"], [weights]),
            ]
        elif routing.endswith("scaled"):
            nodes += [_const("scale", [2.5], TensorProto.FLOAT), n("Mul", ["topv", "scale"], [weights])]
        elif routing.endswith("times_input"):
            nodes += [
                n("ReduceMean", ["x", "last"], ["mean"], keepdims=1),
                n("Mul", ["topv", "mean"], [weights]),
            ]
        elif routing.endswith("relu"):
            nodes += [n("Relu", ["topv"], [weights])]
        else:
            nodes += [n("Identity", ["topv"], [weights])]
    nodes += [
        n("Reshape", ["topi", "last"], ["ids"]),
        _const("x_rows", [-1, H, 1]),
        _const("spread", [1, K, 1]),
        n("Unsqueeze", ["x", "one"], ["x1"]),
        n("Expand", ["x1", "spread"], ["xk"]),
        n("Reshape", ["xk", "x_rows"], ["xcol"]),
        n("Gather", ["gate_up", "ids"], ["gu_w"], axis=0),
        n("MatMul", ["gu_w", "xcol"], ["gu3"]),
        n("Squeeze", ["gu3", "last"], ["gu"]),
        n("Split", ["gu"], ["gate", "up"], axis=-1, num_outputs=2),
    ]
    if activation == "silu":
        nodes += [
            n("Sigmoid", ["gate"], ["sg"]),
            n("Mul", ["gate", "sg"], ["silu"]),
            n("Mul", ["silu", "up"], ["act"]),
        ]
    else:  # a ReLU GLU: not an activation of the op
        nodes += [n("Relu", ["gate"], ["rg"]), n("Mul", ["rg", "up"], ["act"])]
    nodes += [
        n("Unsqueeze", ["act", "last"], ["act3"]),
        n("Gather", ["down", "ids"], ["dn_w"], axis=0),
        n("MatMul", ["dn_w", "act3"], ["dn3"]),
        n("Squeeze", ["dn3", "last"], ["dn"]),
        _const("w_col", [-1, 1]),
        n("Reshape", [weights, "w_col"], ["wcol"]),
        n("Mul", ["dn", "wcol"], ["weighted"]),
        _const("tkh", [-1, K, H]),
        n("Reshape", ["weighted", "tkh"], ["per_slot"]),
        n("ReduceSum", ["per_slot", "one"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _match(model: onnx.ModelProto) -> MoEAttributes:
    ir_model = ir.serde.deserialize_model(model)
    (topk,) = [node for node in ir_model.graph if node.op_type == "TopK"]
    return match_moe_block(topk, node_order(ir_model.graph), opset_imports(ir_model)).attrs


def _refusal(model: onnx.ModelProto) -> Refusal:
    with pytest.raises(RuleRefused) as caught:
        _match(model)
    return caught.value.refusal


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ("softmax", {}),
        ("softmax_renorm", {"norm_topk_prob": True}),
        ("sigmoid_scaled", {"scoring": "sigmoid", "routed_scaling_factor": 2.5}),
        ("topk_softmax", {"topk_before_score": True}),
        (
            "gathered_renorm",
            {"scoring": "sigmoid", "has_score_correction_bias": True, "norm_topk_prob": True},
        ),
    ],
)
def test_routing_variants_are_read_into_the_attributes(routing: str, expected: dict[str, object]) -> None:
    assert _match(gather_moe(routing)) == MoEAttributes(E, K, H, I_, **expected)  # type: ignore[arg-type]


def test_a_matched_block_fuses_and_computes_the_same() -> None:
    model = gather_moe("softmax_renorm")
    result = fuse_model(model)
    assert result.num_fused == 1 and not result.unfused_candidates
    x = np.random.default_rng(1).standard_normal((5, H)).astype(np.float32)
    (want,), (got,) = run_onnx(model, {"x": x}), run_onnx(result.model, {"x": x})
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    ("model_args", "rule", "check"),
    [
        ({"largest": 0}, RULE_CORE, "TopK selects the smallest values"),
        ({"activation": "relu"}, RULE_CORE, "expert activation is not a GLU the op supports"),
        (
            {"routing": "softmax_times_input"},
            RULE_ROUTING,
            "routing weights are multiplied by a non-constant",
        ),
        ({"routing": "softmax_renorm_other"}, RULE_ROUTING, "renorm divides by the sum of another tensor"),
        ({"routing": "softmax_relu"}, RULE_ROUTING, NO_ROUTING_FORM),
        ({"routing": "topk_softmax_scaled"}, RULE_ROUTING, "routed scaling factor with top-k before softmax"),
    ],
)
def test_each_refusal_names_the_stage_and_the_check(
    model_args: dict[str, object], rule: str, check: str
) -> None:
    refusal = _refusal(gather_moe(**model_args))  # type: ignore[arg-type]
    assert refusal.rule == rule and check in refusal.check, refusal


def test_a_refused_block_stays_unfused_with_its_reason() -> None:
    result = fuse_model(gather_moe("softmax_relu"))
    assert result.num_fused == 0
    (candidate,) = result.unfused_candidates
    assert (candidate.rule, candidate.check) == (RULE_ROUTING, NO_ROUTING_FORM)
