"""Every Triton kernel of the fused MoE op, run through Triton's CPU interpreter, against the PyTorch oracle.

The kernels run in ONE child process per group of cases with TRITON_INTERPRET=1 set before Triton is
imported, so the interpreter never leaks into other test modules of the same (xdist) worker. Each case
runs the full launch sequence (router logits, top-k, align, gate_up, down, reduce) through
`moe_forward_triton` and is compared with `moe_reference` in float64 by relative norm error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from moetrt_testing.interpreter import run_in_interpreter

from moetrt.core.dtypes import KERNEL_NAMES
from moetrt.core.tolerances import tolerance
from moetrt.op.presets import like
from moetrt.op.spec import MoEAttributes

# Small shapes: every dimension still exercises masking (E not a power of two where allowed, H % BK != 0).
VARIANTS: dict[str, MoEAttributes] = {
    "softmax_renorm": MoEAttributes(8, 2, 48, 32, norm_topk_prob=True),
    "softmax_no_renorm": MoEAttributes(12, 3, 48, 40),
    "topk_before_softmax": MoEAttributes(8, 2, 48, 32, topk_before_score=True),
    "sigmoid_grouped_bias_scaled": like(
        "deepseek_v3", 16, 4, 48, 32, n_group=4, topk_group=2, shared_intermediate_size=0
    ),
    "gelu_glu": MoEAttributes(8, 2, 48, 32, activation="gelu_glu"),
    "gelu_tanh_glu": MoEAttributes(8, 2, 48, 32, activation="gelu_tanh_glu"),
    "swiglu_clamped_biases": like("gpt_oss_20b", 8, 2, 48, 32, swiglu_limit=1.5),
    "shared_gated_logits": MoEAttributes(
        12,
        3,
        48,
        32,
        norm_topk_prob=True,
        shared_intermediate_size=40,
        has_shared_gate=True,
        output_router_logits=True,
    ),
    "shared_ungated": MoEAttributes(8, 2, 48, 32, shared_intermediate_size=32),
    # quantized routed experts (dequantized inside the expert GEMMs; the shared expert stays native)
    "fp8_shared_gated": MoEAttributes(
        12, 3, 64, 32, norm_topk_prob=True, shared_intermediate_size=32, has_shared_gate=True,
        weight_format="fp8_block", weight_block=16,
    ),
    "int4_zero_swiglu_biases": like(
        "gpt_oss_20b", 8, 2, 64, 32, swiglu_limit=1.5, weight_format="int4", weight_block=32,
        has_weight_zero_point=True,
    ),
    # symmetric int4 (zero point 8): the decoder's other offset
    "int4_symmetric": like("qwen3_next", 8, 2, 64, 32, weight_format="int4", weight_block=32),
    "fp8_activations": MoEAttributes(
        12, 3, 64, 64, norm_topk_prob=True, shared_intermediate_size=32, has_shared_gate=True,
        weight_format="fp8_block", weight_block=32, activation_format="fp8_block", has_expert_bias=True,
    ),
    # reduction and N not multiples of the block (96 = 64 + a short block): gate_up's up rows start inside a
    # weight block (scales per row), the last activation block is short
    "fp8_activations_ragged": MoEAttributes(
        8, 2, 64, 96, shared_intermediate_size=32, weight_format="fp8_block", weight_block=64,
        activation_format="fp8_block",
    ),
    "mxfp4_sigmoid_grouped": like(
        "deepseek_v3", 16, 4, 64, 32, n_group=4, topk_group=2, shared_intermediate_size=0,
        weight_format="mxfp4", weight_block=32,
    ),
}  # fmt: skip

# (variant, dtype, T, bucket): T=1 and a decode T take the decode path (fused align / reduce), T=70 the
# prefill path; "prefill" forces the prefill path for a decode-sized T, "auto" picks by T, "split" runs
# the router over 3 slices of H (summed by the top-k kernel), as large shapes do at decode, "fused" the
# decode path's single experts kernel (gate_up + down with fp32 atomics, its last program casting the sum), "gemv" the
# expert-group path (a tuning candidate) with small tiles ("gemv+fused": with the fused switch also on, which
# the group path overrides), "sorted" the sorted decode path at T = 1 with every other switch off,
# "scaled" quantized tiles inside one scale group (K 16 for fp8, 32 for 4-bit codes), so the scales multiply
# each tile's product (`plan.scales_on_product`), "+cvt" with fp8 converted by Triton's e4m3 type (the
# SM90+ form), "perweight" quantized tiles dequantized per weight (`weight_tile`): gate_up tiles of K 64
# across groups below 64 tokens, and by the config's `dequant.per_weight` switch, "splitk" gate_up split two to
# four ways over H (`gate_up.SK`: partial sums, the tile's last program applies the activation), "routed" the
# routed path (routing, gate_up and down in one launch after the router; H-tile units wait for the token's
# gate_up units) with the gemv and fused switches also on, which it overrides, "routed+fused" its form with the
# down products added by the gate_up units (fp32 atomics, the last unit casts), "wide" the sorted decode path
# with 64-row expert blocks (configs.WIDE_DECODE_GATE_UP: few experts, many tokens each), "+splitk" with
# gate_up split two ways over H as well (the tuner pairs them), "grouped" the sorted paths with the row
# blocks taking each weight tile in groups (`gate_up.GM` 3, `down.GM` 2: grids of whole groups of 6 blocks),
# "tma" the grouped GEMMs with their tiles by TMA where plan.uses_tma allows (TMA_STAGES: where it does),
# "+persist" with 3 persistent programs each (plan.persistent_programs: prefill only; PERSIST_STAGES),
# "in_router" the router kernel's last program routing (plan.routes_in_router: no top-k launch; the launcher's
# ticket must be zero again after the call, which moe_forward_triton checks), "+fused" on the fused decode
# path, "+split" with the router over 3 slices of H (more programs taking tickets); "gatecol" (alone: the "auto"
# config) the router's shared gate in a column of programs of its own (`router.GATE_COL`), "+gatecol" on a case.
FAST_CASES: list[tuple[str, str, int, str]] = [
    ("shared_ungated", "bfloat16", 70, "tma"),
    ("shared_gated_logits", "float16", 40, "tma"),
    ("swiglu_clamped_biases", "bfloat16", 37, "tma"),
    ("softmax_renorm", "float32", 70, "tma"),
    ("shared_ungated", "float16", 13, "tma+grouped"),
    ("shared_ungated", "bfloat16", 70, "tma+persist"),
    ("shared_gated_logits", "float16", 70, "tma+persist"),
    ("swiglu_clamped_biases", "bfloat16", 70, "tma+persist+grouped"),
    ("softmax_renorm", "float32", 70, "tma+persist"),
    ("shared_ungated", "float16", 13, "tma+persist"),
    ("int4_zero_swiglu_biases", "bfloat16", 40, "tma"),
    ("softmax_renorm", "float32", 0, "auto"),
    ("softmax_renorm", "float32", 1, "auto"),
    ("softmax_renorm", "bfloat16", 37, "auto"),
    ("softmax_renorm", "float16", 70, "auto"),
    ("softmax_no_renorm", "float32", 13, "auto"),
    ("topk_before_softmax", "bfloat16", 5, "auto"),
    ("sigmoid_grouped_bias_scaled", "float32", 0, "auto"),
    ("sigmoid_grouped_bias_scaled", "float32", 9, "auto"),
    ("sigmoid_grouped_bias_scaled", "bfloat16", 70, "auto"),
    ("gelu_glu", "float16", 6, "auto"),
    ("gelu_tanh_glu", "float32", 70, "auto"),
    ("swiglu_clamped_biases", "float32", 11, "auto"),
    ("swiglu_clamped_biases", "bfloat16", 70, "auto"),
    ("shared_gated_logits", "float32", 1, "auto"),
    ("shared_gated_logits", "bfloat16", 20, "auto"),
    ("shared_gated_logits", "float16", 70, "auto"),
    ("shared_gated_logits", "float32", 7, "prefill"),
    ("shared_ungated", "float16", 3, "auto"),
    ("shared_gated_logits", "bfloat16", 5, "split"),
    ("swiglu_clamped_biases", "float32", 70, "split"),
    ("sigmoid_grouped_bias_scaled", "bfloat16", 70, "split"),
    ("shared_gated_logits", "bfloat16", 70, "split"),
    ("shared_gated_logits", "float32", 1, "fused"),
    ("shared_gated_logits", "bfloat16", 20, "fused"),
    ("swiglu_clamped_biases", "float16", 9, "fused"),
    ("sigmoid_grouped_bias_scaled", "bfloat16", 64, "fused"),
    ("softmax_renorm", "bfloat16", 1, "sorted"),
    ("softmax_no_renorm", "float16", 1, "auto"),
    ("topk_before_softmax", "bfloat16", 1, "gemv"),
    ("shared_gated_logits", "bfloat16", 13, "gemv"),
    ("sigmoid_grouped_bias_scaled", "float32", 16, "gemv"),
    ("swiglu_clamped_biases", "float16", 2, "gemv"),
    ("shared_ungated", "float32", 5, "gemv"),
    ("shared_gated_logits", "bfloat16", 1, "gemv+fused"),
    ("fp8_shared_gated", "float32", 1, "auto"),
    ("fp8_shared_gated", "bfloat16", 13, "auto"),
    ("fp8_shared_gated", "bfloat16", 70, "auto"),
    ("int4_zero_swiglu_biases", "float32", 2, "auto"),
    ("int4_zero_swiglu_biases", "float16", 70, "auto"),
    ("mxfp4_sigmoid_grouped", "bfloat16", 1, "auto"),
    ("mxfp4_sigmoid_grouped", "float32", 70, "auto"),
    ("fp8_shared_gated", "bfloat16", 13, "scaled"),
    ("fp8_shared_gated", "bfloat16", 1, "scaled+cvt"),
    ("fp8_shared_gated", "float32", 70, "scaled+cvt"),
    ("fp8_shared_gated", "float16", 70, "scaled"),
    ("int4_zero_swiglu_biases", "bfloat16", 9, "scaled"),
    ("int4_symmetric", "float16", 9, "scaled"),
    ("int4_zero_swiglu_biases", "bfloat16", 70, "perweight+prefill"),
    ("mxfp4_sigmoid_grouped", "float16", 40, "perweight+prefill"),
    ("fp8_shared_gated", "bfloat16", 9, "perweight+prefill"),
    ("int4_symmetric", "bfloat16", 70, "auto"),
    ("int4_zero_swiglu_biases", "float32", 70, "scaled"),
    ("mxfp4_sigmoid_grouped", "float16", 3, "scaled"),
    ("mxfp4_sigmoid_grouped", "bfloat16", 70, "scaled"),
    ("fp8_shared_gated", "bfloat16", 9, "perweight"),
    ("int4_zero_swiglu_biases", "float16", 5, "perweight"),
    ("int4_zero_swiglu_biases", "bfloat16", 70, "perweight"),
    ("mxfp4_sigmoid_grouped", "bfloat16", 2, "perweight"),
    ("fp8_shared_gated", "bfloat16", 70, "perweight"),
    ("fp8_activations", "bfloat16", 1, "auto"),
    ("fp8_activations", "bfloat16", 13, "auto"),
    ("fp8_activations", "float16", 70, "auto"),
    ("fp8_activations", "bfloat16", 2, "splitk"),
    ("fp8_activations_ragged", "bfloat16", 5, "auto"),
    ("fp8_activations_ragged", "float16", 70, "auto"),
    ("shared_gated_logits", "float32", 1, "splitk"),
    ("swiglu_clamped_biases", "bfloat16", 13, "splitk"),
    ("sigmoid_grouped_bias_scaled", "float16", 40, "splitk"),
    ("fp8_shared_gated", "bfloat16", 2, "splitk"),
    ("int4_zero_swiglu_biases", "float32", 9, "splitk"),
    ("mxfp4_sigmoid_grouped", "bfloat16", 1, "splitk"),
    ("softmax_renorm", "float32", 70, "grouped"),
    ("shared_gated_logits", "bfloat16", 13, "grouped"),
    ("int4_zero_swiglu_biases", "float16", 40, "grouped"),
    ("fp8_activations", "bfloat16", 70, "grouped"),
    ("softmax_renorm", "float32", 37, "wide"),
    ("shared_gated_logits", "bfloat16", 5, "wide"),
    ("int4_zero_swiglu_biases", "float16", 13, "wide"),
    ("int4_zero_swiglu_biases", "bfloat16", 20, "wide+splitk"),
    ("shared_gated_logits", "float16", 9, "wide+splitk"),
    ("softmax_renorm", "float32", 1, "routed"),
    ("shared_gated_logits", "bfloat16", 13, "routed"),
    ("sigmoid_grouped_bias_scaled", "float32", 9, "routed"),
    ("swiglu_clamped_biases", "float16", 2, "routed"),
    ("topk_before_softmax", "bfloat16", 16, "routed"),
    ("fp8_shared_gated", "bfloat16", 1, "routed"),
    ("int4_zero_swiglu_biases", "float32", 2, "routed"),
    ("mxfp4_sigmoid_grouped", "bfloat16", 4, "routed"),
    ("fp8_activations", "bfloat16", 3, "routed"),
    ("shared_gated_logits", "float32", 1, "routed+fused"),
    ("shared_ungated", "float16", 5, "routed+fused"),
    ("swiglu_clamped_biases", "bfloat16", 9, "routed+fused"),
    ("fp8_shared_gated", "float32", 7, "routed+fused"),
    ("int4_zero_swiglu_biases", "bfloat16", 1, "routed+fused"),
    ("mxfp4_sigmoid_grouped", "float16", 3, "routed+fused"),  # BN 16: H-tile units (plan.routed_fused)
    ("softmax_renorm", "float32", 1, "in_router"),
    ("topk_before_softmax", "bfloat16", 1, "in_router"),
    ("shared_gated_logits", "bfloat16", 1, "in_router+split"),
    ("sigmoid_grouped_bias_scaled", "float16", 1, "in_router+fused"),
    ("shared_gated_logits", "float32", 1, "in_router+fused+split"),
    ("swiglu_clamped_biases", "float16", 2, "in_router"),  # the T <= 16 bucket: 16 x top-2 = 32 slots
    ("swiglu_clamped_biases", "bfloat16", 13, "in_router+split"),
    ("fp8_activations", "bfloat16", 1, "in_router"),  # the router's quantizing programs take tickets too
    ("int4_zero_swiglu_biases", "bfloat16", 1, "in_router"),
    ("mxfp4_sigmoid_grouped", "bfloat16", 1, "in_router+split"),
    ("shared_gated_logits", "bfloat16", 70, "gatecol"),
    ("shared_gated_logits", "float32", 1, "gatecol"),
    ("shared_gated_logits", "float16", 5, "split+gatecol"),
    ("shared_gated_logits", "float32", 1, "in_router+split+gatecol"),  # the gate's programs take tickets too
    ("fp8_activations", "bfloat16", 70, "gatecol"),  # the quantizing columns after the gate's
    ("fp8_activations", "bfloat16", 1, "in_router+gatecol"),
    ("shared_ungated", "float16", 13, "gatecol"),  # no shared gate: no column, the switch ignored
]
# The stages that load by TMA in the "tma" cases: H = 48 is no whole number of BK = 32 tiles (gate_up's last
# tile loads zeros past H); the shared expert's 40 columns are no whole number of down's BK = 16 tiles, so
# down_rows keeps pointer loads there; quantized experts keep them in both.
TMA_STAGES = {
    "shared_ungated-bfloat16-T70-tma": ["gate_up", "down_rows"],
    "shared_gated_logits-float16-T40-tma": ["gate_up"],
    "swiglu_clamped_biases-bfloat16-T37-tma": ["gate_up", "down_rows"],
    "softmax_renorm-float32-T70-tma": ["gate_up", "down_rows"],
    "shared_ungated-float16-T13-tma+grouped": ["gate_up", "down_rows"],
    "int4_zero_swiglu_biases-bfloat16-T40-tma": [],
    "shared_ungated-bfloat16-T70-tma+persist": ["gate_up", "down_rows"],
    "shared_gated_logits-float16-T70-tma+persist": ["gate_up"],
    "swiglu_clamped_biases-bfloat16-T70-tma+persist+grouped": ["gate_up", "down_rows"],
    "softmax_renorm-float32-T70-tma+persist": ["gate_up", "down_rows"],
    "shared_ungated-float16-T13-tma+persist": ["gate_up", "down_rows"],
}
# The stages that run persistent programs (plan.persistent_programs) in the "persist" cases: prefill buckets
# (T = 70) of stages that load by TMA; a decode bucket (T = 13) keeps one program per tile.
PERSIST_STAGES = {
    "shared_ungated-bfloat16-T70-tma+persist": ["gate_up", "down_rows"],
    "shared_gated_logits-float16-T70-tma+persist": ["gate_up"],
    "swiglu_clamped_biases-bfloat16-T70-tma+persist+grouped": ["gate_up", "down_rows"],
    "softmax_renorm-float32-T70-tma+persist": ["gate_up", "down_rows"],
}
SLOW_CASES: list[tuple[str, str, int, str]] = [
    (variant, dtype, t, "auto")
    for variant in VARIANTS
    for dtype in KERNEL_NAMES
    for t in (1, 16, 64, 130)
    if (variant, dtype, t, "auto") not in FAST_CASES
]


def _case_id(case: tuple[str, str, int, str]) -> str:
    variant, dtype, t, bucket = case
    return f"{variant}-{dtype}-T{t}" + ("" if bucket == "auto" else f"-{bucket}")


def _run_in_interpreter(cases: list[tuple[str, str, int, str]]) -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__, json.dumps(cases), timeout=1200)


@pytest.fixture(scope="module")
def fast_results() -> dict[str, dict[str, Any]]:
    return _run_in_interpreter(FAST_CASES)


@pytest.fixture(scope="module")
def slow_results() -> dict[str, dict[str, Any]]:
    return _run_in_interpreter(SLOW_CASES)


def _check(result: dict[str, Any], dtype: str, num_tokens: int) -> None:
    assert "error" not in result, result.get("error")
    for name, shape in result["shapes"].items():
        assert shape[0] == num_tokens, f"{name} has shape {shape}"
    if num_tokens == 0:
        return
    for name, err in result["rel_err"].items():
        assert not result["nan"][name], f"{name} has NaN (an element was never written)"
        assert err <= tolerance(dtype), f"{name}: rel err {err:.3e} > {tolerance(dtype):.0e}"


@pytest.mark.parametrize("case", FAST_CASES, ids=_case_id)
def test_kernels_match_reference(case: tuple[str, str, int, str], fast_results: dict[str, Any]) -> None:
    # the expert-group and routed paths run where asked, and only there
    assert fast_results[_case_id(case)]["gemv"] == case[3].startswith("gemv")
    assert fast_results[_case_id(case)]["routed"] == case[3].startswith("routed")
    assert fast_results[_case_id(case)]["tma"] == TMA_STAGES.get(_case_id(case), [])
    assert fast_results[_case_id(case)]["persist"] == PERSIST_STAGES.get(_case_id(case), [])
    assert fast_results[_case_id(case)]["in_router"] == case[3].startswith("in_router")
    gated = VARIANTS[case[0]].has_shared_gate and case[2] > 0
    assert fast_results[_case_id(case)]["gate_col"] == (gated and case[3].endswith("gatecol"))
    _check(fast_results[_case_id(case)], case[1], case[2])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
def test_kernels_match_reference_full_grid(
    case: tuple[str, str, int, str], slow_results: dict[str, Any]
) -> None:
    _check(slow_results[_case_id(case)], case[1], case[2])


def test_routing_variants_are_really_different() -> None:
    """Guard against a case list that silently tests one variant: the oracle routes them differently."""
    import torch

    from moetrt.op.reference import random_inputs, route, router_logits

    inputs = random_inputs(VARIANTS["softmax_renorm"], 16, seed=0)
    logits = router_logits(inputs["hidden_states"], inputs["router_weight"])
    renorm, _ = route(logits, VARIANTS["softmax_renorm"])
    plain, _ = route(logits, MoEAttributes(8, 2, 48, 32))
    assert not torch.allclose(renorm, plain)


def _child(cases: list[tuple[str, str, int, str]]) -> None:
    import torch

    from moetrt.kernels.torch_ops import moe_forward_triton
    from moetrt.op.reference import moe_reference, random_inputs

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    out: dict[str, dict[str, Any]] = {}
    for variant, dtype, t, bucket in cases:
        attrs = VARIANTS[variant]
        key = _case_id((variant, dtype, t, bucket))
        try:
            inputs = random_inputs(attrs, t, dtype=dtypes[dtype], seed=1000 + t)
            config = None
            # "+gatecol": the case's config with the router's shared gate in a column of its own
            gatecol = bucket.endswith("gatecol")
            bucket = "auto" if bucket == "gatecol" else bucket.removesuffix("+gatecol")
            if bucket in (
                "split",
                "fused",
                "gemv",
                "gemv+fused",
                "sorted",
                "scaled",
                "scaled+cvt",
                "perweight",
                "splitk",
                "routed",
                "routed+fused",
                "wide",
                "wide+splitk",
                "perweight+prefill",
                "grouped",
                "tma",
                "tma+grouped",
                "tma+persist",
                "tma+persist+grouped",
                "in_router",
                "in_router+split",
                "in_router+fused",
                "in_router+fused+split",
            ):
                from moetrt.kernels.configs import default_config
                from moetrt.kernels.plan import bucket_of

                config = default_config(attrs, dtype, bucket_of(t))
                # the narrowest reduction tile the cases use: 4-bit tiles hold at least 32 codes
                bk = 32 if attrs.weight_format in ("int4", "mxfp4") else 16
                if bucket == "split":
                    config["router"].update({"SPLIT": 3, "BK": 16})
                elif bucket.startswith("in_router"):
                    config["gemv"]["enabled"] = config["routed"]["enabled"] = 0
                    config["topk"]["in_router"] = 1
                    config["fused"]["enabled"] = int("fused" in bucket)
                    if "fused" in bucket:
                        config["fused"]["BH"] = 16
                        config["gate_up"].update({"BN": 16, "BK": 32})
                    if bucket.endswith("split"):
                        config["router"].update({"SPLIT": 3, "BK": 16})
                elif bucket.startswith("gemv"):
                    config["gemv"].update({"enabled": 1, "BN": 16, "BK": 16, "BH": 16, "BKD": 16})
                    # a table entry may keep the fused kernel's switch on: the group path wins
                    config["fused"]["enabled"] = int(bucket == "gemv+fused")
                elif bucket.startswith("routed"):
                    config["routed"].update(
                        {"enabled": 1, "fused": int(bucket == "routed+fused"), "BN": 16, "BK": bk, "BH": 16,
                         "BKD": bk}
                    )  # fmt: skip
                    config["gemv"]["enabled"] = config["fused"]["enabled"] = 1
                elif bucket.startswith("wide"):  # 64-row blocks on the sorted decode path (+ split gate_up)
                    config["gemv"]["enabled"] = 0
                    config["gate_up"].update({"BM": 64, "BN": 32, "BK": bk})
                    config["gate_up"]["SK"] = 2 if bucket == "wide+splitk" else 1
                elif bucket == "sorted":
                    config["gemv"]["enabled"] = 0
                elif bucket == "splitk":  # programs per gate_up tile over H, one tile of H each
                    config["gemv"]["enabled"] = 0
                    config["gate_up"].update({"SK": min(4, attrs.hidden_size // bk), "BK": bk})
                elif bucket.startswith("scaled"):  # quantized cases only: bk is one scale group's width
                    config["gate_up"]["BK"] = config["down"]["BK"] = bk
                    config["dequant"]["fp8_cvt"] = int(bucket == "scaled+cvt")
                elif bucket == "perweight":  # tiles across groups, and tiles inside one by the switch
                    config["gate_up"]["BK"] = 64 if t < 64 else 16
                    config["dequant"]["per_weight"] = 1
                elif bucket == "grouped":  # row blocks in groups per weight tile (triton_moe.grouped_tile)
                    config["gemv"]["enabled"] = config["fused"]["enabled"] = config["routed"]["enabled"] = 0
                    config["gate_up"].update({"BM": 16, "BN": 16, "GM": 3})
                    config["down"].update({"BH": 16, "GM": 2})  # grids of whole groups of 6 blocks
                elif bucket.startswith("tma"):  # tiles by TMA (plan.uses_tma), grouped blocks too
                    config["gemv"]["enabled"] = config["fused"]["enabled"] = config["routed"]["enabled"] = 0
                    config["gate_up"].update({"BM": 16, "BN": 16, "BK": 32, "TMA": 1})
                    config["down"].update({"BH": 16, "BK": 16, "TMA": 1})
                    if bucket.endswith("grouped"):
                        config["gate_up"]["GM"], config["down"]["GM"] = 3, 2
                    if "persist" in bucket:  # 3 programs, each looping over many tiles
                        config["gate_up"]["PERSIST"] = config["down"]["PERSIST"] = 3
                elif bucket == "perweight+prefill":  # prefill blocks: the weight tile first (weights_first)
                    config = default_config(attrs, dtype, None)
                    config["gate_up"].update({"BM": 64, "BN": 64, "BK": 64})
                    config["down"].update({"BH": 64, "BK": 32})
                    config["dequant"].update({"per_weight": 1, "fp8_cvt": 1})  # fp8: the SM's conversion
                else:
                    config["gemv"]["enabled"] = 0
                    config["fused"] = {"enabled": 1, "BH": 16}
                    config["gate_up"].update({"BN": 16, "BK": 32})
            if gatecol:
                from moetrt.kernels.configs import default_config
                from moetrt.kernels.plan import bucket_of

                prefill = bucket in ("prefill", "perweight+prefill")
                config = config or default_config(attrs, dtype, None if prefill else bucket_of(max(t, 1)))
                config["router"]["GATE_COL"] = 1
            prefill = bucket in ("prefill", "perweight+prefill")
            got = moe_forward_triton(inputs, attrs, config=config, bucket=None if prefill else "auto")
            ref = moe_reference(inputs, attrs, compute_dtype=torch.float64)
            from moetrt.kernels import plan
            from moetrt.kernels.configs import default_config as _default

            bound = None if prefill else plan.bucket_of(max(t, 1))
            ran_gemv = t > 0 and plan.is_gemv(config or _default(attrs, dtype, bound), bound)
            ran_routed = t > 0 and plan.is_routed(config or _default(attrs, dtype, bound), bound)
            ran_in_router = t > 0 and plan.routes_in_router(
                attrs, config or _default(attrs, dtype, bound), bound
            )
            ran_tma = [
                stage
                for stage in ("gate_up", "down_rows")
                if t > 0
                and plan.uses_tma(attrs, dtype, config or _default(attrs, dtype, bound), bound, stage)
            ]
            ran_persist = [
                stage
                for stage in ("gate_up", "down_rows")
                if t > 0
                and plan.persistent_programs(
                    attrs, dtype, config or _default(attrs, dtype, bound), bound, stage
                )
            ]
            ran_gate_col = bool(
                t > 0 and plan.shared_gate_column(attrs, config or _default(attrs, dtype, bound))
            )
            rel, nan = {}, {}
            for name in attrs.present_outputs():
                g, r = got[name].double(), ref[name].double()
                nan[name] = bool(torch.isnan(g).any())
                rel[name] = float((g - r).norm() / r.norm()) if t else 0.0
            out[key] = {
                "rel_err": rel,
                "nan": nan,
                "shapes": {n: list(v.shape) for n, v in got.items()},
                "gemv": ran_gemv,
                "routed": ran_routed,
                "in_router": ran_in_router,
                "tma": ran_tma,
                "persist": ran_persist,
                "gate_col": ran_gate_col,
            }
        except Exception as err:  # reported per case by the parent
            out[key] = {"error": repr(err)}
    print(json.dumps(out))


if __name__ == "__main__":
    _child([tuple(c) for c in json.loads(sys.argv[1])])  # type: ignore[misc]
