"""triton_moe.grouped_tile, run by Triton's CPU interpreter: over the grid the planners launch for gate_up and
down_rows (plan.grid_blocks row blocks x column tiles), every (row block, column tile) pair is taken by exactly
one program, consecutive programs of a group share the column tile, and GM = 1 is the block-major order the
kernels ran before grouping."""

from __future__ import annotations

import json
from typing import Any

import pytest
import triton
import triton.language as tl
from moetrt_testing.interpreter import run_in_interpreter

from moetrt.kernels import plan
from moetrt.kernels.configs import default_config
from moetrt.kernels.triton_moe import grouped_tile
from moetrt.op.spec import MoEAttributes

# (max row blocks, column tiles, GM of gate_up, GM of down)
CASES = [(7, 3, 1, 1), (7, 3, 4, 1), (10, 5, 3, 2), (1, 112, 8, 8), (16, 4, 16, 1), (5, 1, 2, 3)]


@pytest.fixture(scope="module")
def mapped() -> dict[str, Any]:
    return run_in_interpreter(__file__)


def _blocks(max_blocks: int, gm_gate_up: int, gm_down: int) -> int:
    cfg = default_config(MoEAttributes(8, 2, 64, 32), "bfloat16", None)
    cfg["gate_up"]["GM"], cfg["down"]["GM"] = gm_gate_up, gm_down
    return plan.grid_blocks(cfg, None, max_blocks)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("stage", ["gate_up", "down"])
def test_every_tile_once_in_groups(
    case: tuple[int, int, int, int], stage: str, mapped: dict[str, Any]
) -> None:
    max_blocks, nt, gm_gate_up, gm_down = case
    gm = gm_gate_up if stage == "gate_up" else gm_down
    blocks = _blocks(max_blocks, gm_gate_up, gm_down)
    assert (
        blocks % gm_gate_up == 0
        and blocks % gm_down == 0
        and max_blocks <= blocks < max_blocks + gm_gate_up * gm_down
    )
    pairs = [tuple(p) for p in mapped[f"{blocks},{nt},{gm}"]]
    assert len(pairs) == blocks * nt
    assert sorted(pairs) == [(b, n) for b in range(blocks) for n in range(nt)]  # each pair exactly once
    for start in range(0, len(pairs), gm):  # a group's programs share their column tile
        assert len({n for _, n in pairs[start : start + gm]}) == 1
    if gm == 1:
        assert pairs == [(b, n) for b in range(blocks) for n in range(nt)]


def test_paths_without_the_grouped_kernels_keep_their_grid() -> None:
    cfg = default_config(MoEAttributes(8, 2, 64, 32), "bfloat16", 16)
    cfg["gate_up"]["GM"] = 4
    cfg["fused"]["enabled"], cfg["gemv"]["enabled"], cfg["routed"]["enabled"] = 1, 0, 0
    assert plan.grid_blocks(cfg, 16, 7) == 7  # the experts kernel maps its own tiles
    cfg["fused"]["enabled"] = 0
    assert plan.grid_blocks(cfg, 16, 7) == 8


@triton.jit
def _tiles_kernel(out_ptr, NT: tl.constexpr, GM: tl.constexpr):
    pid = tl.program_id(0)
    b, n = grouped_tile(pid, NT, GM)
    tl.store(out_ptr + 2 * pid, b)
    tl.store(out_ptr + 2 * pid + 1, n)


def _child() -> None:
    import torch

    out: dict[str, Any] = {}
    for max_blocks, nt, gm_gate_up, gm_down in CASES:
        blocks = _blocks(max_blocks, gm_gate_up, gm_down)
        for gm in (gm_gate_up, gm_down):
            got = torch.full((blocks * nt, 2), -1, dtype=torch.int32)
            _tiles_kernel[(blocks * nt,)](got, NT=nt, GM=gm)
            out[f"{blocks},{nt},{gm}"] = got.tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    _child()
