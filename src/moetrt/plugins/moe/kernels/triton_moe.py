"""Triton kernels of the fused MoE op (see docs/kernels.md for the stages and their launch rules).

Every dimension except the token count T is a compile-time constant: a bundle is compiled for one
`MoEAttributes`, so the compiler sees exact shapes and drops most bounds checks. The shared expert is
expert number E in every stage (its rows come after the routed ones), so it costs no launch of its own.

Workspace regions the kernels share (laid out by kernels/plan.py):
    counts[E+2] i32, tickets[n_tb] i32   zeroed before each call (one memset)
    logits[T, E] f32, gate[T] f32        router logits, sigmoid of the shared-expert gate
    topk_ids / topk_w / rank [T*K]       slot s = t*K + j; rank = position among the expert's rows
    offsets[E+2] i32, num_blocks[1] i32  first sorted row of each expert (+ shared), total blocks
    block_expert / block_row0 [MB] i32   one entry per BM-row block of one expert
    sorted_slot[R] i32                   slot of each sorted row; R = T*K (+ T with a shared expert)
    act[R, NMAX]                         gate/up activation per sorted row (input dtype)
    yw[R, H]                             routing-weighted down projection per slot
    htickets[cdiv(H, BH)] i32            decode: per-H-tile ticket of the fused reduction (zeroed)
"""

from __future__ import annotations

import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _align(
    pid,
    nprog,
    T,
    block_iters,
    slot_iters,
    counts_ptr,
    topk_ids_ptr,
    rank_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    EP_PAD: tl.constexpr,
    CB: tl.constexpr,
    CS: tl.constexpr,
):
    """Counting sort of the T*K slots by expert, from per-expert counts and per-slot ranks.

    Every program recomputes the (cheap) prefix sums over experts so programs need no other sync.
    """
    NEXP: tl.constexpr = E + HAS_SHARED
    col = tl.arange(0, EP_PAD)
    # volatile: counts were produced by atomics of other programs (or this one) and must not come from L1
    cnt = tl.load(counts_ptr + col, mask=col < E, other=0, volatile=True)
    if HAS_SHARED:
        cnt = tl.where(col == E, T, cnt)
    starts = tl.cumsum(cnt, 0) - cnt
    nblk = (cnt + BM - 1) // BM
    blk_end = tl.cumsum(nblk, 0)
    blk_start = blk_end - nblk
    total_blocks = tl.sum(nblk, 0)
    if pid == 0:
        tl.store(offsets_ptr + col, starts, mask=col <= NEXP)
        tl.store(nblocks_ptr, total_blocks)

    real_col = col[None, :] < NEXP
    # loop trip counts come from the host (upper bounds): loops with device-side bounds do not interpret
    for it in range(0, block_iters):
        b = (it * nprog + pid) * CB + tl.arange(0, CB)
        # expert of block b = number of experts whose blocks all end at or before b
        expert = tl.sum(((blk_end[None, :] <= b[:, None]) & real_col).to(tl.int32), axis=1)
        sel = col[None, :] == expert[:, None]
        first_row = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
        first_blk = tl.sum(tl.where(sel, blk_start[None, :], 0), axis=1)
        bmask = b < total_blocks
        tl.store(block_expert_ptr + b, expert, mask=bmask)
        tl.store(block_row0_ptr + b, first_row + (b - first_blk) * BM, mask=bmask)

    num_slots = T * K
    for it in range(0, slot_iters):
        s = (it * nprog + pid) * CS + tl.arange(0, CS)
        smask = s < num_slots
        e = tl.load(topk_ids_ptr + s, mask=smask, other=0)
        r = tl.load(rank_ptr + s, mask=smask, other=0)
        first_row = tl.sum(tl.where(col[None, :] == e[:, None], starts[None, :], 0), axis=1)
        tl.store(sorted_slot_ptr + first_row + r, s, mask=smask)
        if HAS_SHARED:  # the shared expert's rows come last, one per token in token order
            tl.store(sorted_slot_ptr + num_slots + s, num_slots + s, mask=s < T)


