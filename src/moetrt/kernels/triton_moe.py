"""Triton kernels of the fused MoE op (see docs/kernels.md for the stages and their launch rules).

Every dimension except the token count T is a compile-time constant: a bundle is compiled for one
`MoEAttributes`, so the compiler sees exact shapes and drops most bounds checks. The shared expert is
expert number E in every stage (its rows come after the routed ones), so it costs no launch of its own.

Workspace regions the kernels share (laid out by kernels/plan.py):
    counts[E+2], tickets, htickets i32   zeroed by the router-logits kernel at the start of each call
    acc[T, H] f32                        fused decode path: output accumulator (zeroed with the counters)
    logits[SPLIT, T, E] f32              router logits, one slice per split of H (summed by top-k)
    gate_part[SPLIT, T], gate[T] f32     shared-expert gate: partial dot products, then its sigmoid
    topk_ids / topk_w / rank [T*K]       slot s = t*K + j; rank = position among the expert's rows
    offsets[E+2] i32, num_blocks[1] i32  first sorted row of each expert (+ shared), total blocks
    block_expert / block_row0 [MB] i32   one entry per BM-row block of one expert
    sorted_slot[R] i32                   slot of each sorted row; R = T*K (+ T with a shared expert)
    act[R, NMAX]                         gate/up activation per sorted row (input dtype)
    xq[T, H] / xs[T, H/WB]               fp8 activations: x as e4m3 codes, one f32 scale per row and block
    actq[R, I] / acts[R, I/WB]           fp8 activations: the routed rows' activation, likewise
    yw[R, H]                             routing-weighted down projection per slot
    units[3 + T] i32                     routed path: unit counter, routing flag, fused ticket, gate_up
                                         tiles done per token (zeroed with the counters)
"""

from __future__ import annotations

import triton
import triton.language as tl

from moetrt.kernels import plan
from moetrt.kernels.triton_common import (
    FP8_E4M3_MAX,
    dot,
    dot_acc,
    expert_tables,
    fp8_codes,
    fp8_values,
    nibble_values,
    pdl_prologue,
    reduce_h_tile_when_last,
    route_rows,
    row_scales,
    slot_ranks,
    weight_tile,
)
from moetrt.kernels.triton_common import glu as _glu
from moetrt.kernels.triton_decode import KERNELS as DECODE_KERNELS


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
    CS: tl.constexpr,
):
    """Counting sort of the T*K slots by expert, from per-expert counts and per-slot ranks.

    Every program recomputes the (cheap) prefix sums over experts and stores the same offsets, so programs
    need no other sync. Block table: each expert writes its own blocks (an expert holds at most
    cdiv(T, BM) blocks: a token picks an expert once), so the work is E x cdiv(T, BM), not blocks x E.
    """
    NEXP: tl.constexpr = E + HAS_SHARED
    col = tl.arange(0, EP_PAD)
    # volatile: counts were produced by atomics of other programs (or this one) and must not come from L1
    cnt = tl.load(counts_ptr + col, mask=col < E, other=0, volatile=True)
    if HAS_SHARED:
        cnt = tl.where(col == E, T, cnt)
    starts = tl.cumsum(cnt, 0) - cnt
    nblk = (cnt + BM - 1) // BM
    blk_start = tl.cumsum(nblk, 0) - nblk
    total_blocks = tl.sum(nblk, 0)
    # identical values from every program: a racing store writes what this program would read anyway
    tl.store(offsets_ptr + col, starts, mask=col <= NEXP)
    if pid == 0:
        tl.store(nblocks_ptr, total_blocks)

    real = col < NEXP
    # loop trip counts come from the host (upper bounds): loops with device-side bounds do not interpret
    for it in range(0, block_iters):
        j = it * nprog + pid  # j-th block of every expert
        ok = real & (j < nblk)
        tl.store(block_expert_ptr + blk_start + j, col, mask=ok)
        tl.store(block_row0_ptr + blk_start + j, starts + j * BM, mask=ok)

    tl.debug_barrier()  # this program's offsets stores are visible to all its threads
    num_slots = T * K
    for it in range(0, slot_iters):
        s = (it * nprog + pid) * CS + tl.arange(0, CS)
        smask = s < num_slots
        e = tl.load(topk_ids_ptr + s, mask=smask, other=0, volatile=True)
        r = tl.load(rank_ptr + s, mask=smask, other=0, volatile=True)
        first_row = tl.load(offsets_ptr + e, mask=smask, other=0, volatile=True)
        tl.store(sorted_slot_ptr + first_row + r, s, mask=smask)
        if HAS_SHARED:  # the shared expert's rows come last, one per token in token order
            tl.store(sorted_slot_ptr + num_slots + s, num_slots + s, mask=s < T)


# Slots a one-program top-k sorts in registers (plan.LOCAL_SORT_MAX_SLOTS)
LOCAL_SORT_MAX_SLOTS = tl.constexpr(plan.LOCAL_SORT_MAX_SLOTS)


@triton.constexpr_function
def _slots_pow2(RT, K):
    return triton.next_power_of_2(RT * K)


@triton.jit
def _align_in_registers(
    T,
    topk_ids_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    S: tl.constexpr,
):
    """_align's outputs, as the expert kernels read them (_block_rows), when one program holds every slot
    (S >= T*K) and no expert has more rows than a block (T <= BM).

    A slot's sorted row is the number of slots of lower experts plus its rank: the slots of its own expert
    that come before it. Both come from comparing slot pairs in registers, so this needs no counters, no
    atomics and no ticket: what the decode step's routing waits on otherwise is memory round trips, not
    arithmetic. The program's own expert ids are read back once (after a barrier; they are in L2), which
    lays them out for the pairwise compares at no layout-conversion cost. The rows of an expert are in slot
    order (deterministic); the block table is in expert order, the shared expert's block last, as _align
    writes it.
    """
    tl.debug_barrier()  # this program's topk_ids stores are visible to all its threads
    num_slots = T * K
    s1 = tl.arange(0, S)
    ok1 = s1 < num_slots
    e1 = tl.load(topk_ids_ptr + s1, mask=ok1, other=0, volatile=True)
    s_col = tl.arange(0, S)[None, :]
    ok_col = s_col < num_slots
    e_col = tl.load(topk_ids_ptr + s_col, mask=ok_col, other=0, volatile=True)
    below = ok_col & (e_col < e1[:, None])  # [a, b]: slot b belongs to a lower expert than slot a
    rank = tl.sum((ok_col & (e_col == e1[:, None]) & (s_col < s1[:, None])).to(tl.int32), axis=1)
    row = tl.sum(below.to(tl.int32), axis=1) + rank
    opens = ok1 & (rank == 0)  # the first slot of an expert opens its block
    block = tl.sum((below & tl.reshape(opens, (1, S))).to(tl.int32), axis=1)
    tl.store(sorted_slot_ptr + row, s1, mask=ok1)
    tl.store(block_expert_ptr + block, e1, mask=opens)
    tl.store(block_row0_ptr + block, row, mask=opens)
    routed_blocks = tl.sum(opens.to(tl.int32), axis=0)
    # the expert kernels read offsets[e + 1] only (a block's row end): each routed expert writes its own
    # end, the slots of experts up to it; the last routed expert's end is offsets[E] = T*K when it is E - 1
    ends = tl.sum((ok_col & (e_col <= e1[:, None])).to(tl.int32), axis=1)
    tl.store(offsets_ptr + e1 + 1, ends, mask=opens)
    if HAS_SHARED:  # the shared expert: one block of T rows after the routed ones, rows in token order
        tl.store(offsets_ptr + E + 1, num_slots + T)
        tl.store(block_expert_ptr + routed_blocks, E)
        tl.store(block_row0_ptr + routed_blocks, num_slots)
        tl.store(sorted_slot_ptr + num_slots + s1, num_slots + s1, mask=s1 < T)
    tl.store(nblocks_ptr, routed_blocks + HAS_SHARED)


@triton.jit
def _rank_then_align_when_last(
    ids,
    slots,
    slot_mask,
    T,
    block_iters,
    slot_iters,
    counts_ptr,
    topk_ids_ptr,
    rank_ptr,
    tickets_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    FUSE_ALIGN: tl.constexpr,
    BM: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    EP_PAD: tl.constexpr,
    CS: tl.constexpr,
):
    """Slot ranks from the experts' counters; with FUSE_ALIGN the last program to finish (ticket counter)
    sorts the slots by expert."""
    rank = slot_ranks(counts_ptr, ids, slot_mask)
    tl.store(rank_ptr + slots, rank, mask=slot_mask)
    if FUSE_ALIGN:
        # All of this CTA's stores happen before the release of the ticket (threadfence-reduction pattern).
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            tl.debug_barrier()
            _align(
                0,
                1,
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
                E,
                K,
                BM,
                HAS_SHARED,
                EP_PAD,
                CS,
            )


@triton.jit
def router_logits_kernel(
    x_ptr,
    router_w_ptr,
    shared_gate_w_ptr,
    logits_ws_ptr,
    gate_part_ptr,
    zero_ptr,
    xq_ptr,
    xs_ptr,
    T,
    zero_words,
    E: tl.constexpr,
    H: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    ACT_FP8: tl.constexpr,
    WB: tl.constexpr,
    QCOLS: tl.constexpr,
    GATE_COL: tl.constexpr,
    PDL: tl.constexpr,
):
    """Partial router logits (fp32) of a (token block, expert block, slice of H), and of the shared gate.

    Grid (cdiv(T, BT), cdiv(E, BE), SPLIT): at small T the 2 MB-class router weight must be spread over
    many programs to stream at full bandwidth, and E / BE alone gives too few, so H is split too. Slice s
    writes logits_ws[s, T, E]; the top-k kernel sums the SPLIT slices in a fixed order (deterministic).
    The programs also zero the counters (and the fused decode path's accumulator) the later stages
    count with (`zero_words` i32 at zero_ptr), so the op needs no memset of its own.
    ACT_FP8 (fp8 activations): QCOLS more columns of programs (pid 1 from cdiv(E, BE)) quantize their token
    rows of x per WB-wide block into e4m3 codes xq [T, H] and scales xs [T, cdiv(H, WB)], once per call, for
    the expert GEMMs (`gate_up_kernel`), beside the logits programs rather than after them (measured on the
    H200: the first expert block's programs quantizing after their logits added ~40 µs at T = 4096, and
    dealt out over every program of a token block still 21 µs at Qwen3-30B T = 4096 and 3 µs at T = 1).
    GATE_COL (a shared gate; config `router.GATE_COL`): the shared gate's dot products are one more column of
    programs (pid 1 = cdiv(E, BE), before the quantizing ones) instead of a sum in every logits program's loop,
    where all expert blocks but the first compute it and throw it away (at Qwen3-Next's prefill tiles that sum
    doubles the loop: 238 instructions a pass against 114 without it, sm_90 SASS).
    """
    w_first = _router_weights_first(router_w_ptr, E, H, SPLIT, BE, BK)  # before the wait: the model's weights
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    _router_partials(
        x_ptr,
        router_w_ptr,
        w_first,
        shared_gate_w_ptr,
        logits_ws_ptr,
        gate_part_ptr,
        zero_ptr,
        xq_ptr,
        xs_ptr,
        T,
        zero_words,
        E,
        H,
        HAS_SHARED_GATE,
        IEEE,
        SPLIT,
        BT,
        BE,
        BK,
        ACT_FP8,
        WB,
        QCOLS,
        GATE_COL,
    )


