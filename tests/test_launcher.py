"""plan.py: launch plans and workspace layouts (the native planner is compared with it in test_native_launcher.py)."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
from moetrt_testing.planning_bundles import EVERY_OPTION as FULL

from moetrt.kernels import configs as tuning
from moetrt.kernels import plan
from moetrt.op.spec import MoEAttributes

PLAIN = MoEAttributes(8, 2, 64, 48)


def test_param_lists_match_the_triton_signatures() -> None:
    """KERNEL_PARAMS (what the launcher packs) = each kernel's non-constexpr parameters, in order."""
    from moetrt.kernels.triton_moe import KERNELS

    assert set(KERNELS) == set(plan.KERNEL_PARAMS)
    for name, fn in KERNELS.items():
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        assert runtime == [n for n, _ in plan.KERNEL_PARAMS[name]], name


@pytest.mark.parametrize("attrs", [FULL, PLAIN], ids=["full", "plain"])
@pytest.mark.parametrize("num_tokens", [1, 16, 17, 64, 65, 512, 5000])
def test_launch_plan_and_workspace(attrs: MoEAttributes, num_tokens: int) -> None:
    dtype = "bfloat16"
    bound = plan.bucket_of(num_tokens)
    cfg = tuning.default_config(attrs, dtype, bound)
    variants = plan.bucket_variants(attrs, dtype, bound, cfg)
    layout = plan.workspace_layout(attrs, dtype, num_tokens, cfg, bound)
    ops = plan.launch_sequence(attrs, dtype, num_tokens, variants, cfg, bound)
    stages = [op.stage for op in ops]
    if plan.is_gemv(cfg, bound):
        assert stages == ["router", "topk_group", "gemv_gate_up", "gemv_down"]
    elif plan.is_decode(bound):
        assert stages == ["router", "topk", "gate_up", "down_rows"]
    else:
        assert stages == ["router", "topk", "align", "gate_up", "down_rows", "reduce"]
    # regions: inside the total, aligned, disjoint; the zeroed span is counts..acc
    regions = sorted((r.offset, r.offset + r.nbytes, name) for name, r in layout.items() if name != "total")
    for (_lo, hi, name), (next_lo, _, _) in itertools.pairwise(regions):
        assert hi <= next_lo, f"{name} overlaps the next region"
    assert regions[-1][1] <= layout["total"].nbytes and layout["total"].nbytes % 256 == 0
    for name, region in layout.items():
        assert region.offset % (16 if name in plan.COUNTER_REGIONS else 256) == 0, name
    router = ops[0]
    zero_words = int(
        dict(zip([n for n, _ in plan.KERNEL_PARAMS["router"]], router.args, strict=True))["zero_words"][1]
    )
    assert layout["counts"].offset == 0
    assert zero_words * 4 == layout["acc"].offset + layout["acc"].nbytes
    assert layout["tickets"].offset < layout["htickets"].offset <= layout["ngroups"].offset
    assert layout["ngroups"].offset + layout["ngroups"].nbytes <= layout["gu_tickets"].offset
    assert layout["gu_tickets"].offset + layout["gu_tickets"].nbytes <= layout["acc"].offset + 1
    for op in ops:
        assert len(op.args) == len(plan.KERNEL_PARAMS[variants[op.stage].kernel])
        assert all(g >= 1 for g in op.grid) and op.grid[0] < 2**31 and max(op.grid[1:]) < 65536
        for src, ref in op.args:
            if src == "ws":
                assert ref in layout
            if src == "in":
                assert ref in attrs.present_inputs()
            if src == "out":
                assert ref in attrs.present_outputs()


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 40])
def test_split_gate_up_plan(num_tokens: int) -> None:
    """gate_up.SK = 4 (decode): four programs per tile, a zeroed ticket per tile, fp32 partials per split."""
    bound = plan.bucket_of(num_tokens)
    cfg = tuning.default_config(FULL, "bfloat16", bound)
    cfg["gemv"]["enabled"] = 0
    cfg["gate_up"]["SK"] = 4
    variants = plan.bucket_variants(FULL, "bfloat16", bound, cfg)
    layout = plan.workspace_layout(FULL, "bfloat16", num_tokens, cfg, bound)
    ops = {op.stage: op for op in plan.launch_sequence(FULL, "bfloat16", num_tokens, variants, cfg, bound)}
    assert dict(variants["gate_up"].constexprs)["SK"] == 4
    tiles = plan._max_blocks(FULL, num_tokens, cfg["gate_up"]["BM"]) * plan.cdiv(
        plan._nmax(FULL), cfg["gate_up"]["BN"]
    )
    assert ops["gate_up"].grid == (tiles * 4, 1, 1)
    assert layout["gu_tickets"].nbytes == 4 * tiles
    assert (
        layout["gu_tickets"].offset + layout["gu_tickets"].nbytes
        <= layout["acc"].offset + layout["acc"].nbytes
    )
    rows = num_tokens * FULL.top_k + num_tokens
    assert layout["gu_part"].nbytes == 4 * 4 * rows * 2 * plan._nmax(FULL)
    # prefill buckets and the fused path never split
    assert plan.gate_up_splits(cfg, None) == 1
    assert plan.gate_up_splits({**cfg, "fused": {"enabled": 1, "BH": 64}}, bound) == 1


