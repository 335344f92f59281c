"""The one-program decode sort (`_align_in_registers`) writes exactly what the counting sort (`_align`) writes.

A small kernel takes the same routed slots through both under Triton's CPU interpreter: `_align` from
per-expert counts and slot ranks (given in slot order, so its rows come out in the same order as the
register sort's) and `_align_in_registers` from the expert ids alone. Block count, block table, each block's row
end (offsets[expert + 1], the only offsets the expert kernels read) and sorted rows must be equal element for
element, with and without a shared expert, for one token and for
several tokens that share experts (an expert with several rows, experts no token picked). The interpreter
runs in a child process, as in test_kernels.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import triton
import triton.language as tl
from moetrt_testing.interpreter import run_in_interpreter

from moetrt.kernels.triton_moe import _align, _align_in_registers

# (experts, top-k, tokens, shared expert, tokens per program): T <= RT <= BM, as the top-k kernel requires
CASES = [
    (12, 3, 1, False, 4),
    (12, 3, 4, True, 4),
    (8, 2, 13, True, 16),
    (512, 10, 1, True, 4),
    (512, 10, 3, False, 4),
    (16, 4, 16, False, 16),
    # 80 and 128 slots: past what the top-k kernel sorts this way (LOCAL_SORT_MAX_SLOTS: one program for
    # 2-8 tokens measured no faster on the H200), the sort itself still holds
    (512, 10, 8, True, 8),
    (128, 8, 16, True, 16),
]
BM = 16
CS = 256


def _case_id(case: tuple[object, ...]) -> str:
    e, k, t, shared, rt = case
    return f"E{e}-K{k}-T{t}{'-shared' if shared else ''}-RT{rt}"


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, list[int]]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_register_sort_equals_counting_sort(case: tuple[object, ...], results: dict[str, Any]) -> None:
    out = results[_case_id(case)]
    _e, k, t, _shared, _rt = case
    assert out["nblocks"] == out["expected_blocks"]  # the number of distinct experts (+ the shared one)
    for name in ("row_ends", "nblocks", "block_expert", "block_row0", "sorted_slot"):
        assert out[f"{name}_registers"] == out[f"{name}_counting"], name
    # and the counting sort's rows really are the slots grouped by expert
    rows = out["sorted_slot_counting"][: t * k]
    assert sorted(rows) == list(range(t * k))


@triton.jit
def _both_sorts_kernel(
    ids_ptr,
    counts_ptr,
    rank_ptr,
    offsets_a,
    nblocks_a,
    block_expert_a,
    block_row0_a,
    sorted_slot_a,
    offsets_b,
    nblocks_b,
    block_expert_b,
    block_row0_b,
    sorted_slot_b,
    T,
    block_iters,
    slot_iters,
    E: tl.constexpr,
    K: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    S: tl.constexpr,
    EP_PAD: tl.constexpr,
    BM: tl.constexpr,
    CS: tl.constexpr,
):
    _align_in_registers(
        T,
        ids_ptr,
        offsets_a,
        nblocks_a,
        block_expert_a,
        block_row0_a,
        sorted_slot_a,
        E,
        K,
        HAS_SHARED,
        S,
    )
    _align(
        0,
        1,
        T,
        block_iters,
        slot_iters,
        counts_ptr,
        ids_ptr,
        rank_ptr,
        offsets_b,
        nblocks_b,
        block_expert_b,
        block_row0_b,
        sorted_slot_b,
        E,
        K,
        BM,
        HAS_SHARED,
        EP_PAD,
        CS,
    )


def _child() -> None:
    import numpy as np
    import torch

    from moetrt.kernels.torch_ops import _interpreter_fixes

    _interpreter_fixes()

    def pow2(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        e, k, t, shared, rt = case
        gen = np.random.default_rng(7)
        # few distinct experts across tokens (so experts hold several rows), distinct within a token
        pool = gen.permutation(e)[: max(k, min(e, k + 2))]
        ids = np.stack([gen.permutation(pool)[:k] for _ in range(t)]).reshape(-1).astype(np.int32)
        counts = np.bincount(ids, minlength=e).astype(np.int32)
        rank = np.array([(ids[:s] == ids[s]).sum() for s in range(ids.size)], dtype=np.int32)
        n_exp = e + int(shared)
        rows = t * k + (t if shared else 0)

        sizes = (pow2(e + 2), 1, n_exp + 1, n_exp + 1, rows)  # offsets, nblocks, block table, sorted rows
        a, b = ([torch.full((n,), -1, dtype=torch.int32) for n in sizes] for _ in range(2))
        _both_sorts_kernel[(1,)](
            torch.from_numpy(ids),
            torch.from_numpy(counts),
            torch.from_numpy(rank),
            *a,
            *b,
            t,
            -(-t // BM),
            -(-(t * k) // CS),
            E=e,
            K=k,
            HAS_SHARED=int(shared),
            S=pow2(rt * k),
            EP_PAD=pow2(e + 2),
            BM=BM,
            CS=CS,
        )
        nb = int(b[1][0])
        result: dict[str, Any] = {"nblocks": nb, "expected_blocks": len(set(ids.tolist())) + int(shared)}
        for name, x, y in zip(
            ("offsets", "nblocks", "block_expert", "block_row0", "sorted_slot"), a, b, strict=True
        ):
            cut = {"nblocks": 1, "sorted_slot": rows}.get(name, nb)
            if name == "offsets":  # the expert kernels read a block's row end, offsets[expert + 1]
                name, x, y = "row_ends", x[b[2][:nb].long() + 1], y[b[2][:nb].long() + 1]
            result[f"{name}_registers"] = x[:cut].tolist()
            result[f"{name}_counting"] = y[:cut].tolist()
        out[_case_id(case)] = result
    print(json.dumps(out))


if __name__ == "__main__":
    _child()