@triton.constexpr_function
def _router_slice(H, SPLIT, BK):
    """The columns of H one router program reduces: H / SPLIT rounded up to whole BK tiles."""
    return ((H + SPLIT - 1) // SPLIT + BK - 1) // BK * BK


@triton.constexpr_function
def _router_slice_pad(H, SPLIT, BK):
    """_router_slice rounded up to a power of two (the width of a tile that holds it)."""
    return triton.next_power_of_2(_router_slice(H, SPLIT, BK))


@triton.constexpr_function
def _router_preloads(H, SPLIT, BE, BK):
    """Whether a router program loads its whole weight slice before its wait (plan.ROUTER_PRELOAD_ELEMENTS)."""
    return BE * _router_slice_pad(H, SPLIT, BK) <= plan.ROUTER_PRELOAD_ELEMENTS


@triton.jit
def _router_weights_first(
    router_w_ptr, E: tl.constexpr, H: tl.constexpr, SPLIT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr
):
    """This program's whole [BE, slice] router weights where they are small (`_router_preloads`), else 0.

    The router's weights are the model's, not an earlier kernel's output, so the router kernels ask for them
    before their programmatic-dependent-launch wait: the load's latency then overlaps the end of the kernel
    before (a previous layer's last kernel), where a decode step's router otherwise waits on it after
    (bench/layer_chain.py; docs/kernels.md, "Router weights before the wait"). Zeros for the programs past the
    expert blocks (they quantize x: their rows are masked, so they read nothing)."""
    if _router_preloads(H, SPLIT, BE, BK):
        HS: tl.constexpr = _router_slice(H, SPLIT, BK)
        ecols = tl.program_id(1) * BE + tl.arange(0, BE)
        offs = tl.arange(0, _router_slice_pad(H, SPLIT, BK))
        ks = tl.program_id(2) * HS + offs
        return tl.load(
            router_w_ptr + ecols[:, None] * H + ks[None, :],
            mask=(ecols < E)[:, None] & ((ks < H) & (offs < HS))[None, :],
            other=0.0,
        )
    else:
        return 0


@triton.jit
def _router_step(
    x_ptr,
    shared_gate_w_ptr,
    wt,
    rows,
    row_ok,
    k0,
    width,
    pid_e,
    acc,
    gate_acc,
    H: tl.constexpr,
    SUM_GATE: tl.constexpr,
    IEEE: tl.constexpr,
    BK: tl.constexpr,
):
    """acc (and, with SUM_GATE, the shared gate's partial sum) plus the products of `width` columns of x from k0 (BK of them
    loaded, a power of two at least `width`) with a router weight tile."""
    offs = tl.arange(0, BK)
    ks = k0 + offs
    k_ok = (ks < H) & (offs < width)
    xt = tl.load(x_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    acc = dot_acc(xt, tl.trans(wt), acc, IEEE)
    if SUM_GATE:
        gw = tl.load(shared_gate_w_ptr + ks, mask=k_ok & (pid_e == 0), other=0.0).to(tl.float32)
        gate_acc += tl.sum(xt.to(tl.float32) * gw[None, :], axis=1)
    return acc, gate_acc


@triton.jit
def _router_partials(
    x_ptr,
    router_w_ptr,
    w_first,
    shared_gate_w_ptr,
    logits_ws_ptr,
    gate_part_ptr,
    zero_ptr,
    xq_ptr,
    xs_ptr,
    T,
    zero_words,
    E: tl.constexpr,
    H: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    ACT_FP8: tl.constexpr,
    WB: tl.constexpr,
    QCOLS: tl.constexpr,
    GATE_COL: tl.constexpr,
):
    """The router kernels' work of one program (router_logits_kernel explains it)."""
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    # every program zeroes its share of the span (the fused decode path's accumulator makes it large)
    nprog = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    pid = (pid_t * tl.num_programs(1) + pid_e) * tl.num_programs(2) + pid_s
    share = (zero_words + nprog - 1) // nprog
    for z0 in range(0, share, 1024):
        z = pid * share + z0 + tl.arange(0, 1024)
        tl.store(
            zero_ptr + z,
            tl.zeros((1024,), dtype=tl.int32),
            mask=(z < zero_words) & (z0 + tl.arange(0, 1024) < share),
        )
    HS: tl.constexpr = _router_slice(H, SPLIT, BK)
    rows = pid_t * BT + tl.arange(0, BT)
    row_ok = rows < T
    NE: tl.constexpr = (E + BE - 1) // BE
    GATE_PROGRAMS: tl.constexpr = HAS_SHARED_GATE and GATE_COL  # the shared gate's column (at most one)
    INLINE_GATE: tl.constexpr = HAS_SHARED_GATE and not GATE_COL  # else every logits program sums it too
    if GATE_PROGRAMS and pid_e == NE:
        # the shared gate's partial dot products over this slice of H: x's rows only, no router weights
        gate_acc = tl.zeros((BT,), dtype=tl.float32)
        for k0 in range(0, HS, BK):
            ks = pid_s * HS + k0 + tl.arange(0, BK)
            k_ok = ks < H
            xt = tl.load(
                x_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            gw = tl.load(shared_gate_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            gate_acc += tl.sum(xt.to(tl.float32) * gw[None, :], axis=1)
        tl.store(gate_part_ptr + pid_s * T + rows, gate_acc, mask=row_ok)
    # the programs past the expert blocks and the gate's column quantize x (none without fp8 activations)
    elif pid_e >= NE + GATE_PROGRAMS:
        if ACT_FP8:  # the quantizing code is compiled only where it runs (fp8 needs SM 8.9+)
            NB: tl.constexpr = (H + WB - 1) // WB
            for blk in range(pid_s * QCOLS + pid_e - NE - GATE_PROGRAMS, NB, SPLIT * QCOLS):
                ks = blk * WB + tl.arange(0, WB)
                k_ok = ks < H
                xt = tl.load(
                    x_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                _store_fp8_rows(xq_ptr, xs_ptr, xt.to(tl.float32), rows, row_ok, ks, k_ok, blk, H, NB)
    else:
        ecols = pid_e * BE + tl.arange(0, BE)
        ecol_ok = ecols < E
        acc = tl.zeros((BT, BE), dtype=tl.float32)
        gate_acc = tl.zeros((BT,), dtype=tl.float32)
        if _router_preloads(H, SPLIT, BE, BK):  # the slice's weights came before the wait: one product
            acc, gate_acc = _router_step(
                x_ptr, shared_gate_w_ptr, w_first, rows, row_ok, pid_s * HS, HS, pid_e, acc, gate_acc, H,
                INLINE_GATE, IEEE, _router_slice_pad(H, SPLIT, BK),
            )  # fmt: skip
        else:
            for k0 in range(0, HS, BK):
                ks = pid_s * HS + k0 + tl.arange(0, BK)
                wt = tl.load(
                    router_w_ptr + ecols[:, None] * H + ks[None, :],
                    mask=ecol_ok[:, None] & (ks < H)[None, :],
                    other=0.0,
                )
                acc, gate_acc = _router_step(
                    x_ptr, shared_gate_w_ptr, wt, rows, row_ok, pid_s * HS + k0, BK, pid_e, acc, gate_acc, H,
                    INLINE_GATE, IEEE, BK,
                )  # fmt: skip
        base = pid_s.to(tl.int64) * T * E
        tl.store(
            logits_ws_ptr + base + rows[:, None] * E + ecols[None, :],
            acc,
            mask=row_ok[:, None] & ecol_ok[None, :],
        )
        if INLINE_GATE:
            tl.store(gate_part_ptr + pid_s * T + rows, gate_acc, mask=row_ok & (pid_e == 0))


@triton.jit
def router_topk_kernel(
    x_ptr,
    router_w_ptr,
    shared_gate_w_ptr,
    logits_ws_ptr,
    gate_part_ptr,
    zero_ptr,
    xq_ptr,
    xs_ptr,
    router_b_ptr,
    logits_out_ptr,
    gate_ws_ptr,
    corr_bias_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    offsets_ptr,
    nblocks_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    ticket_ptr,
    T,
    zero_words,
    E: tl.constexpr,
    H: tl.constexpr,
    HAS_SHARED_GATE: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    ACT_FP8: tl.constexpr,
    WB: tl.constexpr,
    QCOLS: tl.constexpr,
    GATE_COL: tl.constexpr,
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
    OUT_LOGITS: tl.constexpr,
    RT: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """The router logits and the routing in one launch, for decode buckets whose every slot fits one
    program's registers (plan.routes_in_router: T <= RT, next_pow2(RT * K) <= LOCAL_SORT_MAX_SLOTS).

    Every program computes its partial logits as router_logits_kernel does, then takes a ticket; the last
    to arrive routes all T tokens and sorts their slots in registers (as the one-program top-k kernel does),
    so the routing costs no launch of its own. The ticket lives in memory that outlives the call (a launcher
    keeps it per stream, zeroed once: plan.STATE_REGIONS): the last program sets it back to zero, so every call
    finds it zero, including CUDA-graph replays.
    """
    w_first = _router_weights_first(router_w_ptr, E, H, SPLIT, BE, BK)  # before the wait: the model's weights
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    _router_partials(
        x_ptr,
        router_w_ptr,
        w_first,
        shared_gate_w_ptr,
        logits_ws_ptr,
        gate_part_ptr,
        zero_ptr,
        xq_ptr,
        xs_ptr,
        T,
        zero_words,
        E,
        H,
        HAS_SHARED_GATE,
        IEEE,
        SPLIT,
        BT,
        BE,
        BK,
        ACT_FP8,
        WB,
        QCOLS,
        GATE_COL,
    )
    # All of this CTA's stores happen before the release of the ticket (threadfence-reduction pattern).
    tl.debug_barrier()
    nprog = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    S: tl.constexpr = _slots_pow2(RT, K)
    if ticket == nprog - 1:
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")  # zero again for the next call
        tl.debug_barrier()
        route_rows(
            T,
            0,
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
        _align_in_registers(
            T,
            topk_ids_ptr,
            offsets_ptr,
            nblocks_ptr,
            block_expert_ptr,
            block_row0_ptr,
            sorted_slot_ptr,
            E,
            K,
            HAS_SHARED,
            S,
        )


@triton.jit
def topk_kernel(
    logits_ws_ptr,
    router_b_ptr,
    logits_out_ptr,
    gate_part_ptr,
    gate_ws_ptr,
    corr_bias_ptr,
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
    FUSE_ALIGN: tl.constexpr,
    RT: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
    BM: tl.constexpr,
    EP_PAD: tl.constexpr,
    CS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Routing of RT tokens per program: logits (sum of the router's H slices + bias), the shared-expert
    gate, scores, (grouped) top-k, correction bias, renorm, scaling.

    Grid (cdiv(T, RT),): small RT keeps the [RT, E] tiles in registers and spreads tokens over the GPU.
    Each slot takes its rank among its expert's rows with an atomic on the expert's counter. With
    FUSE_ALIGN (decode) the last program to finish (ticket counter) also sorts the slots by expert, so
    decode pays no separate align launch; where one program holds every slot (T <= RT, as in a one-token
    step) it sorts them in registers instead, without counters, ticket or reloads (_align_in_registers).
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
    S: tl.constexpr = _slots_pow2(RT, K)  # the program's slots: s = t*K + j, t < RT
    if FUSE_ALIGN and RT <= BM and S <= LOCAL_SORT_MAX_SLOTS:  # noqa: SIM102 (constexpr, then runtime)
        if tl.num_programs(0) == 1:  # every slot in this program: sorted in registers
            _align_in_registers(
                T,
                topk_ids_ptr,
                offsets_ptr,
                nblocks_ptr,
                block_expert_ptr,
                block_row0_ptr,
                sorted_slot_ptr,
                E,
                K,
                HAS_SHARED,
                S,
            )
            return
    _rank_then_align_when_last(
        ids,
        slots,
        slot_mask,
        T,
        block_iters,
        slot_iters,
        counts_ptr,
        topk_ids_ptr,
        rank_ptr,
        tickets_ptr,
        offsets_ptr,
        nblocks_ptr,
        block_expert_ptr,
        block_row0_ptr,
        sorted_slot_ptr,
        E,
        K,
        FUSE_ALIGN,
        BM,
        HAS_SHARED,
        EP_PAD,
        CS,
    )


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
    CS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Prefill: counting sort of slots by expert and the block table, spread over the grid's programs."""
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    _align(
        tl.program_id(0),
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
        E,
        K,
        BM,
        HAS_SHARED,
        EP_PAD,
        CS,
    )


@triton.jit
def grouped_tile(pid, NT: tl.constexpr, GM: tl.constexpr):
    """(row block, column tile) of program `pid` of a grouped GEMM's 1-D grid of row blocks x NT tiles.

    GM row blocks take each column tile in turn before the next tile: consecutive programs then read the
    same weight tile (the blocks of one expert lie next to each other), so all but the first read it from L2,
    while the group's token rows stay in L2 across the tiles. With GM = 1 a row block's tiles run together:
    its token rows are read once, but an expert with many row blocks and many column tiles (Mixtral: 112
    gate_up tiles) streams its weights once per block. The grid covers whole groups (plan.grid_blocks)."""
    group = pid // (GM * NT)
    within = pid % (GM * NT)
    return group * GM + within % GM, within // GM


@triton.jit
def shared_act_rows(rows, T, K: tl.constexpr, ACT_FP8: tl.constexpr):
    """Rows of the act region for the shared expert's sorted rows: with fp8 activations the routed rows'
    activation is actq, and act holds only the shared expert's T rows (the last of the sorted order, from
    T * K; plan.workspace_layout sizes it so); otherwise act holds every sorted row."""
    if ACT_FP8:
        out = rows - T * K
    else:
        out = rows
    return out


@triton.jit
def _block_rows(
    b,
    T,
    offsets_ptr,
    block_expert_ptr,
    block_row0_ptr,
    sorted_slot_ptr,
    E: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
):
    # past the block count these hold garbage: clamp so the dependent loads stay in bounds (result unused)
    e = tl.minimum(tl.maximum(tl.load(block_expert_ptr + b), 0), E)
    row0 = tl.minimum(tl.maximum(tl.load(block_row0_ptr + b), 0), T * (K + 1))
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    row_ok = (rows < row_end) & (rows < T * K + T)
    slot = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)
    num_slots = T * K
    token = tl.where(slot < num_slots, slot // K, slot - num_slots)
    return e, rows, row_ok, slot, token


scales_on_product = triton.constexpr_function(plan.scales_on_product)  # one rule for kernels and plan


@triton.constexpr_function
def one_block(BN, WB, OFFSET):
    """Whether every BN-row tile of an fp8 weight lies in one WB-row weight block: tiles start on multiples
    of BN, and on OFFSET plus those (gate_up's up rows), so BN must divide WB and WB must divide OFFSET."""
    return int(WB % BN == 0 and OFFSET % WB == 0)


@triton.constexpr_function
def shared_tile_k(BK, ACT_FP8):
    """The shared expert's reduction tile in kernels that also multiply fp8 activations: their tile is one
    weight block (128) wide, and a 128-wide tile of the op's dtype for the shared expert's loop would set the
    kernel's shared memory (measured: 240 KB at 3 stages for gate_up's BM 64, BN 128, past the SM's 227 KB,
    so the compiler's stages dropped for both loops); 64 keeps the two loops alike."""
    return min(BK, 64) if ACT_FP8 else BK


weights_first = triton.constexpr_function(plan.weights_first)


@triton.jit
def _fp8_quantize_rows(a):
    """e4m3 codes of the fp32 tile a [R, B] quantized per row, scale = amax / 448 (op.quant.fp8_activations),
    and the [R] scales. IEEE divisions, as op.quant.fp8_activations divides: an approximate one could move a
    code (inputs in bf16 often land exactly on a tie between two e4m3 numbers)."""
    amax = tl.max(tl.abs(a), axis=1)
    a_scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_E4M3_MAX), 1.0)
    return tl.math.div_rn(a, a_scale[:, None]).to(tl.float8e4nv), a_scale


@triton.jit
def _store_fp8_rows(
    q_ptr, qs_ptr, a, rows, row_ok, cols, col_ok, blk, STRIDE: tl.constexpr, NB: tl.constexpr
):
    """Quantize the fp32 tile a [rows, cols] (one block wide) per row and store its codes at
    q_ptr[rows, cols] (row stride STRIDE) and its scales at qs_ptr[rows, blk] (row stride NB)."""
    q, scale = _fp8_quantize_rows(tl.where(col_ok[None, :], a, 0.0))
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(q_ptr + rows[:, None] * STRIDE + cols[None, :], q.to(tl.uint8, bitcast=True), mask=mask)
    tl.store(qs_ptr + rows * NB + blk, scale, mask=row_ok)


@triton.jit
def _fp8_rows(q_ptr, qs_ptr, rows, row_ok, k0, K: tl.constexpr, BK: tl.constexpr):
    """A tile [rows, BK] of activations quantized once per call (`_store_fp8_rows`: e4m3 codes [R, K], one
    fp32 scale per row and BK-wide block): the codes as Triton's e4m3 type (`fp8_codes`) and each row's
    scale."""
    NB: tl.constexpr = (K + BK - 1) // BK
    scale = tl.load(qs_ptr + rows * NB + k0 // BK, mask=row_ok, other=1.0)
    return fp8_codes(q_ptr, rows, row_ok, k0, K, BK), scale


@triton.jit
def _fp8_product(
    aq,
    a_scale,
    w_base,
    s_base,
    rows,
    row_ok,
    k0,
    K: tl.constexpr,
    BK: tl.constexpr,
    WB: tl.constexpr,
    row0,
    ONE_BLOCK: tl.constexpr,
):
    """aq @ W[rows, k0 : k0 + BK].T on the fp8 tensor cores (e4m3 activations aq [BM, BK] with their row
    scales, fp8 weight codes of one weight block), scaled per row of aq and per row of W: fp32 [BM, rows].
    ONE_BLOCK: the rows (from row0) lie in one weight block, so W's scale is one number and the product
    takes one factor per row (a multiply-add into the accumulator rather than two multiplies and an add,
    on the path between two tensor-core products)."""
    w = fp8_codes(w_base, rows, row_ok, k0, K, BK)
    product = tl.dot(aq, tl.trans(w), out_dtype=tl.float32)
    if ONE_BLOCK:
        KS: tl.constexpr = (K + WB - 1) // WB
        w_scale = tl.load(s_base + (row0 // WB) * KS + k0 // WB)
        return product * (a_scale * w_scale)[:, None]
    w_scale = row_scales(s_base, rows, row_ok, k0, K, 1, WB, 1)
    return product * a_scale[:, None] * w_scale[None, :]


@triton.jit
def _quantized_product(
    a,
    w_base,
    z_base,
    s_base,
    rows,
    row_ok,
    k0,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    ACT_FP8: tl.constexpr,
    IEEE: tl.constexpr,
    OUT: tl.constexpr,
):
    """a[:, k0 : k0 + BK] @ W[rows, k0 : k0 + BK].T, fp32 [BM, BR], for a quantized tile inside one scale group
    (`scales_on_product`): the codes' values (int4: minus the zero point) multiplied, then scaled per row of W.
    ACT_FP8 (fp8 weights, BK = WB): `a` quantized to e4m3 per row of the tile (scale = amax / 448, as
    op.quant.fp8_activations) and multiplied with the codes on the fp8 tensor cores, then scaled per row of
    `a` and per row of W."""
    if ACT_FP8:
        aq, a_scale = _fp8_quantize_rows(a.to(tl.float32))
        return _fp8_product(aq, a_scale, w_base, s_base, rows, row_ok, k0, K, BK, WB, 0, 0)
    if WFMT == 1:
        w = fp8_values(w_base, rows, row_ok, k0, K, BK, FP8_CVT, OUT)
    else:
        w = nibble_values(w_base, z_base, rows, row_ok, k0, K, BR, BK, WFMT, WB, HAS_ZERO, OUT)
    return dot(a, tl.trans(w), IEEE) * row_scales(s_base, rows, row_ok, k0, K, WFMT, WB, FP8_CVT)[None, :]


@triton.jit
def _gate_up_sums(
    x_ptr,
    w_base,
    token,
    row_ok,
    n,
    n_ok,
    n_cols,
    k_start,
    H: tl.constexpr,
    KS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    s_base,
    z_base,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
    xq_ptr,
    xs_ptr,
    XQ: tl.constexpr,
    n0,
):
    """(x[token] @ W_gate[n].T, x[token] @ W_up[n].T) in fp32 over the KS reduction elements from k_start, for
    BM token rows and the BN columns n of one expert (`w_base`: its [2 * n_cols, H] gate/up weight, or with
    WFMT its quantized codes, scales at s_base and zero points at z_base). Quantized tiles inside one scale
    group are multiplied unscaled and their product scaled per column (`scales_on_product`,
    `triton_common.fp8_values`, `nibble_values`, `row_scales`); others are dequantized per weight
    (`weight_tile`). XQ (fp8 activations, BK = WB): x comes as e4m3 codes at xq_ptr with block scales at
    xs_ptr, quantized once per call by the router kernel, and meets the fp8 codes on the tensor cores; XQ 2:
    the gate columns from n0 and the up columns from n0 + n_cols each lie in one weight block."""
    out_ty = x_ptr.dtype.element_ty
    SCALED: tl.constexpr = scales_on_product(WFMT, WB, BK, PER_WEIGHT)
    W_FIRST: tl.constexpr = weights_first(WFMT, SCALED, XQ, IEEE, BM, BN)
    if W_FIRST:  # transposed sums, [BN, BM]
        acc_g = tl.zeros((BN, BM), dtype=tl.float32)
        acc_u = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_start + KS, BK):
        if XQ:
            xq, x_scale = _fp8_rows(xq_ptr, xs_ptr, token, row_ok, k0, H, BK)
            acc_g += _fp8_product(xq, x_scale, w_base, s_base, n, n_ok, k0, H, BK, WB, n0, XQ == 2)
            acc_u += _fp8_product(
                xq, x_scale, w_base, s_base, n + n_cols, n_ok, k0, H, BK, WB, n0 + n_cols, XQ == 2
            )
        else:
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < H
            # weights first: their address needs only the expert, the token rows need one more load
            if WFMT == 0:
                wmask = n_ok[:, None] & k_ok[None, :]
                wg = tl.load(w_base + n[:, None] * H + ks[None, :], mask=wmask, other=0.0)
                wu = tl.load(w_base + (n + n_cols)[:, None] * H + ks[None, :], mask=wmask, other=0.0)
            elif not SCALED:
                wg = weight_tile(
                    w_base, s_base, z_base, n, n_ok, k0, H, BN, BK, WFMT, WB, HAS_ZERO, out_ty, FP8_CVT
                )
                wu = weight_tile(
                    w_base,
                    s_base,
                    z_base,
                    n + n_cols,
                    n_ok,
                    k0,
                    H,
                    BN,
                    BK,
                    WFMT,
                    WB,
                    HAS_ZERO,
                    out_ty,
                    FP8_CVT,
                )
            xt = tl.load(
                x_ptr + token[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            if SCALED:
                acc_g += _quantized_product(
                    xt, w_base, z_base, s_base, n, n_ok, k0, H, BN, BK, WFMT, WB, HAS_ZERO, FP8_CVT, ACT_FP8, IEEE,
                    out_ty,
                )  # fmt: skip
                acc_u += _quantized_product(
                    xt, w_base, z_base, s_base, n + n_cols, n_ok, k0, H, BN, BK, WFMT, WB, HAS_ZERO, FP8_CVT, ACT_FP8,
                    IEEE, out_ty,
                )  # fmt: skip
            elif W_FIRST:
                acc_g = dot_acc(wg, tl.trans(xt), acc_g, IEEE)
                acc_u = dot_acc(wu, tl.trans(xt), acc_u, IEEE)
            else:
                acc_g = dot_acc(xt, tl.trans(wg), acc_g, IEEE)
                acc_u = dot_acc(xt, tl.trans(wu), acc_u, IEEE)
    if W_FIRST:
        acc_g, acc_u = tl.trans(acc_g), tl.trans(acc_u)
    return acc_g, acc_u


@triton.jit
def _gate_up_sums_tma(
    x_ptr,
    w_desc,
    token,
    row_ok,
    n0,
    n_cols,
    k_start,
    H: tl.constexpr,
    KS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """`_gate_up_sums` for native weights whose [BN, BK] gate and up tiles come by TMA (w_desc: the expert's
    [2 * n_cols, H] weight). Rows past the descriptor's shape and columns past H load as zeros; gate rows past
    n_cols read up rows, whose sums the caller does not store."""
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_start + KS, BK):
        ks = k0 + tl.arange(0, BK)
        wg = w_desc.load([n0, k0])
        wu = w_desc.load([n0 + n_cols, k0])
        xt = tl.load(
            x_ptr + token[:, None] * H + ks[None, :], mask=row_ok[:, None] & (ks < H)[None, :], other=0.0
        )
        acc_g = dot_acc(xt, tl.trans(wg), acc_g, IEEE)
        acc_u = dot_acc(xt, tl.trans(wu), acc_u, IEEE)
    return acc_g, acc_u


@triton.jit
def _gate_up_finish(
    acc_g,
    acc_u,
    b_gu_ptr,
    e,
    is_shared,
    n,
    n_ok,
    I: tl.constexpr,  # noqa: E741
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """The activation of whole gate / up sums: bias (routed experts), then the GLU."""
    if HAS_BIAS:  # noqa: SIM102 (a constexpr and a runtime condition: Triton needs them apart)
        if not is_shared:
            bias_base = b_gu_ptr + e * (2 * I)
            acc_g += tl.load(bias_base + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bias_base + I + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if is_shared:
        act = _glu(acc_g, acc_u, 0, ALPHA, LIMIT)  # the shared expert is always SiLU-GLU (spec)
    else:
        act = _glu(acc_g, acc_u, ACTIVATION, ALPHA, LIMIT)
    return act


@triton.jit
def _gate_up_tile(
    x_ptr,
    w_base,
    b_gu_ptr,
    e,
    is_shared,
    token,
    row_ok,
    n,
    n_ok,
    n_cols,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    s_base,
    z_base,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
):
    """glu(x[token] @ W_gate[n].T, x[token] @ W_up[n].T) in fp32 over the whole of H (experts_kernel)."""
    acc_g, acc_u = _gate_up_sums(
        x_ptr, w_base, token, row_ok, n, n_ok, n_cols, 0, H, H, IEEE, BM, BN, BK, s_base, z_base, WFMT, WB,
        HAS_ZERO, FP8_CVT, PER_WEIGHT, ACT_FP8, x_ptr, x_ptr, 0, 0,
    )  # fmt: skip
    return _gate_up_finish(
        acc_g, acc_u, b_gu_ptr, e, is_shared, n, n_ok, I, ACTIVATION, ALPHA, LIMIT, HAS_BIAS
    )


@triton.jit
def _shared_first_tile(pid, routed_tiles, P):
    """A persistent program's first tile of the shared expert's loop, continuing the routed loop's round robin
    (tile routed_tiles + j goes to program (routed_tiles + j) % P)."""
    return (pid - routed_tiles % P + P) % P


@triton.jit
def _gate_up_persistent(
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
    GM: tl.constexpr,
):
    """gate_up_kernel's TMA form with persistent programs (PERSIST: plan.persistent_programs): each of the
    grid's programs takes every P-th (row block, N tile) of the routed experts, then of the shared expert, in
    one flattened loop per kind, so the next tile's weight loads are in flight during a tile's activation and
    stores (with one program per tile, each paid its pipeline's fill and its epilogue in turn). The
    descriptors are built once per program: over all routed experts' [E * 2I, H] gate/up weights (a tile's
    rows start at e * 2I) and over the shared expert's [2 IS, H]. The shared expert's blocks are the last
    cdiv(T, BM) of the block table; routed tiles of a last partial group of GM blocks are computed with every
    row masked (no branch in the loop)."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    HAS_SHARED: tl.constexpr = IS > 0
    num_blocks = tl.load(nblocks_ptr)
    routed_blocks = num_blocks - HAS_SHARED * ((T + BM - 1) // BM)
    NTR: tl.constexpr = (I + BN - 1) // BN
    routed_tiles = (routed_blocks + GM - 1) // GM * GM * NTR
    w_desc = tl.make_tensor_descriptor(w_gu_ptr, shape=[E * 2 * I, H], strides=[H, 1], block_shape=[BN, BK])
    for tile in tl.range(pid, routed_tiles, P, flatten=True):
        b, pid_n = grouped_tile(tile, NTR, GM)
        e, rows, row_ok, _slot, token = _block_rows(
            b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
        )
        row_ok = row_ok & (b < routed_blocks)
        acc_g, acc_u = _gate_up_sums_tma(
            x_ptr, w_desc, token, row_ok, e * (2 * I) + pid_n * BN, I, 0, H, H, IEEE, BM, BN, BK
        )
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < I
        act = _gate_up_finish(
            acc_g, acc_u, b_gu_ptr, e, False, n, n_ok, I, ACTIVATION, ALPHA, LIMIT, HAS_BIAS
        )
        tl.store(
            act_ptr + rows[:, None] * NMAX + n[None, :],
            act.to(act_ptr.dtype.element_ty),
            mask=row_ok[:, None] & n_ok[None, :],
        )
    if HAS_SHARED:
        s_desc = tl.make_tensor_descriptor(
            shared_w_gu_ptr, shape=[2 * IS, H], strides=[H, 1], block_shape=[BN, BK]
        )
        NTS: tl.constexpr = (IS + BN - 1) // BN
        shared_tiles = (num_blocks - routed_blocks) * NTS
        for tile in tl.range(_shared_first_tile(pid, routed_tiles, P), shared_tiles, P, flatten=True):
            b = routed_blocks + tile // NTS
            pid_n = tile % NTS
            e, rows, row_ok, _slot, token = _block_rows(
                b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
            )
            acc_g, acc_u = _gate_up_sums_tma(
                x_ptr, s_desc, token, row_ok, pid_n * BN, IS, 0, H, H, IEEE, BM, BN, BK
            )
            n = pid_n * BN + tl.arange(0, BN)
            n_ok = n < IS
            act = _gate_up_finish(
                acc_g, acc_u, b_gu_ptr, e, True, n, n_ok, I, ACTIVATION, ALPHA, LIMIT, HAS_BIAS
            )
            tl.store(
                act_ptr + rows[:, None] * NMAX + n[None, :],
                act.to(act_ptr.dtype.element_ty),
                mask=row_ok[:, None] & n_ok[None, :],
            )


@triton.jit
def gate_up_kernel(
    x_ptr,
    w_gu_ptr,
    b_gu_ptr,
    shared_w_gu_ptr,
    act_ptr,
    w_gu_scale_ptr,
    w_gu_zero_ptr,
    gu_part_ptr,
    gu_tickets_ptr,
    xq_ptr,
    xs_ptr,
    actq_ptr,
    acts_ptr,
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
    SK: tl.constexpr,
    GM: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
    TMA: tl.constexpr,
    PERSIST: tl.constexpr,
    PDL: tl.constexpr,
):
    """act[row, n] = glu(x[token] @ W_gate[e, n], x[token] @ W_up[e, n]) for one (row block, N tile).

    1-D grid of max blocks x cdiv(NMAX, BN) x SK programs, split fastest, then N tile: the programs of one
    row block run together, so its gathered token rows are read from HBM once and then hit L2. Programs
    past the actual block count exit at once. One program streams its expert's BN gate rows and BN up rows
    once for up to BM tokens, over H / SK of the reduction: with SK > 1 (decode, where one program per
    tile leaves too few bytes in flight) each split writes its fp32 partial sums (gu_part[split, row,
    gate | up]) and the last split of a tile to finish (ticket) adds them in split order, so the result
    does not depend on which finished last, and applies the activation.

    ACT_FP8 (fp8 activations; BK and BN one weight block): the routed rows read x as the e4m3 codes and
    block scales the router kernel wrote (xq, xs) and store their activation, rounded to the op's dtype,
    as e4m3 codes and one scale per row and block (actq [R, I], acts), the down GEMM's operand; the shared
    expert's rows store theirs in the op's dtype (act).

    TMA (native weights, plan.uses_tma): the weight tiles come by the tensor-memory accelerator, through a
    descriptor over the program's expert built on the device (Triton's global scratch, 128 bytes a program:
    the launch's last argument); the token rows are still gathered by pointer (TMA cannot gather rows).
    PERSIST (prefill, TMA): a grid of fewer programs, each looping over tiles (`_gate_up_persistent`).
    """
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    if PERSIST:
        _gate_up_persistent(
            x_ptr, w_gu_ptr, b_gu_ptr, shared_w_gu_ptr, act_ptr, offsets_ptr, nblocks_ptr, block_expert_ptr,
            block_row0_ptr, sorted_slot_ptr, T, E, K, H, I, IS, NMAX, ACTIVATION, ALPHA, LIMIT, HAS_BIAS, IEEE,
            BM, BN, BK, GM,
        )  # fmt: skip
        return
    NT: tl.constexpr = (NMAX + BN - 1) // BN
    KS: tl.constexpr = ((H + SK - 1) // SK + BK - 1) // BK * BK  # reduction elements per split
    tile = tl.program_id(0) // SK
    pid_k = tl.program_id(0) % SK
    b, pid_n = grouped_tile(tile, NT, GM)
    num_blocks = tl.load(nblocks_ptr)
    e, rows, row_ok, _slot, token = _block_rows(
        b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
    )
    if b >= num_blocks:
        return
    is_shared = e == E
    n_cols = tl.where(is_shared, IS, I)
    n = pid_n * BN + tl.arange(0, BN)
    if pid_n * BN >= n_cols:
        return
    n_ok = n < n_cols
    k_start = pid_k * KS
    if WFMT == 0:
        # One K loop for routed and shared rows: a second inlined loop would double the pipeline's shared
        # memory (measured: 288 KB for the BM = BN = 128, 3-stage prefill tiles, past the SM's limit).
        if is_shared:
            w_base = shared_w_gu_ptr
        else:
            w_base = w_gu_ptr + e.to(tl.int64) * (2 * I * H)
        if TMA:
            w_desc = tl.make_tensor_descriptor(
                w_base, shape=[2 * n_cols, H], strides=[H, 1], block_shape=[BN, BK]
            )
            acc_g, acc_u = _gate_up_sums_tma(
                x_ptr, w_desc, token, row_ok, pid_n * BN, n_cols, k_start, H, KS, IEEE, BM, BN, BK
            )
        else:
            acc_g, acc_u = _gate_up_sums(
                x_ptr, w_base, token, row_ok, n, n_ok, n_cols, k_start, H, KS, IEEE, BM, BN, BK, w_base, w_base,
                0, 0, 0, 0, 0, 0, x_ptr, x_ptr, 0, 0,
            )  # fmt: skip
    elif is_shared:  # the shared expert is always native
        acc_g, acc_u = _gate_up_sums(
            x_ptr, shared_w_gu_ptr, token, row_ok, n, n_ok, n_cols, k_start, H, KS, IEEE, BM, BN,
            shared_tile_k(BK, ACT_FP8), shared_w_gu_ptr, shared_w_gu_ptr, 0, 0, 0, 0, 0, 0, x_ptr, x_ptr, 0, 0,
        )  # fmt: skip
    else:
        codes, scales, zeros = expert_tables(w_gu_ptr, w_gu_scale_ptr, w_gu_zero_ptr, e, 2 * I, H, WFMT, WB)
        acc_g, acc_u = _gate_up_sums(
            x_ptr, codes, token, row_ok, n, n_ok, n_cols, k_start, H, KS, IEEE, BM, BN, BK, scales, zeros,
            WFMT, WB, HAS_ZERO, FP8_CVT, PER_WEIGHT, 0, xq_ptr, xs_ptr, ACT_FP8 * (1 + one_block(BN, WB, I)),
            pid_n * BN,
        )  # fmt: skip
    out_mask = row_ok[:, None] & n_ok[None, :]
    if SK > 1:
        R = T * K + T  # rows of the partial-sum slices (the shared expert's rows included)
        part = gu_part_ptr + rows[:, None] * (2 * NMAX) + n[None, :]
        tl.store(part + pid_k * R * (2 * NMAX), acc_g, mask=out_mask)
        tl.store(part + pid_k * R * (2 * NMAX) + NMAX, acc_u, mask=out_mask)
        tl.debug_barrier()  # this CTA's partial stores happen before the release of the ticket
        ticket = tl.atomic_add(gu_tickets_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket != SK - 1:
            return
        tl.debug_barrier()
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for j in tl.static_range(SK):
            acc_g += tl.load(part + j * R * (2 * NMAX), mask=out_mask, other=0.0, volatile=True)
            acc_u += tl.load(part + j * R * (2 * NMAX) + NMAX, mask=out_mask, other=0.0, volatile=True)
    act = _gate_up_finish(
        acc_g, acc_u, b_gu_ptr, e, is_shared, n, n_ok, I, ACTIVATION, ALPHA, LIMIT, HAS_BIAS
    ).to(act_ptr.dtype.element_ty)
    if ACT_FP8:
        if is_shared:
            act_rows = shared_act_rows(rows, T, K, ACT_FP8)
            tl.store(act_ptr + act_rows[:, None] * NMAX + n[None, :], act, mask=out_mask)
        else:
            NBI: tl.constexpr = (I + BN - 1) // BN
            _store_fp8_rows(actq_ptr, acts_ptr, act.to(tl.float32), rows, row_ok, n, n_ok, pid_n, I, NBI)
    else:
        tl.store(act_ptr + rows[:, None] * NMAX + n[None, :], act, mask=out_mask)


@triton.jit
def _down_tile(
    act_ptr,
    w_base,
    rows,
    row_ok,
    h,
    h_ok,
    n_cols: tl.constexpr,
    NMAX: tl.constexpr,
    H_STRIDE: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    s_base,
    z_base,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
    acts_ptr,
    h0,
):
    """act[rows, :n_cols] @ W[h].T for one expert's down weight ([H, n_cols] at w_base, or with WFMT its
    quantized codes, scales and zero points, as in `_gate_up_tile`). ACT_FP8 (BK = WB): act_ptr holds the
    activation as e4m3 codes [R, n_cols] with block scales at acts_ptr (gate_up_kernel wrote them), multiplied
    with the fp8 codes on the tensor cores; ACT_FP8 2: the rows h from h0 lie in one weight block."""
    out_ty = act_ptr.dtype.element_ty
    SCALED: tl.constexpr = scales_on_product(WFMT, WB, BK, PER_WEIGHT)
    W_FIRST: tl.constexpr = weights_first(WFMT, SCALED, ACT_FP8, IEEE, BM, BH)
    if W_FIRST:  # transposed sums, [BH, BM]
        y = tl.zeros((BH, BM), dtype=tl.float32)
    else:
        y = tl.zeros((BM, BH), dtype=tl.float32)
    for k0 in range(0, n_cols, BK):
        if ACT_FP8:
            aq, a_scale = _fp8_rows(act_ptr, acts_ptr, rows, row_ok, k0, n_cols, BK)
            y += _fp8_product(aq, a_scale, w_base, s_base, h, h_ok, k0, n_cols, BK, WB, h0, ACT_FP8 == 2)
        else:
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < n_cols
            a = tl.load(
                act_ptr + rows[:, None] * NMAX + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            if WFMT == 0:
                w = tl.load(
                    w_base + h[None, :] * H_STRIDE + ks[:, None],
                    mask=k_ok[:, None] & h_ok[None, :],
                    other=0.0,
                )
                y = dot_acc(a, w, y, IEEE)
            elif SCALED:
                y += _quantized_product(
                    a, w_base, z_base, s_base, h, h_ok, k0, n_cols, BH, BK, WFMT, WB, HAS_ZERO, FP8_CVT, 0, IEEE,
                    out_ty,
                )  # fmt: skip
            else:
                w = weight_tile(
                    w_base, s_base, z_base, h, h_ok, k0, n_cols, BH, BK, WFMT, WB, HAS_ZERO, out_ty, FP8_CVT
                )
                if W_FIRST:
                    y = dot_acc(w, tl.trans(a), y, IEEE)
                else:
                    y = dot_acc(a, tl.trans(w), y, IEEE)
    if W_FIRST:
        y = tl.trans(y)
    return y


@triton.jit
def _down_tile_tma(
    a_desc,
    w_desc,
    row0,
    w_row0,
    n_cols,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
):
    """act[row0 : row0 + BM, :n_cols] @ W[w_row0 : w_row0 + BH].T with both tiles by TMA: a_desc over act
    [R, NMAX] (rows past R load as zeros; rows of the next expert are multiplied and not stored), w_desc over
    down weights whose rows are the output columns; n_cols is a multiple of BK (plan.uses_tma), so no column
    of act past n_cols is read."""
    y = tl.zeros((BM, BH), dtype=tl.float32)
    for k0 in range(0, n_cols, BK):
        a = a_desc.load([row0, k0])
        w = w_desc.load([w_row0, k0])
        y = dot_acc(a, tl.trans(w), y, IEEE)
    return y


@triton.jit
def _down_rows_persistent(
    w_down_ptr,
    b_down_ptr,
    shared_w_down_ptr,
    act_ptr,
    topk_w_ptr,
    gate_ws_ptr,
    yw_ptr,
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
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    GM: tl.constexpr,
):
    """down_rows_kernel's TMA form with persistent programs (PERSIST), as `_gate_up_persistent`: every P-th
    (row block, H tile) of the routed experts, then of the shared expert, in one flattened loop each, through
    descriptors built once per program over act [R, NMAX], all routed experts' [E * H, I] down weights (a
    tile's rows start at e * H) and the shared expert's [H, IS]. down's reduction is short (I: 8-12 steps of
    64 at Qwen3's widths), so a tile's pipeline fill and its weighted stores were a third of its time."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    NTH: tl.constexpr = (H + BH - 1) // BH
    num_blocks = tl.load(nblocks_ptr)
    routed_blocks = num_blocks - HAS_SHARED * ((T + BM - 1) // BM)
    routed_tiles = (routed_blocks + GM - 1) // GM * GM * NTH
    R = T * K + T * HAS_SHARED
    a_desc = tl.make_tensor_descriptor(act_ptr, shape=[R, NMAX], strides=[NMAX, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_down_ptr, shape=[E * H, I], strides=[I, 1], block_shape=[BH, BK])
    for tile in tl.range(pid, routed_tiles, P, flatten=True):
        b, pid_h = grouped_tile(tile, NTH, GM)
        e, rows, row_ok, slot, _token = _block_rows(
            b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
        )
        row_ok = row_ok & (b < routed_blocks)
        y = _down_tile_tma(a_desc, w_desc, tl.min(rows, axis=0), e * H + pid_h * BH, I, IEEE, BM, BH, BK)
        h = pid_h * BH + tl.arange(0, BH)
        h_ok = h < H
        if HAS_BIAS:
            y += tl.load(b_down_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
        tl.store(
            yw_ptr + slot[:, None] * H + h[None, :],
            (y * weight[:, None]).to(yw_ptr.dtype.element_ty),
            mask=row_ok[:, None] & h_ok[None, :],
        )
    if HAS_SHARED:
        s_desc = tl.make_tensor_descriptor(
            shared_w_down_ptr, shape=[H, IS], strides=[IS, 1], block_shape=[BH, BK]
        )
        shared_tiles = (num_blocks - routed_blocks) * NTH
        for tile in tl.range(_shared_first_tile(pid, routed_tiles, P), shared_tiles, P, flatten=True):
            b = routed_blocks + tile // NTH
            pid_h = tile % NTH
            e, rows, row_ok, slot, token = _block_rows(
                b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
            )
            y = _down_tile_tma(a_desc, s_desc, tl.min(rows, axis=0), pid_h * BH, IS, IEEE, BM, BH, BK)
            h = pid_h * BH + tl.arange(0, BH)
            h_ok = h < H
            weight = tl.load(gate_ws_ptr + token, mask=row_ok, other=0.0)
            tl.store(
                yw_ptr + slot[:, None] * H + h[None, :],
                (y * weight[:, None]).to(yw_ptr.dtype.element_ty),
                mask=row_ok[:, None] & h_ok[None, :],
            )


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
    w_down_scale_ptr,
    w_down_zero_ptr,
    actq_ptr,
    acts_ptr,
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
    GM: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
    TMA: tl.constexpr,
    PERSIST: tl.constexpr,
    PDL: tl.constexpr,
):
    """yw[slot, h tile] = weight * (act[row] @ W_down[e].T) for one (row block, H tile).

    1-D grid of max blocks x cdiv(H, BH) programs, H tile fastest (a row block's activations stay in L2).
    With FUSE_REDUCE (decode), the last program to finish an H tile (ticket counter) also sums each
    token's K slots and its shared-expert row into the output: the reduction over k costs no launch, and
    stays deterministic (fixed slot order, no float atomics).
    TMA (native weights, no fp8 activations, plan.uses_tma): the activation and weight tiles come by the
    tensor-memory accelerator (a block's rows are consecutive in act), through two descriptors built on the
    device (Triton's global scratch, 256 bytes a program: the launch's last argument), in one loop for the
    shared and the routed rows. PERSIST (prefill, TMA): a grid of fewer programs, each looping over tiles
    (`_down_rows_persistent`).
    """
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    if PERSIST:
        _down_rows_persistent(
            w_down_ptr, b_down_ptr, shared_w_down_ptr, act_ptr, topk_w_ptr, gate_ws_ptr, yw_ptr, offsets_ptr,
            nblocks_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, T, E, K, H, I, IS, NMAX, HAS_BIAS,
            HAS_SHARED, IEEE, BM, BH, BK, GM,
        )  # fmt: skip
        return
    NTH: tl.constexpr = (H + BH - 1) // BH
    b, pid_h = grouped_tile(tl.program_id(0), NTH, GM)
    h = pid_h * BH + tl.arange(0, BH)
    h_ok = h < H
    num_blocks = tl.load(nblocks_ptr)
    e, rows, row_ok, slot, token = _block_rows(
        b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
    )
    if b < num_blocks:
        if TMA:  # one loop for the shared and routed rows (plan.uses_tma: native weights)
            is_shared = e == E
            if is_shared:
                w_base = shared_w_down_ptr
            else:
                w_base = w_down_ptr + e.to(tl.int64) * (H * I)
            n_cols = tl.where(is_shared, IS, I)
            a_desc = tl.make_tensor_descriptor(
                act_ptr, shape=[T * K + T * HAS_SHARED, NMAX], strides=[NMAX, 1], block_shape=[BM, BK]
            )
            w_desc = tl.make_tensor_descriptor(
                w_base, shape=[H, n_cols], strides=[n_cols, 1], block_shape=[BH, BK]
            )
            y = _down_tile_tma(a_desc, w_desc, tl.min(rows, axis=0), pid_h * BH, n_cols, IEEE, BM, BH, BK)
            if HAS_BIAS:  # noqa: SIM102 (a constexpr and a runtime condition: Triton needs them apart)
                if not is_shared:
                    y += tl.load(b_down_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            if is_shared:
                weight = tl.load(gate_ws_ptr + token, mask=row_ok, other=0.0)
            else:
                weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
        elif e == E:
            y = _down_tile(
                act_ptr, shared_w_down_ptr, shared_act_rows(rows, T, K, ACT_FP8), row_ok, h, h_ok, IS, NMAX, IS, IEEE, BM, BH,
                shared_tile_k(BK, ACT_FP8), shared_w_down_ptr, shared_w_down_ptr, 0, 0, 0, 0, 0, 0, acts_ptr, 0,
            )  # fmt: skip
            weight = tl.load(gate_ws_ptr + token, mask=row_ok, other=0.0)
        else:
            if WFMT == 0:
                codes = w_down_ptr + e.to(tl.int64) * (H * I)
                scales, zeros = w_down_ptr, w_down_ptr
            else:
                codes, scales, zeros = expert_tables(
                    w_down_ptr, w_down_scale_ptr, w_down_zero_ptr, e, H, I, WFMT, WB
                )
            if ACT_FP8:  # the routed rows' activation as e4m3 codes (gate_up_kernel)
                a_base = actq_ptr
            else:
                a_base = act_ptr
            y = _down_tile(
                a_base, codes, rows, row_ok, h, h_ok, I, NMAX, I, IEEE, BM, BH, BK, scales, zeros, WFMT, WB,
                HAS_ZERO, FP8_CVT, PER_WEIGHT, ACT_FP8 * (1 + one_block(BH, WB, 0)), acts_ptr, pid_h * BH,
            )  # fmt: skip
            if HAS_BIAS:
                y += tl.load(b_down_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
        y = y * weight[:, None]
        tl.store(
            yw_ptr + slot[:, None] * H + h[None, :],
            y.to(yw_ptr.dtype.element_ty),
            mask=row_ok[:, None] & h_ok[None, :],
        )
    if FUSE_REDUCE:
        reduce_h_tile_when_last(
            yw_ptr, out_ptr, htickets_ptr, pid_h, h, h_ok, T, K, H, HAS_SHARED, BT, BH, NTH
        )


@triton.jit
def experts_kernel(
    x_ptr,
    w_gu_ptr,
    b_gu_ptr,
    shared_w_gu_ptr,
    w_down_ptr,
    b_down_ptr,
    shared_w_down_ptr,
    topk_w_ptr,
    gate_ws_ptr,
    acc_ptr,
    out_ptr,
    tickets_ptr,
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
    BH: tl.constexpr,
    PDL: tl.constexpr,
):
    """Decode, fused: gate_up + activation + down + routing weight + reduction over k in one launch.

    Program (row block, N tile of I): the activation of its BN columns, then their share of the down
    projection for every h (act[:, tile] @ W_down[e][:, tile].T), weighted, added with fp32 atomics into
    acc[T, H] (zeroed by the router kernel). The last program to finish (ticket: the second word of
    `tickets`, whose first is the top-k kernel's) casts acc into the output, so the path needs no finalize
    launch. The down weights stream in the same launch as the gate/up weights: no launch gap, no activation
    round trip through memory. Float atomics make the summation order (and the last bits) vary from run to
    run.
    """
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    NT: tl.constexpr = (NMAX + BN - 1) // BN
    b = tl.program_id(0) // NT
    pid_n = tl.program_id(0) % NT
    num_blocks = tl.load(nblocks_ptr)
    e, _rows, row_ok, slot, token = _block_rows(
        b, T, offsets_ptr, block_expert_ptr, block_row0_ptr, sorted_slot_ptr, E, K, BM
    )
    n_cols = tl.where(e == E, IS, I)
    # every program takes a ticket, those with no tile too (past the blocks, or past a narrower expert's I)
    if (b < num_blocks) & (pid_n * BN < n_cols):
        _experts_tile(
            x_ptr, w_gu_ptr, b_gu_ptr, shared_w_gu_ptr, w_down_ptr, b_down_ptr, shared_w_down_ptr, topk_w_ptr,
            gate_ws_ptr, acc_ptr, e, row_ok, slot, token, pid_n, n_cols, E, H, I, IS, ACTIVATION, ALPHA, LIMIT,
            HAS_BIAS, IEEE, BM, BN, BK, BH,
        )  # fmt: skip
    _cast_sum_when_last(acc_ptr, out_ptr, tickets_ptr + 1, tl.num_programs(0), T, H, BM * BH)


@triton.jit
def _cast_sum_when_last(acc_ptr, out_ptr, ticket_ptr, takers, T, H: tl.constexpr, BLOCK: tl.constexpr):
    """The fused paths' last step: each program takes a ticket after its fp32 atomics into acc [T, H]; the last
    of `takers` to take one casts acc into the output (threadfence-reduction pattern)."""
    tl.debug_barrier()  # every thread's atomics before the ticket
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == takers - 1:
        tl.debug_barrier()
        for i0 in range(0, T * H, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            total = tl.load(acc_ptr + i, mask=i < T * H, other=0.0, volatile=True)
            tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=i < T * H)


@triton.jit
def _experts_tile(
    x_ptr,
    w_gu_ptr,
    b_gu_ptr,
    shared_w_gu_ptr,
    w_down_ptr,
    b_down_ptr,
    shared_w_down_ptr,
    topk_w_ptr,
    gate_ws_ptr,
    acc_ptr,
    e,
    row_ok,
    slot,
    token,
    pid_n,
    n_cols,
    E: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741
    IS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BH: tl.constexpr,
):
    """experts_kernel's tile: the activation of BN columns of expert e, then their weighted share of the down
    projection for every h, added into acc with fp32 atomics."""
    is_shared = e == E
    if is_shared:
        w_base = shared_w_gu_ptr
        wd_base = shared_w_down_ptr
        weight = tl.load(gate_ws_ptr + token, mask=row_ok, other=0.0)
    else:
        w_base = w_gu_ptr + e.to(tl.int64) * (2 * I * H)
        wd_base = w_down_ptr + e.to(tl.int64) * (H * I)
        weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < n_cols
    act = _gate_up_tile(
        x_ptr,
        w_base,
        b_gu_ptr,
        e,
        is_shared,
        token,
        row_ok,
        n,
        n_ok,
        n_cols,
        H,
        I,
        ACTIVATION,
        ALPHA,
        LIMIT,
        HAS_BIAS,
        IEEE,
        BM,
        BN,
        BK,
        w_base,
        w_base,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    # the same rounding as the two-kernel path, which stores the activation in the input dtype
    act = tl.where(n_ok[None, :], act, 0.0).to(x_ptr.dtype.element_ty)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        h_ok = h < H
        wd = tl.load(
            wd_base + h[:, None] * n_cols + n[None, :], mask=h_ok[:, None] & n_ok[None, :], other=0.0
        )
        y = dot(act, tl.trans(wd), IEEE)
        if HAS_BIAS:  # the down bias once per slot: by the first N tile, not for the shared expert
            bias_ok = h_ok & (pid_n == 0) & (e != E)
            y += tl.load(b_down_ptr + e * H + h, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
        y = y * weight[:, None]
        tl.atomic_add(
            acc_ptr + token[:, None] * H + h[None, :],
            y,
            mask=row_ok[:, None] & h_ok[None, :],
            sem="relaxed",
            scope="gpu",
        )


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
    PDL: tl.constexpr,
):
    """Prefill: out[t] = sum_j yw[t*K + j] (+ yw[T*K + t], the gated shared expert), in fp32."""
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    mask = (t < T)[:, None] & (h < H)[None, :]
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(yw_ptr + (t * K + j)[:, None] * H + h[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(yw_ptr + (T * K + t)[:, None] * H + h[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pick(values, kcols, j):
    """Column j of a [1, K_PAD] routing row, as a scalar."""
    return tl.sum(tl.where(kcols[None, :] == j, values, 0))


@triton.jit
def routed_experts_kernel(
    x_ptr,
    logits_ws_ptr,
    router_b_ptr,
    logits_out_ptr,
    gate_part_ptr,
    gate_ws_ptr,
    corr_bias_ptr,
    w_gu_ptr,
    b_gu_ptr,
    shared_w_gu_ptr,
    w_gu_scale_ptr,
    w_gu_zero_ptr,
    w_down_ptr,
    b_down_ptr,
    shared_w_down_ptr,
    w_down_scale_ptr,
    w_down_zero_ptr,
    topk_ids_ptr,
    topk_w_ptr,
    act_ptr,
    out_ptr,
    units_ptr,
    acc_ptr,
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
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BH: tl.constexpr,
    BKD: tl.constexpr,
    FUSED: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    """Small T, after the router kernel: routing, gate_up, down, routing weights and the sum over k in one
    launch, with no sort and no block table.

    Each program takes a unit number from a counter (units[0], zeroed by the router kernel), so units are
    handed out in the order programs start; a program waits only for units handed out before its own, to
    programs that are running, so no wait can deadlock whatever the grid size or residency (and the CPU
    interpreter, which runs programs in order, never waits). Units, in order:
      0: the routing of all T tokens, RT rows at a time (`route_rows`, as the top-k kernel routes: logits
         out, expert ids and weights into topk_ids / topk_w), then the flag units[1] (release);
      the shared expert's gate_up N tiles of every token: they need no routing, so they stream while unit 0
         routes;
      the routed slots' gate_up N tiles (token, slot, tile): wait for the flag (acquire), read the slot's
         expert, stream its BN gate and up rows over all of H once, apply the activation;
      unless FUSED, the output's H tiles (token, tile): wait until the token's gate_up tiles are done
         (units[3 + t]), stream the H rows of the token's K routed experts' down weights in one pipelined
         loop, and the shared expert's, weight each product by its slot's routing weight (the shared gate)
         and store the sum in fp32 slot order: deterministic, no float atomics.
    A gate_up tile stores its activation tile (act[row], rows as the other paths number them) and counts
    itself done (units[3 + t], release). FUSED instead multiplies it by the matching column slice of its
    expert's down weight for every h and adds the weighted product into acc[T, H] (fp32 atomics, zeroed by
    the router kernel), as experts_kernel does; the last gate_up tile to finish (ticket units[2]) casts acc
    into the output (the last bits vary from run to run).
    """
    pdl_prologue(PDL)  # programmatic dependent launch (plan.PDL_MODES)
    NTI: tl.constexpr = (I + BN - 1) // BN
    NTS: tl.constexpr = (IS + BN - 1) // BN if HAS_SHARED else 0
    GU: tl.constexpr = NTS + K * NTI  # gate_up tiles per token
    NTH: tl.constexpr = (H + BH - 1) // BH
    out_ty = x_ptr.dtype.element_ty
    unit = tl.atomic_add(units_ptr, 1, sem="relaxed", scope="gpu")
    rows = tl.arange(0, BM)
    row_ok = rows < 1  # one token row per unit, padded to the tensor cores' BM
    kcols = tl.arange(0, K_PAD)
    if unit == 0:
        for t0 in range(0, T, RT):
            route_rows(
                T, t0, logits_ws_ptr, router_b_ptr, logits_out_ptr, gate_part_ptr, gate_ws_ptr, corr_bias_ptr,
                topk_ids_ptr, topk_w_ptr, E, K, SCORING_SIGMOID, TOPK_BEFORE, NORM_TOPK, N_GROUP, TOPK_GROUP,
                SCALE, HAS_CORR_BIAS, HAS_ROUTER_BIAS, HAS_SHARED, HAS_SHARED_GATE, OUT_LOGITS, SPLIT, RT, E_PAD,
                K_PAD, G_PAD,
            )  # fmt: skip
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(units_ptr + 1, 1, sem="release", scope="gpu")
    elif unit < 1 + T * GU:
        is_shared = unit < 1 + T * NTS
        if is_shared:
            t = (unit - 1) // NTS
            pid_n = (unit - 1) % NTS
            e = E
            row = T * K + t
            n_cols = IS
            weight = _shared_gate(gate_part_ptr, t, T, HAS_SHARED_GATE, SPLIT)
        else:
            v = unit - 1 - T * NTS
            t = v // (K * NTI)
            j = (v % (K * NTI)) // NTI
            pid_n = v % NTI
            row = t * K + j
            n_cols = I
            _wait_until(units_ptr + 1, 1)
            e = tl.load(topk_ids_ptr + row, volatile=True)
            weight = tl.load(topk_w_ptr + row, volatile=True)
        token = t + rows * 0
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < n_cols
        if WFMT == 0:
            # one K loop for routed and shared rows, the base chosen before it (as gate_up_kernel does): a
            # runtime branch inside a loop keeps its loads out of the software pipeline
            if is_shared:
                w_base = shared_w_gu_ptr
            else:
                w_base = w_gu_ptr + e.to(tl.int64) * (2 * I * H)
            acc_g, acc_u = _gate_up_sums(
                x_ptr, w_base, token, row_ok, n, n_ok, n_cols, 0, H, H, IEEE, BM, BN, BK, w_base, w_base, 0, 0, 0,
                0, 0, 0, x_ptr, x_ptr, 0, 0,
            )  # fmt: skip
        elif is_shared:  # the shared expert is always native
            acc_g, acc_u = _gate_up_sums(
                x_ptr, shared_w_gu_ptr, token, row_ok, n, n_ok, IS, 0, H, H, IEEE, BM, BN, BK, shared_w_gu_ptr,
                shared_w_gu_ptr, 0, 0, 0, 0, 0, 0, x_ptr, x_ptr, 0, 0,
            )  # fmt: skip
        else:
            codes, scales, zeros = expert_tables(
                w_gu_ptr, w_gu_scale_ptr, w_gu_zero_ptr, e, 2 * I, H, WFMT, WB
            )
            acc_g, acc_u = _gate_up_sums(
                x_ptr, codes, token, row_ok, n, n_ok, I, 0, H, H, IEEE, BM, BN, BK, scales, zeros, WFMT, WB,
                HAS_ZERO, FP8_CVT, PER_WEIGHT, ACT_FP8, x_ptr, x_ptr, 0, 0,
            )  # fmt: skip
        act = _gate_up_finish(
            acc_g, acc_u, b_gu_ptr, e, is_shared, n, n_ok, I, ACTIVATION, ALPHA, LIMIT, HAS_BIAS
        )
        if FUSED:
            # the activation rounded to the input dtype, as the other paths store it
            a = tl.where(n_ok[None, :], act, 0.0).to(out_ty)
            # the down weight's base chosen before the h loop (no runtime branch inside it: pipelined loads)
            if WFMT == 0:
                if is_shared:
                    wd_base = shared_w_down_ptr
                else:
                    wd_base = w_down_ptr + e.to(tl.int64) * (H * I)
                _add_down_products(
                    a, wd_base, wd_base, wd_base, n_cols, e, weight, acc_ptr, b_down_ptr, token, row_ok, n, n_ok,
                    pid_n, E, H, IEEE, BH, BN, HAS_BIAS, 0, 1, 0, 0, 0, out_ty,
                )  # fmt: skip
            elif is_shared:
                _add_down_products(
                    a, shared_w_down_ptr, shared_w_down_ptr, shared_w_down_ptr, IS, e, weight, acc_ptr, b_down_ptr,
                    token, row_ok, n, n_ok, pid_n, E, H, IEEE, BH, BN, 0, 0, 1, 0, 0, 0, out_ty,
                )  # fmt: skip
            else:
                codes, scales, zeros = expert_tables(
                    w_down_ptr, w_down_scale_ptr, w_down_zero_ptr, e, H, I, WFMT, WB
                )
                _add_down_products(
                    a, codes, scales, zeros, I, e, weight, acc_ptr, b_down_ptr, token, row_ok, n, n_ok, pid_n, E, H,
                    IEEE, BH, BN, HAS_BIAS, WFMT, WB, HAS_ZERO, FP8_CVT, PER_WEIGHT, out_ty,
                )  # fmt: skip
            _cast_sum_when_last(acc_ptr, out_ptr, units_ptr + 2, T * GU, T, H, BH * BM)
        else:
            tl.store(
                act_ptr + (row + rows * 0)[:, None] * NMAX + n[None, :],
                act.to(act_ptr.dtype.element_ty),
                mask=row_ok[:, None] & n_ok[None, :],
            )
            tl.debug_barrier()  # every thread's stores before the release
            tl.atomic_add(units_ptr + 3 + t, 1, sem="release", scope="gpu")
    elif not FUSED and unit < 1 + T * GU + T * NTH:
        t = (unit - 1 - T * GU) // NTH
        pid_h = (unit - 1 - T * GU) % NTH
        h = pid_h * BH + tl.arange(0, BH)
        h_ok = h < H
        _wait_until(units_ptr + 3 + t, GU)
        slot_ok = kcols[None, :] < K
        ids = tl.load(topk_ids_ptr + t * K + kcols[None, :], mask=slot_ok, other=0, volatile=True)
        wts = tl.load(topk_w_ptr + t * K + kcols[None, :], mask=slot_ok, other=0.0, volatile=True)
        y = _routed_down_sums(
            act_ptr, w_down_ptr, w_down_scale_ptr, w_down_zero_ptr, b_down_ptr, ids, wts, t, rows, row_ok, h,
            h_ok, kcols, K, H, I, NMAX, HAS_BIAS, IEEE, BM, BH, BKD, WFMT, WB, HAS_ZERO, FP8_CVT, PER_WEIGHT,
            ACT_FP8,
        )  # fmt: skip
        if HAS_SHARED:
            gate = _shared_gate(gate_part_ptr, t, T, HAS_SHARED_GATE, SPLIT)
            shared_rows = T * K + t + rows * 0
            ys = tl.zeros((BM, BH), dtype=tl.float32)
            for k0 in range(0, IS, BKD):
                ks = k0 + tl.arange(0, BKD)
                k_ok = ks < IS
                a = tl.load(
                    act_ptr + shared_rows[:, None] * NMAX + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                w = tl.load(
                    shared_w_down_ptr + h[None, :] * IS + ks[:, None],
                    mask=k_ok[:, None] & h_ok[None, :],
                    other=0.0,
                )
                ys = dot_acc(a, w, ys, IEEE)
            y += gate * ys
        tl.store(
            out_ptr + (t + rows * 0)[:, None] * H + h[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & h_ok[None, :],
        )


@triton.jit
def _wait_until(counter_ptr, target):
    """Spin until a counter of this launch reaches `target` (acquire: what its writers released is visible),
    then bring every thread of the program past it."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _shared_gate(gate_part_ptr, t, T, HAS_SHARED_GATE: tl.constexpr, SPLIT: tl.constexpr):
    """Token t's shared-expert gate: sigmoid of the router kernel's SPLIT partial dot products, or 1."""
    if HAS_SHARED_GATE:
        g_acc = 0.0
        for sl in tl.static_range(SPLIT):
            g_acc += tl.load(gate_part_ptr + sl * T + t)
        gate = tl.sigmoid(g_acc)
    else:
        gate = tl.full((), 1.0, tl.float32)
    return gate


@triton.jit
def _add_down_products(
    a,
    codes,
    scales,
    zeros,
    n_cols,
    e,
    weight,
    acc_ptr,
    b_down_ptr,
    token,
    row_ok,
    n,
    n_ok,
    pid_n,
    E: tl.constexpr,
    H: tl.constexpr,
    IEEE: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    OUT: tl.constexpr,
):
    """acc[token, h] += weight * (a @ W_down[h, n].T (+ the routed expert's down bias, by its first N tile))
    for every h: one N tile of an expert's activation times the matching column slice of its down weight
    ([H, n_cols] at `codes`: native, or quantized codes with their scales and zero points), fp32 atomics."""
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        h_ok = h < H
        if WFMT == 0:
            wd = tl.load(
                codes + h[:, None] * n_cols + n[None, :], mask=h_ok[:, None] & n_ok[None, :], other=0.0
            )
            y = dot(a, tl.trans(wd), IEEE)
        elif scales_on_product(WFMT, WB, BN, PER_WEIGHT):
            y = _quantized_product(
                a, codes, zeros, scales, h, h_ok, pid_n * BN, n_cols, BH, BN, WFMT, WB, HAS_ZERO, FP8_CVT, 0, IEEE,
                OUT,
            )  # fmt: skip
        else:
            w = weight_tile(
                codes, scales, zeros, h, h_ok, pid_n * BN, n_cols, BH, BN, WFMT, WB, HAS_ZERO, OUT
            )
            y = dot(a, tl.trans(w), IEEE)
        if HAS_BIAS:  # routed experts only (e < E), once per slot: by its first N tile
            bias_ok = h_ok & (pid_n == 0) & (e < E)
            y += tl.load(b_down_ptr + e * H + h, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(
            acc_ptr + token[:, None] * H + h[None, :],
            y * weight,
            mask=row_ok[:, None] & h_ok[None, :],
            sem="relaxed",
            scope="gpu",
        )


@triton.jit
def _routed_down_sums(
    act_ptr,
    w_down_ptr,
    w_down_scale_ptr,
    w_down_zero_ptr,
    b_down_ptr,
    ids,
    wts,
    t,
    rows,
    row_ok,
    h,
    h_ok,
    kcols,
    K: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,  # noqa: E741
    NMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    WFMT: tl.constexpr,
    WB: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8_CVT: tl.constexpr,
    PER_WEIGHT: tl.constexpr,
    ACT_FP8: tl.constexpr,
):
    """sum_j wts[j] * (act[t * K + j] @ W_down[ids[j]][h].T + bias) in fp32 over token t's K routed slots: one
    loop over (slot, reduction tile), so the weight loads of consecutive slots stay in one software pipeline.
    Activations are read through L2 (`.cg`): other programs of this launch wrote them."""
    KI: tl.constexpr = (I + BK - 1) // BK
    out_ty = act_ptr.dtype.element_ty
    SCALED: tl.constexpr = scales_on_product(WFMT, WB, BK, PER_WEIGHT)
    y = tl.zeros((BM, BH), dtype=tl.float32)
    for it in range(0, K * KI):
        j = it // KI
        k0 = (it % KI) * BK
        e = _pick(ids, kcols, j)
        weight = _pick(wts, kcols, j)
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < I
        slot_rows = t * K + j + rows * 0
        a = tl.load(
            act_ptr + slot_rows[:, None] * NMAX + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        if WFMT == 0:
            w = tl.load(
                w_down_ptr + e.to(tl.int64) * (H * I) + h[None, :] * I + ks[:, None],
                mask=k_ok[:, None] & h_ok[None, :],
                other=0.0,
            )
            y += dot(a, w, IEEE) * weight
        else:
            codes, scales, zeros = expert_tables(
                w_down_ptr, w_down_scale_ptr, w_down_zero_ptr, e, H, I, WFMT, WB
            )
            if SCALED:
                y += weight * _quantized_product(
                    a, codes, zeros, scales, h, h_ok, k0, I, BH, BK, WFMT, WB, HAS_ZERO, FP8_CVT, ACT_FP8, IEEE,
                    out_ty,
                )  # fmt: skip
            else:
                w = tl.trans(
                    weight_tile(codes, scales, zeros, h, h_ok, k0, I, BH, BK, WFMT, WB, HAS_ZERO, out_ty)
                )
                y += dot(a, w, IEEE) * weight
    if HAS_BIAS:
        for j in tl.static_range(K):
            e = _pick(ids, kcols, j)
            bias = tl.load(b_down_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)
            y += _pick(wts, kcols, j) * bias[None, :]
    return y


KERNELS = {
    "router": router_logits_kernel,
    "router_topk": router_topk_kernel,
    "topk": topk_kernel,
    "align": align_kernel,
    "gate_up": gate_up_kernel,
    "down_rows": down_rows_kernel,
    "reduce": reduce_kernel,
    "experts": experts_kernel,
    "routed_experts": routed_experts_kernel,
    **DECODE_KERNELS,
}
