"""Small-T (decode) kernels of the fused MoE op: no sort, no block table, expert groups instead.

At T <= 16 tokens a step hits at most T*K experts, each by a handful of tokens. The `gemv` path
(plan.py) runs four launches:

    router logits (triton_moe)  ·  topk_group  ·  gemv_gate_up  ·  gemv_down (+ reduction over k)

topk_group routes RT tokens per program (scores, grouped top-k, bias, renorm, scaling) and files each slot
under its expert with atomics on the expert counters the router kernel zeroed: expert e's slots are
expert_slots[e, 0:counts[e]], and the first slot of an expert opens a group (group_expert[g] = e). No
prefix sums, no block table: the expert kernels' programs are (group, tile), each streaming its expert's
rows once for all of its tokens (tensor cores, the group's rows padded to TM >= 16).

The shared expert is one more group (index gmax) whose programs do not wait for the routing under
programmatic dependent launch: they read only the input, so they can run while the routing does.

Workspace (laid out by plan.py; the router kernel zeroes counts, ngroups and htickets):
    ngroups[1] i32, group_expert[gmax] i32, expert_slots[E, TM] i32
    act[T*K + T, NMAX], yw[T*K + T, H]   as in the other paths (row = slot; shared rows after)
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moetrt.kernels.triton_common import (
    dot_acc,
    glu,
    pdl_prologue,
    reduce_h_tile_when_last,
    route_rows,
    slot_ranks,
)


@triton.jit
def topk_group_kernel(
    logits_ws_ptr,
    router_b_ptr,
    logits_out_ptr,
    gate_part_ptr,
    gate_ws_ptr,
    corr_bias_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    counts_ptr,
    ngroups_ptr,
    group_expert_ptr,
    expert_slots_ptr,
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
    HAS_ROUTER_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    OUT_LOGITS: tl.constexpr,
    SPLIT: tl.constexpr,
    RT: tl.constexpr,
    TM: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """Routing of RT tokens per program, then each slot files itself under its expert.

    Grid (cdiv(T, RT),). A slot's rank among its expert's slots comes from an atomic on the expert's
    counter; rank 0 opens a group (atomic on the group counter) and names the expert in it. Slot lists
    are kept per expert (expert_slots[e, rank]), so no program waits for another one's group number.
    """
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    ids, slots, slot_mask = route_rows(
        T,
        tl.program_id(0) * RT,
        logits_ws_ptr,
        router_b_ptr,
        logits_out_ptr,
        gate_part_ptr,
        gate_ws_ptr,
        corr_bias_ptr,
        topk_ids_ptr,
        topk_w_ptr,
        E,
        K,
        SCORING_SIGMOID,
        TOPK_BEFORE,
        NORM_TOPK,
        N_GROUP,
        TOPK_GROUP,
        SCALE,
        HAS_CORR_BIAS,
        HAS_ROUTER_BIAS,
        HAS_SHARED,
        HAS_SHARED_GATE,
        OUT_LOGITS,
        SPLIT,
        RT,
        E_PAD,
        K_PAD,
        G_PAD,
    )
    rank = slot_ranks(counts_ptr, ids, slot_mask)
    tl.store(expert_slots_ptr + ids * TM + rank, slots, mask=slot_mask)
    opens = slot_mask & (rank == 0)
    group = tl.atomic_add(ngroups_ptr + 0 * ids, 1, mask=opens, sem="relaxed", scope="gpu")
    tl.store(group_expert_ptr + group, ids, mask=opens)


@triton.jit
def _is_shared(g, gmax, HAS_SHARED: tl.constexpr):
    if HAS_SHARED:
        shared = g == gmax
    else:
        shared = g < 0
    return shared


@triton.jit
def _group_rows(
    g,
    gmax,
    T,
    counts_ptr,
    ngroups_ptr,
    group_expert_ptr,
    expert_slots_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    TM: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    """(live, expert, row mask, slot per row, token per row) of group g; the shared expert is group gmax
    with expert id E, every token, and rows T*K + t."""
    r = tl.arange(0, TM)
    is_shared = _is_shared(g, gmax, HAS_SHARED)
    # routed values first (clamped: past the group count, or for the shared group, they are garbage)
    gr = tl.minimum(g, gmax - 1)
    e = tl.minimum(tl.maximum(tl.load(group_expert_ptr + gr), 0), E - 1)
    count = tl.minimum(tl.load(counts_ptr + e), TM)
    slot = tl.load(expert_slots_ptr + e * TM + r, mask=r < count, other=0)
    slot = tl.minimum(tl.maximum(slot, 0), T * K - 1)
    live = tl.where(is_shared, T > 0, g < tl.load(ngroups_ptr))
    e = tl.where(is_shared, E, e)
    row_ok = tl.where(is_shared, r < T, r < count)
    token = tl.where(is_shared, r, slot // K)
    slot = tl.where(is_shared, T * K + r, slot)
    return live, e, row_ok, slot, token


@triton.jit
def gemv_gate_up_kernel(
    x_ptr,
    w_gu_ptr,
    b_gu_ptr,
    shared_w_gu_ptr,
    act_ptr,
    counts_ptr,
    ngroups_ptr,
    group_expert_ptr,
    expert_slots_ptr,
    T,
    gmax,
    E: tl.constexpr,
    K: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741
    IS: tl.constexpr,
    NMAX: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    IEEE: tl.constexpr,
    TM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PDL: tl.constexpr,
):
    """act[slot, n] = glu(x[token] @ W_gate[e, n], x[token] @ W_up[e, n]) for one (group, N tile).

    1-D grid of (gmax + shared) x cdiv(NMAX, BN) programs, N tile fastest. The shared expert's programs
    skip the wait for the routing (programmatic dependent launch): they need only the input.
    """
    NT: tl.constexpr = (NMAX + BN - 1) // BN
    g = tl.program_id(0) // NT
    pid_n = tl.program_id(0) % NT
    is_shared = _is_shared(g, gmax, HAS_SHARED)
    if PDL:
        if not is_shared:
            gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()
    live, e, row_ok, slot, token = _group_rows(
        g, gmax, T, counts_ptr, ngroups_ptr, group_expert_ptr, expert_slots_ptr, E, K, TM, HAS_SHARED
    )
    n_cols = tl.where(is_shared, IS, I)
    if not live or pid_n * BN >= n_cols:
        return
    if is_shared:
        w_base = shared_w_gu_ptr
    else:
        w_base = w_gu_ptr + e.to(tl.int64) * (2 * I * H)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < n_cols
    acc_g = tl.zeros((TM, BN), dtype=tl.float32)
    acc_u = tl.zeros((TM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < H
        wmask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + n[:, None] * H + ks[None, :], mask=wmask, other=0.0)
        wu = tl.load(w_base + (n + n_cols)[:, None] * H + ks[None, :], mask=wmask, other=0.0)
        xt = tl.load(
            x_ptr + token[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc_g = dot_acc(xt, tl.trans(wg), acc_g, IEEE)
        acc_u = dot_acc(xt, tl.trans(wu), acc_u, IEEE)
    if HAS_BIAS:  # noqa: SIM102 (a constexpr and a runtime condition: Triton needs them apart)
        if not is_shared:
            bias_base = b_gu_ptr + e * (2 * I)
            acc_g += tl.load(bias_base + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bias_base + I + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if is_shared:
        act = glu(acc_g, acc_u, 0, ALPHA, LIMIT)  # the shared expert is always SiLU-GLU (spec)
    else:
        act = glu(acc_g, acc_u, ACTIVATION, ALPHA, LIMIT)
    tl.store(
        act_ptr + slot[:, None] * NMAX + n[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def gemv_down_kernel(
    w_down_ptr,
    b_down_ptr,
    shared_w_down_ptr,
    act_ptr,
    topk_w_ptr,
    gate_ws_ptr,
    yw_ptr,
    out_ptr,
    htickets_ptr,
    counts_ptr,
    ngroups_ptr,
    group_expert_ptr,
    expert_slots_ptr,
    T,
    gmax,
    E: tl.constexpr,
    K: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741
    IS: tl.constexpr,
    NMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    IEEE: tl.constexpr,
    TM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    PDL: tl.constexpr,
):
    """yw[slot, h tile] = weight * (act[slot] @ W_down[e].T) for one (group, H tile); the last program of
    an H tile (ticket) sums each token's K slots and shared row into the output, in slot order."""
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    NTH: tl.constexpr = (H + BH - 1) // BH
    g = tl.program_id(0) // NTH
    pid_h = tl.program_id(0) % NTH
    h = pid_h * BH + tl.arange(0, BH)
    h_ok = h < H
    live, e, row_ok, slot, token = _group_rows(
        g, gmax, T, counts_ptr, ngroups_ptr, group_expert_ptr, expert_slots_ptr, E, K, TM, HAS_SHARED
    )
    is_shared = _is_shared(g, gmax, HAS_SHARED)
    if live:
        n_cols = tl.where(is_shared, IS, I)
        if is_shared:
            w_base = shared_w_down_ptr
            weight = tl.load(gate_ws_ptr + token, mask=row_ok, other=0.0)
        else:
            w_base = w_down_ptr + e.to(tl.int64) * (H * I)
            weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
        y = tl.zeros((TM, BH), dtype=tl.float32)
        for k0 in range(0, NMAX, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < n_cols
            a = tl.load(
                act_ptr + slot[:, None] * NMAX + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(
                w_base + h[:, None] * n_cols + ks[None, :], mask=h_ok[:, None] & k_ok[None, :], other=0.0
            )
            y = dot_acc(a, tl.trans(w), y, IEEE)
        if HAS_BIAS:  # noqa: SIM102
            if not is_shared:
                y += tl.load(b_down_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        y = y * weight[:, None]
        tl.store(
            yw_ptr + slot[:, None] * H + h[None, :],
            y.to(yw_ptr.dtype.element_ty),
            mask=row_ok[:, None] & h_ok[None, :],
        )
    reduce_h_tile_when_last(yw_ptr, out_ptr, htickets_ptr, pid_h, h, h_ok, T, K, H, HAS_SHARED, BT, BH, NTH)


KERNELS = {
    "topk_group": topk_group_kernel,
    "gemv_gate_up": gemv_gate_up_kernel,
    "gemv_down": gemv_down_kernel,
}
