"""TMA grouped GEMMs (`gate_up.TMA`, `down.TMA`): where plan.uses_tma allows them, what the planner reserves for
their device-built descriptors, what the AOT step checks, and the tuner's round (the kernels themselves run
in test_kernels.py's "tma" cases; the C++ planner's twin in test_native_launcher.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from moetrt.core.errors import MoetrtError
from moetrt.kernels import aot, configs, plan
from moetrt.op.presets import PRESETS
from moetrt.op.spec import MoEAttributes
from moetrt.tune import tuner

MIXTRAL = PRESETS["mixtral"]


def _asking(attrs: MoEAttributes, dtype: str, bound: int | None, **down: int) -> dict:
    cfg = configs.default_config(attrs, dtype, bound)
    cfg["gemv"]["enabled"] = 0
    cfg["gate_up"]["TMA"] = cfg["down"]["TMA"] = 1
    cfg["down"].update(down)
    return cfg


def _both(attrs: MoEAttributes, dtype: str, cfg: dict, bound: int | None) -> tuple[bool, bool]:
    return tuple(plan.uses_tma(attrs, dtype, cfg, bound, stage) for stage in ("gate_up", "down_rows"))  # type: ignore[return-value]


def test_tma_only_where_the_config_asks_and_the_tiles_allow() -> None:
    assert _both(MIXTRAL, "bfloat16", _asking(MIXTRAL, "bfloat16", None), None) == (True, True)
    assert _both(MIXTRAL, "bfloat16", configs.default_config(MIXTRAL, "bfloat16", None), None) == (
        False,
        False,
    )
    # quantized codes and fp8 activations keep their pointer loads (their own decode loops)
    for variant in (
        dataclasses.replace(MIXTRAL, weight_format="fp8_block", weight_block=128),
        dataclasses.replace(MIXTRAL, weight_format="int4", weight_block=128),
    ):
        assert _both(variant, "bfloat16", _asking(variant, "bfloat16", None), None) == (False, False)
    # the decode paths without grouped GEMMs: fused experts kernel, routed path
    fused = _asking(MIXTRAL, "bfloat16", 16)
    fused["fused"]["enabled"] = 1
    assert _both(MIXTRAL, "bfloat16", fused, 16) == (False, False)
    # the sorted decode path runs the grouped GEMMs: allowed there
    assert _both(MIXTRAL, "bfloat16", _asking(MIXTRAL, "bfloat16", 16), 16) == (True, True)


def test_tma_refused_where_rows_or_reduction_tiles_do_not_fit() -> None:
    # H = 36 in fp16: gate_up's weight rows are 72 bytes, not a multiple of 16 (TMA's stride rule); down's
    # weight rows and act's are I = 32 wide
    odd_rows = MoEAttributes(8, 2, 36, 32)
    assert _both(odd_rows, "float16", _asking(odd_rows, "float16", None, BK=16), None) == (False, True)
    # I = 48 is no whole number of 32-wide down tiles: down would read act columns past the expert's
    partial = MoEAttributes(8, 2, 64, 48)
    assert _both(partial, "bfloat16", _asking(partial, "bfloat16", None, BK=32), None) == (True, False)
    assert _both(partial, "bfloat16", _asking(partial, "bfloat16", None, BK=16), None) == (True, True)
    # the shared expert's width counts too
    shared = MoEAttributes(8, 2, 64, 32, shared_intermediate_size=40)
    assert _both(shared, "bfloat16", _asking(shared, "bfloat16", None, BK=16), None) == (True, False)


def test_scratch_region_holds_every_program_descriptors() -> None:
    cfg = _asking(MIXTRAL, "bfloat16", None)
    layout = plan.workspace_layout(MIXTRAL, "bfloat16", 4096, cfg, None)
    variants = plan.bucket_variants(MIXTRAL, "bfloat16", None, cfg)
    grids = {
        op.stage: op.grid[0] for op in plan.launch_sequence(MIXTRAL, "bfloat16", 4096, variants, cfg, None)
    }
    assert layout["tma_scratch"].nbytes == 128 * max(grids["gate_up"], 2 * grids["down_rows"])
    plain = configs.default_config(MIXTRAL, "bfloat16", None)
    assert plan.workspace_layout(MIXTRAL, "bfloat16", 4096, plain, None)["tma_scratch"].nbytes == 0


def test_aot_refuses_tma_before_sm90() -> None:
    cfg = _asking(MIXTRAL, "bfloat16", None)
    variant = plan.bucket_variants(MIXTRAL, "bfloat16", None, cfg)["gate_up"]
    with pytest.raises(MoetrtError, match="sm_80 does not have"):
        aot.compile_variant(variant, "bfloat16", 80)


def test_tuner_tries_tma_on_sm90_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    small = MoEAttributes(8, 2, 64, 32)
    for attrs, dtype in (
        (small, "float32"),
        (dataclasses.replace(small, weight_format="int4", weight_block=32), "bfloat16"),
    ):
        assert configs.tma_candidates(attrs, dtype, None, configs.default_config(attrs, dtype, None)) == []
    assert (
        len(configs.tma_candidates(small, "bfloat16", 16, configs.default_config(small, "bfloat16", 16))) == 2
    )
    base = configs.default_config(small, "bfloat16", None)
    tma, deeper = configs.tma_candidates(small, "bfloat16", None, copy.deepcopy(base))
    assert tma["gate_up"]["TMA"] == tma["down"]["TMA"] == deeper["gate_up"]["TMA"] == 1
    assert deeper["gate_up"]["num_stages"] == base["gate_up"]["num_stages"] + 1

    def faster_with_tma(cfg: dict, t: int) -> float:
        return 100.0 - 10 * cfg["gate_up"].get("TMA", 0) - cfg["gate_up"]["num_stages"]

    best = tuner.tune(small, "bfloat16", 90, faster_with_tma, tokens=(600,), out_path=tmp_path / "sm90.json")
    entry = best[configs.entry_key(small, "bfloat16", None)]
    assert entry["gate_up"]["TMA"] == entry["down"]["TMA"] == 1
    best = tuner.tune(small, "bfloat16", 89, faster_with_tma, tokens=(600,), out_path=tmp_path / "sm89.json")
    assert best[configs.entry_key(small, "bfloat16", None)]["gate_up"].get("TMA", 0) == 0


def test_persistent_programs_only_at_prefill_by_tma() -> None:
    """plan.persistent_programs: the config's PERSIST where the bucket is prefill and the stage loads by TMA;
    decode buckets and pointer loads keep one program per tile, and the grid is never wider than the tiles."""
    prefill = _asking(MIXTRAL, "bfloat16", None)
    prefill["gate_up"]["PERSIST"] = prefill["down"]["PERSIST"] = 132
    assert plan.persistent_programs(MIXTRAL, "bfloat16", prefill, None, "gate_up") == 132
    assert plan.persistent_programs(MIXTRAL, "bfloat16", prefill, None, "down_rows") == 132
    decode = _asking(MIXTRAL, "bfloat16", 64)
    decode["gate_up"]["PERSIST"] = decode["down"]["PERSIST"] = 132
    assert plan.persistent_programs(MIXTRAL, "bfloat16", decode, 64, "gate_up") == 0
    pointers = copy.deepcopy(prefill)
    pointers["gate_up"]["TMA"] = 0
    assert plan.persistent_programs(MIXTRAL, "bfloat16", pointers, None, "gate_up") == 0
    assert plan.persistent_programs(MIXTRAL, "bfloat16", pointers, None, "down_rows") == 132
    assert (
        plan.persistent_grid({"PERSIST": 132}, 40) == 40
        and plan.persistent_grid({"PERSIST": 132}, 4000) == 132
    )
    assert plan.persistent_grid({"PERSIST": 0}, 4000) == 4000
    # descriptors a program builds: one more (the shared expert's weight) only when persistent with one
    assert plan.tma_descriptors("down_rows", {"IS": 512, "PERSIST": 132}) == 3
    assert plan.tma_descriptors("down_rows", {"IS": 512, "PERSIST": 0}) == 2
    assert plan.tma_descriptors("gate_up", {"IS": 0, "PERSIST": 132}) == 1


def test_persistent_candidates_and_round(tmp_path) -> None:
    """The tuner's "persist" round: gate_up, down and both persistent, each also with grouped row blocks, only
    on prefill buckets that load by TMA and only with the GPU's SM count; the table's entry keeps PERSIST."""
    base = _asking(MIXTRAL, "bfloat16", None)
    cands = configs.persistent_candidates(MIXTRAL, "bfloat16", None, base, 132)
    persisted = {
        (
            c["gate_up"].get("PERSIST", 0),
            c["down"].get("PERSIST", 0),
            c["gate_up"].get("GM", 1),
            c["down"].get("GM", 1),
        )
        for c in cands
    }
    assert persisted == {
        (132, 0, 1, 1), (132, 0, 4, 1), (0, 132, 1, 1), (0, 132, 1, 4), (132, 132, 1, 1), (132, 132, 4, 4)
    }  # fmt: skip
    assert configs.persistent_candidates(MIXTRAL, "bfloat16", 64, _asking(MIXTRAL, "bfloat16", 64), 132) == []
    assert configs.persistent_candidates(MIXTRAL, "bfloat16", None, base, 0) == []
    plain = configs.default_config(MIXTRAL, "bfloat16", None)
    assert configs.persistent_candidates(MIXTRAL, "bfloat16", None, plain, 132) == []

    def fake(cfg: dict, t: int) -> float:  # persistent down only is the fastest
        return 100.0 - 10 * bool(cfg["down"].get("PERSIST")) + 5 * bool(cfg["gate_up"].get("PERSIST"))

    entry_key = configs.entry_key(MIXTRAL, "bfloat16", None)
    best = tuner.tune(
        MIXTRAL,
        "bfloat16",
        90,
        fake,
        tokens=(4096,),
        rounds=["tma", "persist"],
        sm_count=132,
        out_path=tmp_path / "sm90.json",
    )
    assert best[entry_key]["down"]["PERSIST"] == 132 and not best[entry_key]["gate_up"].get("PERSIST")
    assert tuner.rounds_to_run(MIXTRAL, ["persist"]) == ("persist",)


def test_persistent_grids_fit_the_device() -> None:
    """plan.device_grid: a persistent GEMM launches at most one program per SM of the GPU at hand (a table tuned
    on 132 SMs, run on 114), never more programs than planned; other grids as planned."""
    assert plan.device_grid((132, 1, 1), {"PERSIST": 132}, 114) == (114, 1, 1)
    assert plan.device_grid((40, 1, 1), {"PERSIST": 132}, 114) == (40, 1, 1)
    assert plan.device_grid((132, 1, 1), {"PERSIST": 132}, 144) == (132, 1, 1)
    assert plan.device_grid((5000, 1, 1), {"PERSIST": 0}, 114) == (5000, 1, 1)
    assert plan.device_grid((5000, 3, 1), {}, 114) == (5000, 3, 1)
