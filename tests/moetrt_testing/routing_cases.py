"""Routing cases for the kernels' `select_experts`, shared by its CPU test (tests/test_select_experts.py, Triton's
interpreter) and its GPU test (tests/gpu/test_gpu_select_experts.py): the cases, their random inputs, the
reference's answer and a small kernel that routes them."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from moetrt.kernels.triton_common import select_experts

# (name, experts, top-k, scoring, top-k before score, renorm, groups, groups kept, scale, correction bias,
#  tokens, tokens per program, exact ties)
CASES = [
    ("qwen3_next", 512, 10, "softmax", False, True, 1, 1, 1.0, False, 1, 1, False),
    ("qwen3_next_rt4", 512, 10, "softmax", False, True, 1, 1, 1.0, False, 7, 4, False),
    ("qwen2_no_renorm", 60, 4, "softmax", False, False, 1, 1, 1.0, False, 5, 2, False),
    ("mixtral", 8, 2, "softmax", False, True, 1, 1, 1.0, False, 9, 4, False),
    ("gpt_oss", 32, 4, "softmax", True, False, 1, 1, 1.0, False, 3, 2, False),
    ("deepseek_v3", 256, 8, "sigmoid", False, True, 8, 4, 2.5, True, 3, 2, False),
    ("sigmoid_odd_k", 64, 5, "sigmoid", False, True, 1, 1, 1.0, False, 4, 4, False),
    ("softmax_k3_scaled", 16, 3, "softmax", False, False, 1, 1, 2.0, False, 6, 2, False),
    ("single_pick", 4, 1, "softmax", False, False, 1, 1, 1.0, False, 3, 1, False),
    ("grouped_odd_k", 32, 3, "softmax", False, True, 4, 2, 1.0, False, 5, 4, False),
    ("exact_ties", 64, 6, "softmax", False, True, 1, 1, 1.0, False, 4, 2, True),
    ("exact_ties_sigmoid", 48, 7, "sigmoid", False, False, 1, 1, 1.0, False, 4, 4, True),
]


def attrs_of(case: tuple[Any, ...]) -> Any:
    from moetrt.op.spec import MoEAttributes

    _name, e, k, scoring, before, norm, n_group, topk_group, scale, _bias, _t, _rt, _ties = case
    return MoEAttributes(
        num_experts=e,
        top_k=k,
        hidden_size=16,
        intermediate_size=16,
        scoring=scoring,
        topk_before_score=before,
        norm_topk_prob=norm,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        has_score_correction_bias=case[9],
    )


def inputs_of(case: tuple[Any, ...]) -> tuple[Any, Any]:
    """Logits [T, E] and the correction bias (or None), random and never zero."""
    import torch

    _name, e, _k, _scoring, _before, _norm, _ng, _tg, _scale, bias, t, _rt, ties = case
    gen = torch.Generator().manual_seed(e * 31 + t)
    if ties:  # few distinct values: many experts share a logit exactly
        logits = torch.randint(-3, 4, (t, e), generator=gen).to(torch.float32) * 0.5 + 0.25
    else:
        logits = torch.randn(t, e, generator=gen) * 2.0 + 0.1
    corr = torch.rand(e, generator=gen) * 0.1 + 0.01 if bias else None
    return logits, corr


@triton.jit
def route_kernel(
    lg_ptr,
    corr_ptr,
    ids_ptr,
    w_ptr,
    T,
    E: tl.constexpr,
    K: tl.constexpr,
    SCORING_SIGMOID: tl.constexpr,
    TOPK_BEFORE: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCALE: tl.constexpr,
    HAS_CORR_BIAS: tl.constexpr,
    RT: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * RT + tl.arange(0, RT)
    cols = tl.arange(0, E_PAD)
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    lg = tl.load(lg_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    ids, wts = select_experts(
        lg, corr_ptr, E, K, SCORING_SIGMOID, TOPK_BEFORE, NORM_TOPK, N_GROUP, TOPK_GROUP, SCALE,
        HAS_CORR_BIAS, RT, E_PAD, K_PAD, G_PAD,
    )  # fmt: skip
    kcols = tl.arange(0, K_PAD)
    out = rows[:, None] * K + kcols[None, :]
    omask = (rows < T)[:, None] & (kcols < K)[None, :]
    tl.store(ids_ptr + out, ids, mask=omask)
    tl.store(w_ptr + out, wts, mask=omask)


def run_case(case: tuple[Any, ...], device: str = "cpu") -> dict[str, Any]:
    """The kernel's expert ids and weights for a case (`device` "cuda" on a GPU; the interpreter runs "cpu")."""
    import torch

    _name, e, k, scoring, before, norm, n_group, topk_group, scale, bias, t, rt, _ties = case
    logits, corr = (None if x is None else x.to(device) for x in inputs_of(case))
    ids = torch.full((t, k), -1, dtype=torch.int32, device=device)
    wts = torch.zeros((t, k), dtype=torch.float32, device=device)
    corr_arg = corr if corr is not None else torch.zeros(1, device=device)
    route_kernel[(triton.cdiv(t, rt),)](
        logits, corr_arg, ids, wts, t,
        e, k, scoring == "sigmoid", before, norm, n_group, topk_group, scale, bias, rt,
        triton.next_power_of_2(e), triton.next_power_of_2(k), triton.next_power_of_2(n_group),
    )  # fmt: skip
    return {"ids": ids.tolist(), "weights": wts.tolist()}


def check_case(case: tuple[Any, ...], out: dict[str, Any]) -> None:
    """The kernel's ids equal the reference's in its order; its weights match to float32 rounding."""
    import torch

    from moetrt.op import reference

    logits, corr = inputs_of(case)
    attrs = attrs_of(case)
    choice = reference.choice_scores(logits, attrs, corr)
    k = attrs.top_k
    if case[
        -1
    ]:  # exact ties: the kernel's order is the stable one (lower id first), which torch.topk's is not
        stable = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]
        want_w, want_ids = reference.route(logits, attrs, corr, ids=stable)
    else:  # no two choice values within float32 rounding of each other among the contenders
        want_w, want_ids = reference.route(logits, attrs, corr)
        top = choice.topk(k + 1, dim=-1).values
        assert (top[:, :-1] - top[:, 1:]).min() > 1e-6, "inputs must not hold near-ties"
    assert out["ids"] == want_ids.tolist()
    got_w = torch.tensor(out["weights"])
    assert torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-7), (got_w - want_w).abs().max()


def check_ties(results: dict[str, Any]) -> None:
    """The tie cases really hold ties among the picks, and the kernel took them lowest id first."""
    for case in CASES:
        if not case[-1]:
            continue
        logits, _corr = inputs_of(case)
        tied_pairs = 0
        for row, picks in zip(logits.tolist(), results[case[0]]["ids"], strict=True):
            for a in range(len(picks) - 1):
                if row[picks[a]] == row[picks[a + 1]]:
                    tied_pairs += 1
                    assert picks[a] < picks[a + 1]
        assert tied_pairs > 0, case[0]