@triton.jit
def router_kernel(
    x_ptr,
    router_w_ptr,
    router_b_ptr,
    corr_bias_ptr,
    shared_gate_w_ptr,
    logits_ws_ptr,
    logits_out_ptr,
    gate_ws_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    rank_ptr,
    counts_ptr,
    tickets_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    T,
    block_iters,
    slot_iters,
    E: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    SCORING_SIGMOID: tl.constexpr,
    TOPK_BEFORE: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCALE: tl.constexpr,
    HAS_ROUTER_BIAS: tl.constexpr,
    HAS_CORR_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    OUT_LOGITS: tl.constexpr,
    FUSE_ALIGN: tl.constexpr,
    IEEE: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
    BM: tl.constexpr,
    EP_PAD: tl.constexpr,
    CB: tl.constexpr,
    CS: tl.constexpr,
):
    """Router logits for a (token block, expert block); the last program of a token block routes it.

    Grid (cdiv(T, BT), cdiv(E, BE)). Splitting experts over programs spreads the router weight read over
    the GPU at small T; a ticket counter elects the last program, which then sees every logit of its tokens.
    With FUSE_ALIGN (one token block) that program also sorts the slots by expert: decode pays no
    separate align launch.
    """
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    num_e_blocks = tl.num_programs(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_ok = rows < T
    ecols = pid_e * BE + tl.arange(0, BE)
    ecol_ok = ecols < E
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    gate_acc = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < H
        xt = tl.load(x_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(router_w_ptr + ecols[:, None] * H + ks[None, :], mask=ecol_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if IEEE:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
        if HAS_SHARED_GATE:
            gw = tl.load(shared_gate_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            gate_acc += tl.sum(xt.to(tl.float32) * gw[None, :], axis=1)
    if HAS_ROUTER_BIAS:
        acc += tl.load(router_b_ptr + ecols, mask=ecol_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & ecol_ok[None, :]
    tl.store(logits_ws_ptr + rows[:, None] * E + ecols[None, :], acc, mask=out_mask)
    if OUT_LOGITS:
        tl.store(logits_out_ptr + rows[:, None] * E + ecols[None, :], acc.to(logits_out_ptr.dtype.element_ty),
                 mask=out_mask)
    if HAS_SHARED:
        if HAS_SHARED_GATE:
            gate = tl.sigmoid(gate_acc)
        else:
            gate = tl.full((BT,), 1.0, tl.float32)
        tl.store(gate_ws_ptr + rows, gate, mask=row_ok & (pid_e == 0))

    # All of this CTA's stores happen before the release of the ticket (threadfence-reduction pattern).
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
    if ticket == num_e_blocks - 1:
        tl.debug_barrier()
        cols = tl.arange(0, E_PAD)
        col_ok = cols[None, :] < E
        lg = tl.load(logits_ws_ptr + rows[:, None] * E + cols[None, :], mask=row_ok[:, None] & col_ok,
                     other=0.0, volatile=True)
        lg = tl.where(col_ok, lg, _NEG_INF)
        if TOPK_BEFORE:
            scores = lg
        elif SCORING_SIGMOID:
            scores = tl.sigmoid(lg)
        else:
            p = tl.exp(lg - tl.max(lg, axis=1)[:, None])
            scores = p / tl.sum(p, axis=1)[:, None]
        choice = scores
        if HAS_CORR_BIAS:
            choice = choice + tl.load(corr_bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
        choice = tl.where(col_ok, choice, _NEG_INF)

        if N_GROUP > 1:
            # group score = sum of the group's two best experts; keep the TOPK_GROUP best groups
            EPG: tl.constexpr = E // N_GROUP
            group_of = cols // EPG
            gcols = tl.arange(0, G_PAD)
            group_score = tl.full((BT, G_PAD), _NEG_INF, tl.float32)
            for g in tl.static_range(N_GROUP):
                v = tl.where((group_of == g)[None, :] & col_ok, choice, _NEG_INF)
                m1 = tl.max(v, axis=1)
                s = m1
                if EPG > 1:
                    i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], E_PAD), axis=1)
                    s = m1 + tl.max(tl.where(cols[None, :] == i1[:, None], _NEG_INF, v), axis=1)
                group_score = tl.where(gcols[None, :] == g, s[:, None], group_score)
            keep_group = tl.zeros((BT, G_PAD), dtype=tl.int32)
            for _ in tl.static_range(TOPK_GROUP):
                gm = tl.max(group_score, axis=1)
                gi = tl.min(tl.where(group_score == gm[:, None], gcols[None, :], G_PAD), axis=1)
                hit_g = gcols[None, :] == gi[:, None]
                keep_group = tl.where(hit_g, 1, keep_group)
                group_score = tl.where(hit_g, _NEG_INF, group_score)
            keep = tl.zeros((BT, E_PAD), dtype=tl.int32)
            for g in tl.static_range(N_GROUP):
                kept = tl.max(tl.where(gcols[None, :] == g, keep_group, 0), axis=1)
                keep = tl.where((group_of == g)[None, :] & (kept[:, None] > 0), 1, keep)
            choice = tl.where(keep > 0, choice, _NEG_INF)

        kcols = tl.arange(0, K_PAD)
        ids = tl.zeros((BT, K_PAD), dtype=tl.int32)
        wts = tl.zeros((BT, K_PAD), dtype=tl.float32)
        for j in tl.static_range(K):
            m = tl.max(choice, axis=1)
            idx = tl.min(tl.where(choice == m[:, None], cols[None, :], E_PAD), axis=1)
            hit = cols[None, :] == idx[:, None]
            w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
            ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
            wts = tl.where(kcols[None, :] == j, w[:, None], wts)
            choice = tl.where(hit, _NEG_INF, choice)
        k_ok = kcols[None, :] < K
        if TOPK_BEFORE:
            p = tl.where(k_ok, tl.exp(wts - tl.max(tl.where(k_ok, wts, _NEG_INF), axis=1)[:, None]), 0.0)
            wts = p / tl.sum(p, axis=1)[:, None]
        else:
            if NORM_TOPK:
                wts = wts / (tl.sum(tl.where(k_ok, wts, 0.0), axis=1)[:, None] + 1e-20)
            wts = wts * SCALE
        slot_mask = row_ok[:, None] & k_ok
        slots = rows[:, None] * K + kcols[None, :]
        ids = tl.minimum(tl.maximum(ids, 0), E - 1)  # NaN logits must not index out of bounds
        tl.store(topk_ids_ptr + slots, ids, mask=slot_mask)
        tl.store(topk_w_ptr + slots, wts, mask=slot_mask)
        rank = tl.atomic_add(counts_ptr + ids, 1, mask=slot_mask, sem="relaxed", scope="gpu")
        tl.store(rank_ptr + slots, rank, mask=slot_mask)
        if FUSE_ALIGN:
            tl.debug_barrier()
            _align(0, 1, T, block_iters, slot_iters, counts_ptr, topk_ids_ptr, rank_ptr, offsets_ptr, nblocks_ptr, block_expert_ptr,
                   block_row0_ptr, sorted_slot_ptr, E, K, BM, HAS_SHARED, EP_PAD, CB, CS)


@triton.jit
def align_kernel(
    counts_ptr,
    topk_ids_ptr,
    rank_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    T,
    block_iters,
    slot_iters,
    nprog,
    E: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    EP_PAD: tl.constexpr,
    CB: tl.constexpr,
    CS: tl.constexpr,
):
    """Prefill: counting sort of slots by expert and the block table, spread over the grid's programs."""
    _align(tl.program_id(0), nprog, T, block_iters, slot_iters, counts_ptr, topk_ids_ptr, rank_ptr, offsets_ptr,
           nblocks_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM, HAS_SHARED, EP_PAD, CB, CS)


@triton.jit
def _glu(g, u, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    # ACTIVATION: 0 silu_glu, 1 gelu_glu, 2 gelu_tanh_glu, 3 swiglu_clamped (same order as spec.ACTIVATIONS)
    if ACTIVATION == 0:
        out = g * tl.sigmoid(g) * u
    elif ACTIVATION == 1:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    elif ACTIVATION == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = g * tl.sigmoid(2.0 * z) * u  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = (uc + 1.0) * (gc * tl.sigmoid(gc * ALPHA))
    return out


@triton.jit
def _block_rows(b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr,
                E: tl.constexpr, K: tl.constexpr, BM: tl.constexpr):
    e = tl.load(block_expert_ptr + b)
    row0 = tl.load(block_row0_ptr + b)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    slot = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)
    num_slots = T * K
    token = tl.where(slot < num_slots, slot // K, slot - num_slots)
    return e, rows, row_ok, slot, token


@triton.jit
def gate_up_kernel(
    x_ptr,
    w_gu_ptr,
    b_gu_ptr,
    shared_w_gu_ptr,
    act_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    T,
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
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """act[row, n] = glu(x[token] @ W_gate[e, n], x[token] @ W_up[e, n]) for one (row block, N tile).

    Grid (max blocks, cdiv(NMAX, BN)); programs past the actual block count exit at once. One program
    streams its expert's BN gate rows and BN up rows exactly once for up to BM tokens.
    """
    b = tl.program_id(0)
    if b >= tl.load(nblocks_ptr):
        return
    e, rows, row_ok, slot, token = _block_rows(b, T, offsets_ptr, block_expert_ptr, block_row0_ptr,
                                                sorted_slot_ptr, E, K, BM)
    is_shared = e == E
    n_cols = tl.where(is_shared, IS, I)
    if is_shared:
        w_base = shared_w_gu_ptr
    else:
        w_base = w_gu_ptr + e.to(tl.int64) * (2 * I * H)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    if tl.program_id(1) * BN >= n_cols:
        return
    n_ok = n < n_cols
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < H
        xt = tl.load(x_ptr + token[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + n[:, None] * H + ks[None, :], mask=wmask, other=0.0)
        wu = tl.load(w_base + (n + n_cols)[:, None] * H + ks[None, :], mask=wmask, other=0.0)
        if IEEE:
            acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision="ieee")
            acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(xt, tl.trans(wg), acc_g)
            acc_u = tl.dot(xt, tl.trans(wu), acc_u)
    if HAS_BIAS:
        if not is_shared:
            bias_base = b_gu_ptr + e * (2 * I)
            acc_g += tl.load(bias_base + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bias_base + I + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if is_shared:
        act = _glu(acc_g, acc_u, 0, ALPHA, LIMIT)  # the shared expert is always SiLU-GLU (spec)
    else:
        act = _glu(acc_g, acc_u, ACTIVATION, ALPHA, LIMIT)
    tl.store(act_ptr + rows[:, None] * NMAX + n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_tile(act_ptr, w_base, rows, row_ok, h, h_ok, n_cols: tl.constexpr, NMAX: tl.constexpr, H_STRIDE: tl.constexpr,
               IEEE: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    y = tl.zeros((BM, BH), dtype=tl.float32)
    for k0 in range(0, n_cols, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < n_cols
        a = tl.load(act_ptr + rows[:, None] * NMAX + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + h[None, :] * H_STRIDE + ks[:, None], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        if IEEE:
            y = tl.dot(a, w, y, input_precision="ieee")
        else:
            y = tl.dot(a, w, y)
    return y


@triton.jit
def down_rows_kernel(
    w_down_ptr,
    b_down_ptr,
    shared_w_down_ptr,
    act_ptr,
    topk_w_ptr,
    gate_ws_ptr,
    yw_ptr,
    out_ptr,
    htickets_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    T,
    E: tl.constexpr,
    K: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741
    IS: tl.constexpr,
    NMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    FUSE_REDUCE: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
):
    """yw[slot, h tile] = weight * (act[row] @ W_down[e].T) for one (row block, H tile).

    Grid (max blocks, cdiv(H, BH)). With FUSE_REDUCE (decode), the last program to finish an H tile (ticket
    counter) also sums each token's K slots and its shared-expert row into the output: the reduction over k
    costs no launch, and stays deterministic (fixed slot order, no float atomics).
    """
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    h = pid_h * BH + tl.arange(0, BH)
    h_ok = h < H
    if b < tl.load(nblocks_ptr):
        e, rows, row_ok, slot, token = _block_rows(b, T, offsets_ptr, block_expert_ptr, block_row0_ptr,
                                                    sorted_slot_ptr, E, K, BM)
        if e == E:
            y = _down_tile(act_ptr, shared_w_down_ptr, rows, row_ok, h, h_ok, IS, NMAX, IS, IEEE, BM, BH, BK)
            weight = tl.load(gate_ws_ptr + token, mask=row_ok, other=0.0)
        else:
            y = _down_tile(act_ptr, w_down_ptr + e.to(tl.int64) * (H * I), rows, row_ok, h, h_ok, I, NMAX, I,
                           IEEE, BM, BH, BK)
            if HAS_BIAS:
                y += tl.load(b_down_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
        y = y * weight[:, None]
        tl.store(yw_ptr + slot[:, None] * H + h[None, :], y.to(yw_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & h_ok[None, :])
    if FUSE_REDUCE:
        tl.debug_barrier()
        ticket = tl.atomic_add(htickets_ptr + pid_h, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            tl.debug_barrier()
            for t0 in range(0, T, BT):
                t = t0 + tl.arange(0, BT)
                mask = (t < T)[:, None] & h_ok[None, :]
                acc = tl.zeros((BT, BH), dtype=tl.float32)
                for j in tl.static_range(K):
                    acc += tl.load(yw_ptr + (t * K + j)[:, None] * H + h[None, :], mask=mask, other=0.0,
                                   volatile=True).to(tl.float32)
                if HAS_SHARED:
                    acc += tl.load(yw_ptr + (T * K + t)[:, None] * H + h[None, :], mask=mask, other=0.0,
                                   volatile=True).to(tl.float32)
                tl.store(out_ptr + t[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def reduce_kernel(
    yw_ptr,
    out_ptr,
    T,
    K: tl.constexpr,
    H: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    """Prefill: out[t] = sum_j yw[t*K + j] (+ yw[T*K + t], the gated shared expert), in fp32."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    mask = (t < T)[:, None] & (h < H)[None, :]
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(yw_ptr + (t * K + j)[:, None] * H + h[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(yw_ptr + (T * K + t)[:, None] * H + h[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = {
    "router": router_kernel,
    "align": align_kernel,
    "gate_up": gate_up_kernel,
    "down_rows": down_rows_kernel,
    "reduce": reduce_kernel,
}