def test_no_tokens_no_launches() -> None:
    cfg = tuning.default_config(PLAIN, "float32", 16)
    variants = plan.bucket_variants(PLAIN, "float32", 16, cfg)
    assert plan.launch_sequence(PLAIN, "float32", 0, variants, cfg, 16) == []
    with pytest.raises(ValueError, match="do not fit"):
        plan.launch_sequence(PLAIN, "float32", 17, variants, cfg, 16)


def test_bucket_choice() -> None:
    assert plan.bucket_of(1) == 1 and plan.bucket_of(2) == 16 and plan.bucket_of(16) == 16
    assert plan.bucket_of(17) == 64 and plan.bucket_of(1, (16, None)) == 16
    assert plan.bucket_of(65) == 512 and plan.bucket_of(513) is None
    assert plan.bucket_of(40, (16, None)) is None
    with pytest.raises(ValueError, match="no bucket"):
        plan.bucket_of(40, (16,))


def test_launcher_imports_neither_torch_nor_triton() -> None:
    code = (
        "import sys, moetrt.kernels.launcher; "
        "bad = [m for m in ('torch', 'triton') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fused_decode_plan() -> None:
    """With `fused` in the config, decode runs router · top-k · experts (whose last program casts the sum: no
    finalize launch); the accumulator and the experts kernel's ticket are zeroed."""
    attrs, dtype, t = FULL, "bfloat16", 5
    cfg = tuning.default_config(attrs, dtype, 16)
    cfg["fused"] = {"enabled": 1, "BH": 64}
    variants = plan.bucket_variants(attrs, dtype, 16, cfg)
    layout = plan.workspace_layout(attrs, dtype, t, cfg, 16)
    ops = plan.launch_sequence(attrs, dtype, t, variants, cfg, 16)
    assert [op.stage for op in ops] == ["router", "topk", "experts"]
    assert dict(zip([n for n, _ in plan.KERNEL_PARAMS["experts"]], ops[2].args, strict=True))[
        "tickets_ptr"
    ] == (
        "ws",
        "tickets",
    )
    assert layout["acc"].nbytes == 4 * t * attrs.hidden_size
    assert layout["tickets"].offset + 8 <= layout["acc"].offset  # its second word, inside the zeroed span
    assert layout["act"].nbytes == 0 and layout["yw"].nbytes == 0
    zero_words = int(ops[0].args[[n for n, _ in plan.KERNEL_PARAMS["router"]].index("zero_words")][1])
    assert zero_words * 4 == layout["acc"].offset + layout["acc"].nbytes
    # prefill ignores the flag
    prefill = plan.bucket_variants(
        attrs, dtype, None, {**tuning.default_config(attrs, dtype, None), "fused": {"enabled": 1, "BH": 64}}
    )
    assert "experts" not in prefill and "reduce" in prefill
    # quantized experts: the config table never enables it, and a hand-made config is refused with the reason
    int4 = dataclasses.replace(attrs, weight_format="int4", weight_block=16)
    assert tuning.select_config(int4, dtype, 90, 16)["fused"]["enabled"] == 0
    with pytest.raises(ValueError, match="takes native weights"):
        plan.bucket_variants(
            int4, dtype, 16, {**tuning.default_config(int4, dtype, 16), "fused": cfg["fused"]}
        )


@pytest.mark.parametrize("fused", [0, 1])
def test_routed_decode_plan(fused: int) -> None:
    """With `routed` in the config, T <= 16 runs router · routed_experts: one routing program, one per gate_up
    N tile of each token's slots and shared expert, plus (unfused) one per H tile; the unit counters (and the fused
    form's accumulator) lie in the span the router kernel zeroes; larger buckets ignore the switch."""
    attrs, dtype, t = FULL, "bfloat16", 5
    cfg = tuning.default_config(attrs, dtype, 16)
    cfg["routed"].update({"enabled": 1, "fused": fused, "BN": 32, "BH": 16})
    variants = plan.bucket_variants(attrs, dtype, 16, cfg)
    layout = plan.workspace_layout(attrs, dtype, t, cfg, 16)
    ops = plan.launch_sequence(attrs, dtype, t, variants, cfg, 16)
    assert [op.stage for op in ops] == ["router", "routed_experts"]
    n_tiles = -(-attrs.shared_intermediate_size // 32) + attrs.top_k * -(-attrs.intermediate_size // 32)
    h_tiles = 0 if fused else -(-attrs.hidden_size // 16)
    assert ops[1].grid == (1 + t * (n_tiles + h_tiles), 1, 1)  # the routing unit first
    assert layout["units"].nbytes == 4 * (3 + t) and layout["yw"].nbytes == 0
    assert layout["acc"].nbytes == (4 * t * attrs.hidden_size if fused else 0)
    zero_words = int(ops[0].args[[n for n, _ in plan.KERNEL_PARAMS["router"]].index("zero_words")][1])
    assert layout["units"].offset + layout["units"].nbytes <= zero_words * 4
    assert zero_words * 4 == layout["acc"].offset + layout["acc"].nbytes
    assert dict(variants["routed_experts"].constexprs)["FUSED"] == fused
    assert "routed_experts" not in plan.bucket_variants(attrs, dtype, 64, {**cfg})


def test_decode_path_names_the_path_a_bucket_runs() -> None:
    """routed over gemv over fused over sorted at decode; prefill buckets ignore the switches."""
    cfg = tuning.default_config(FULL, "bfloat16", 16)
    assert plan.decode_path(cfg, 16) == "sorted"
    cfg["fused"] = {"enabled": 1, "BH": 64}
    assert plan.decode_path(cfg, 16) == "fused"
    cfg["gemv"]["enabled"] = 1
    assert plan.decode_path(cfg, 16) == "gemv"
    cfg["routed"]["enabled"] = 1
    assert plan.decode_path(cfg, 16) == "routed" and plan.decode_path(cfg, 1) == "routed"
    assert plan.decode_path(cfg, 64) == "fused"  # above the routed and gemv bound
    assert plan.decode_path(cfg, None) == "prefill"


def test_routed_fused_form_is_off_with_fp8_activations() -> None:
    """fp8 activations are quantized per weight block, wider than the fused form's N tile: H-tile units."""
    attrs = MoEAttributes(
        8, 2, 256, 256, weight_format="fp8_block", weight_block=128, activation_format="fp8_block"
    )
    cfg = tuning.default_config(attrs, "bfloat16", 1)
    cfg["routed"].update({"enabled": 1, "fused": 1})
    assert not plan.routed_fused(attrs, cfg)
    assert dict(plan.bucket_variants(attrs, "bfloat16", 1, cfg)["routed_experts"].constexprs)["FUSED"] == 0
    assert all(not c["routed"]["fused"] for c in tuning.routed_candidates(attrs, cfg, "bfloat16"))


def test_fp8_activations_are_quantized_once_on_the_sorted_path() -> None:
    """fp8 activations on the sorted path: the router kernel quantizes x (ACT_FP8, one weight block per scale)
    and gate_up's N tile is one weight block, whatever the config says, so it quantizes whole blocks of its
    activation; on the routed path the router does not (the routed kernel quantizes in registers)."""
    attrs = MoEAttributes(
        8, 2, 256, 256, weight_format="fp8_block", weight_block=128, activation_format="fp8_block"
    )
    for bound in (1, 64, None):
        cfg = tuning.default_config(attrs, "bfloat16", bound)
        cfg["gate_up"]["BN"] = 32
        variants = plan.bucket_variants(attrs, "bfloat16", bound, cfg)
        router = dict(variants["router"].constexprs)
        gate_up = dict(variants["gate_up"].constexprs)
        # 2 weight blocks of H over the router's SPLIT slices: one column of quantizing programs, or two
        assert (router["ACT_FP8"], router["WB"]) == (1, 128)
        assert router["QCOLS"] == plan.cdiv(2, cfg["router"]["SPLIT"]) >= 1
        assert (gate_up["ACT_FP8"], gate_up["BN"], gate_up["BK"]) == (1, 128, 128)
        assert dict(variants["down_rows"].constexprs)["ACT_FP8"] == 1
    cfg = tuning.default_config(attrs, "bfloat16", 1)
    cfg["routed"]["enabled"] = 1
    assert dict(plan.bucket_variants(attrs, "bfloat16", 1, cfg)["router"].constexprs)["ACT_FP8"] == 0
    native = MoEAttributes(8, 2, 256, 256)
    router = dict(
        plan.bucket_variants(native, "bfloat16", None, tuning.default_config(native, "bfloat16", None))[
            "router"
        ].constexprs
    )
    assert router["ACT_FP8"] == 0 and router["QCOLS"] == 0


def test_routed_fused_form_needs_wide_4bit_slices() -> None:
    """4-bit down slices narrower than 32 codes are not run in the fused form (wrong on the H200)."""
    attrs = MoEAttributes(8, 2, 256, 256, weight_format="int4", weight_block=128)
    cfg = tuning.default_config(attrs, "bfloat16", 1)
    cfg["routed"].update({"enabled": 1, "fused": 1, "BN": 16})
    assert not plan.routed_fused(attrs, cfg)
    cfg["routed"]["BN"] = 32
    assert plan.routed_fused(attrs, cfg)
    fused = [c["routed"] for c in tuning.routed_candidates(attrs, cfg, "bfloat16") if c["routed"]["fused"]]
    assert fused and all(c["BN"] >= plan.ROUTED_FUSED_MIN_4BIT_TILE for c in fused)


def test_quantized_tiles_narrow_to_one_scale_group_alike() -> None:
    """The default tiles and the routed candidates narrow quantized reduction tiles by one rule
    (configs.scale_group_tile): to the group where its scales can multiply a tile's product, else not at all."""
    assert tuning.scale_group_tile(PLAIN) == 0
    wide = MoEAttributes(8, 2, 256, 256, weight_format="int4", weight_block=64)
    odd = MoEAttributes(8, 2, 192, 192, weight_format="int4", weight_block=48)  # 16 | 48: below 4-bit's 32
    assert tuning.scale_group_tile(wide) == 64 and tuning.scale_group_tile(odd) == 0
    for attrs, tile, candidate_tiles in ((wide, 64, {64}), (odd, 128, {64, 128, 256})):
        cfg = tuning.default_config(attrs, "bfloat16", 1)
        assert cfg["gate_up"]["BK"] == cfg["routed"]["BK"] == cfg["routed"]["BKD"] == tile
        unfused = [
            c["routed"] for c in tuning.routed_candidates(attrs, cfg, "bfloat16") if not c["routed"]["fused"]
        ]
        assert {c["BK"] for c in unfused} | {c["BKD"] for c in unfused} == candidate_tiles


def test_quantized_prefill_default_takes_the_tuned_tiles() -> None:
    """The unbounded bucket's default gate_up of weight-only quantized experts (16-bit kernels) is the tile set
    every tuned H200 entry chose, dequantized per weight; decode buckets, fp8 activations, float32 and native
    experts keep their own defaults."""
    from moetrt.op.presets import like

    for fmt, block in (("fp8_block", 128), ("int4", 128), ("mxfp4", 32)):
        attrs = like("qwen3_30b", 8, 2, 256, 256, weight_format=fmt, weight_block=block)
        cfg = tuning.default_config(attrs, "bfloat16", None, 90)
        assert {
            k: cfg["gate_up"][k] for k in tuning.QUANTIZED_PREFILL_GATE_UP
        } == tuning.QUANTIZED_PREFILL_GATE_UP
        assert cfg["dequant"]["per_weight"] == 1
        assert cfg["down"]["BK"] == min(64, block)  # down's tiles keep the group rule
        assert tuning.default_config(attrs, "bfloat16", None, 100)["gate_up"] == cfg["gate_up"]
        # a shape without entries of its own gets them through the table lookup of that SM
        assert tuning.select_config(attrs, "bfloat16", 90, None)["gate_up"] == cfg["gate_up"]
        # SMs with per-warp mma (where these tiles spill), no SM given, decode, mid-size buckets, float32
        for dtype, bound, sm in (
            ("bfloat16", None, 80),
            ("bfloat16", None, 89),
            ("bfloat16", None, 120),
            ("bfloat16", None, None),
            ("bfloat16", 512, 90),
            ("bfloat16", 16, 90),
            ("float32", None, 90),
        ):
            other = tuning.default_config(attrs, dtype, bound, sm)
            assert other["dequant"]["per_weight"] == 0 and other["gate_up"]["BM"] < 128, (
                fmt,
                dtype,
                bound,
                sm,
            )
    a8 = like(
        "qwen3_30b",
        8,
        2,
        256,
        256,
        weight_format="fp8_block",
        weight_block=128,
        activation_format="fp8_block",
    )
    assert tuning.default_config(a8, "bfloat16", None, 90)["dequant"]["per_weight"] == 0
    assert tuning.default_config(PLAIN, "bfloat16", None, 90)["gate_up"]["BM"] == 64


def test_wide_decode_blocks_only_for_few_experts() -> None:
    """Decode candidates with 32- and 64-row expert blocks where an expert averages a full 16-row block at the
    bucket's largest T (Mixtral's T <= 64 bucket), and nowhere else (they would only cost tuning time)."""
    from moetrt.op.presets import PRESETS

    mixtral, qwen = PRESETS["mixtral"], PRESETS["qwen3_next"]
    assert tuning.wide_decode_blocks(mixtral, 64)
    assert not tuning.wide_decode_blocks(mixtral, 16) and not tuning.wide_decode_blocks(mixtral, 512)
    assert not any(tuning.wide_decode_blocks(qwen, bound) for bound in plan.BUCKETS)

    def block_rows(attrs: MoEAttributes, bound: int) -> set[int]:
        return {c["gate_up"]["BM"] for c in tuning.candidate_configs(attrs, "bfloat16", bound)}

    assert block_rows(mixtral, 64) == {16, 32, 64}
    assert block_rows(mixtral, 16) == block_rows(qwen, 64) == {16}


def test_pdl_flag_reaches_every_launch() -> None:
    cfg = tuning.default_config(FULL, "float16", None)
    assert not any(
        op.pdl
        for op in plan.launch_sequence(
            FULL, "float16", 100, plan.bucket_variants(FULL, "float16", None, cfg), cfg, None
        )
    )
    for mode in (1, 2):  # the next kernel launched at once, or as the programs exit: both launch with PDL
        cfg["pdl"] = {"enabled": mode}
        variants = plan.bucket_variants(FULL, "float16", None, cfg)
        ops = plan.launch_sequence(FULL, "float16", 100, variants, cfg, None)
        assert ops and all(op.pdl for op in ops)
        assert all(dict(v.constexprs)["PDL"] == mode for v in variants.values())


@pytest.mark.parametrize("path", ["sorted", "fused", "gemv"])
def test_workspace_grows_with_tokens_within_a_bucket(path: str) -> None:
    """The plugin sizes its workspace at each bucket's upper bound: that must cover every T of the bucket."""
    for bound in plan.BUCKETS:
        cfg = tuning.default_config(FULL, "bfloat16", bound)
        cfg["fused"] = {"enabled": int(path == "fused"), "BH": 64}
        cfg["gemv"]["enabled"] = int(path == "gemv")
        lo = {1: 1, 16: 2, 64: 17, 512: 65, None: 513}[bound]
        hi = bound or 3000
        sizes = [
            plan.workspace_layout(FULL, "bfloat16", t, cfg, bound)["total"].nbytes
            for t in range(lo, hi + 1, 7)
        ]
        assert sizes == sorted(sizes), bound


def test_grouped_blocks_only_where_weight_tiles_are_many() -> None:
    """Prefill candidates with row blocks grouped per weight tile (gate_up.GM) for Mixtral's 112 column tiles,
    none at decode nor for shapes whose few tiles the L2 serves already (they would only cost tuning time)."""
    from moetrt.op.presets import PRESETS

    def groups(name: str, bound: int | None) -> set[int]:
        cands = tuning.candidate_configs(PRESETS[name], "bfloat16", bound)
        return {c["gate_up"].get("GM", 1) for c in cands}

    assert groups("mixtral", 512) == groups("mixtral", None) == {1, *tuning.GROUP_OPTIONS}
    assert groups("mixtral", 64) == {1}
    for name in ("qwen3_next", "qwen3_30b", "deepseek_v3", "gpt_oss_20b"):
        assert groups(name, None) == {1}, name
