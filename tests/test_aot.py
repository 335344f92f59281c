"""Ahead-of-time compilation of the MoE kernels on a CPU machine, the bundle format and the config table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moetrt.cli import resolve_attrs
from moetrt.core.dtypes import KERNEL_NAMES
from moetrt.core.errors import MoetrtError
from moetrt.kernels import configs, plan
from moetrt.kernels.aot import (
    SUPPORTED_SMS,
    KernelBundle,
    compile_kernels,
    compile_variants,
    ptx_entry_params,
)
from moetrt.op.presets import PRESETS
from moetrt.op.spec import MoEAttributes
from moetrt.tune import tuner

SMALL = MoEAttributes(12, 3, 64, 48, norm_topk_prob=True, shared_intermediate_size=32, has_shared_gate=True)
ELF_MAGIC = b"\x7fELF"


@pytest.fixture(scope="module")
def sm90_bundle() -> KernelBundle:
    """Every bucket of a variant with a shared expert, compiled for sm_90 (what an H100 engine carries)."""
    return compile_kernels(SMALL, "bfloat16", 90, workers=2)


@pytest.mark.parametrize("sm", SUPPORTED_SMS)
def test_compiles_for_every_supported_sm(sm: int) -> None:
    bundle = compile_kernels(SMALL, "float16", sm, buckets=(16,))
    stages = bundle.buckets["16"]["variants"]
    assert set(stages) == {"router", "topk", "gate_up", "down_rows"}  # decode: align and reduce are fused
    for key in stages.values():
        kernel = bundle.kernels[key]
        assert kernel.cubin.startswith(ELF_MAGIC), f"{key} for sm_{sm} is not an ELF cubin"
        assert len(kernel.cubin) > 1000
        assert kernel.name.encode() in kernel.cubin  # the entry the launcher looks up by name
        assert kernel.num_warps in (1, 2, 4, 8, 16)
        assert 0 <= kernel.shared <= 227 * 1024
        assert list(kernel.param_types) == plan.param_types(kernel.key.rsplit("_", 1)[0], "float16")
    assert bundle.sm == sm


@pytest.mark.parametrize(
    ("sm", "weight_format", "block", "zero"),
    [(80, "fp8_block", 16, False), (90, "fp8_block", 16, False), (80, "int4", 16, True), (90, "int4", 32, False),
     (90, "mxfp4", 32, False), (120, "mxfp4", 32, False)],
)  # fmt: skip
def test_quantized_experts_compile(sm: int, weight_format: str, block: int, zero: bool) -> None:
    """The expert kernels dequantize inside the GEMM loop (codes uint8, scales float32 or e8m0 bytes): their
    entries take those pointer types; SM 80 has no fp8 unit, so codes are decoded arithmetically everywhere."""
    import dataclasses

    attrs = dataclasses.replace(
        SMALL,
        intermediate_size=64,
        weight_format=weight_format,
        weight_block=block,
        has_weight_zero_point=zero,
    )
    bundle = compile_kernels(attrs, "bfloat16", sm, buckets=(16,))
    stages = bundle.buckets["16"]["variants"]
    assert set(stages) == {"router", "topk", "gate_up", "down_rows"}  # the sorted path: no gemv / fused here
    for stage in ("gate_up", "down_rows"):
        kernel = bundle.kernels[stages[stage]]
        names = [name for name, _ in plan.KERNEL_PARAMS[stage]]
        types = dict(zip(names, kernel.param_types, strict=True))
        weight, scale, zero_ptr = (
            ("w_gu_ptr", "w_gu_scale_ptr", "w_gu_zero_ptr")
            if stage == "gate_up"
            else ("w_down_ptr", "w_down_scale_ptr", "w_down_zero_ptr")
        )
        assert types[weight] == "*u8"
        assert types[scale] == ("*u8" if weight_format == "mxfp4" else "*fp32")
        assert types[zero_ptr] == ("*u8" if weight_format == "int4" else "*bf16")
        assert kernel.cubin.startswith(ELF_MAGIC)


def test_every_bucket_and_stage_is_compiled(sm90_bundle: KernelBundle) -> None:
    assert set(sm90_bundle.buckets) == {plan.bucket_name(b) for b in plan.BUCKETS}
    prefill = sm90_bundle.buckets["inf"]["variants"]
    assert set(prefill) == {"router", "topk", "align", "gate_up", "down_rows", "reduce"}
    for bucket in sm90_bundle.buckets.values():
        for key in bucket["variants"].values():
            assert key in sm90_bundle.kernels
            assert key in bucket["constexprs"]


def test_bundle_round_trip(sm90_bundle: KernelBundle) -> None:
    data = sm90_bundle.to_bytes()
    restored = KernelBundle.from_bytes(data)
    assert restored.to_bytes() == data
    assert restored.moe_attributes() == SMALL
    assert restored.sm == 90 and restored.dtype == "bfloat16"
    assert restored.buckets == json.loads(json.dumps(sm90_bundle.buckets))
    for key, kernel in sm90_bundle.kernels.items():
        again = restored.kernels[key]
        assert again.cubin == kernel.cubin
        assert (again.name, again.num_warps, again.shared, again.param_types, again.scratch_params) == (
            kernel.name,
            kernel.num_warps,
            kernel.shared,
            kernel.param_types,
            kernel.scratch_params,
        )


def test_damaged_bundles_are_refused(sm90_bundle: KernelBundle) -> None:
    data = sm90_bundle.to_bytes()
    with pytest.raises(MoetrtError, match="no moetrt header"):
        KernelBundle.from_bytes(b"NOTABUNDLE" + data)
    with pytest.raises(MoetrtError, match="truncated"):
        KernelBundle.from_bytes(data[:-100])
    with pytest.raises(MoetrtError, match="no moetrt header"):
        KernelBundle.from_bytes(data[:6])
    header_len = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + header_len])
    header["version"] = 999
    bumped = json.dumps(header, sort_keys=True).encode()
    with pytest.raises(MoetrtError, match="version 999"):
        KernelBundle.from_bytes(
            data[:8] + len(bumped).to_bytes(4, "little") + bumped + data[12 + header_len :]
        )


def test_bad_targets_are_refused() -> None:
    with pytest.raises(MoetrtError, match="SM 75"):
        compile_kernels(SMALL, "bfloat16", 75)
    with pytest.raises(MoetrtError, match="dtype"):
        compile_kernels(SMALL, "int8", 90)
    with pytest.raises(MoetrtError, match="token buckets"):
        compile_kernels(SMALL, "bfloat16", 90, buckets=(3,))


def test_compile_variants_reports_each_failure_and_compiles_the_rest() -> None:
    """The compile step of bundles, the tuner and the benchmarks: each key once, in forked processes or not, a
    variant that does not compile reported by key beside the ones that did."""
    good = plan.bucket_variants(SMALL, "bfloat16", 16, configs.default_config(SMALL, "bfloat16", 16))[
        "router"
    ]
    broken = plan.Variant("router", (), 4, 3)  # no constexpr values
    for workers in (1, 2):
        compiled, failed = compile_variants([good, broken, good], "bfloat16", 90, workers)
        assert list(compiled) == [good.key] and compiled[good.key].cubin.startswith(ELF_MAGIC)
        assert list(failed) == [broken.key]
        assert isinstance(failed[broken.key], MoetrtError) and "neither a type nor a value" in str(
            failed[broken.key]
        )


def test_ptx_entry_parser() -> None:
    ptx = """.visible .entry k(
        .param .u64 .ptr .global .align 1 k_param_0,
        .param .u32 k_param_1,
        .param .u64 .ptr .global .align 1 k_param_2
    )"""
    assert ptx_entry_params(ptx) == ["u64", "u32", "u64"]


def test_config_table_lookup(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._load_table.cache_clear()
    try:
        default = configs.select_config(SMALL, "bfloat16", 90, 16)
        assert default == configs.default_config(SMALL, "bfloat16", 16)
        entry = {"gate_up": {"BN": 64, "num_stages": 4}, "down": {"BH": 128}, "us": 1.0, "tokens": 1}
        configs.write_table({configs.entry_key(SMALL, "bfloat16", 16): entry}, 90)
        tuned = configs.select_config(SMALL, "bfloat16", 90, 16)
        assert tuned["gate_up"]["BN"] == 64 and tuned["gate_up"]["num_stages"] == 4
        assert tuned["down"]["BH"] == 128
        assert tuned["gate_up"]["BM"] == default["gate_up"]["BM"]  # keys the entry lacks keep their default
        assert configs.select_config(SMALL, "bfloat16", 90, 64) == configs.default_config(
            SMALL, "bfloat16", 64
        )
        assert configs.select_config(SMALL, "float16", 90, 16) == configs.default_config(SMALL, "float16", 16)
        (tmp_path / "sm80.json").write_text("{not json")
        with pytest.raises(MoetrtError, match="not valid"):
            configs.select_config(SMALL, "bfloat16", 80, 16)
    finally:
        configs._load_table.cache_clear()


def test_shipped_sm90_table_is_consistent() -> None:
    """The committed sm_90 table: every entry names a known bucket and only known config keys (the default
    config's, or an optional one such as `router.GATE_COL`)."""
    path = configs.CONFIG_DIR / "sm90.json"
    if not path.exists():
        pytest.skip("no sm_90 table shipped")
    entries = json.loads(path.read_text())["entries"]
    buckets = {plan.bucket_name(b) for b in plan.BUCKETS}
    for key, entry in entries.items():
        _shape, dtype, bucket = key.split("/")
        assert dtype in KERNEL_NAMES and bucket in buckets, key
        prefill, decode = (configs.default_config(PRESETS["qwen3_30b"], dtype, b) for b in (None, 16))
        for stage, values in entry.items():
            if stage in ("us", "tokens"):
                continue
            assert stage in prefill, f"{key}: unknown stage {stage}"
            known = set(prefill[stage]) | set(decode[stage]) | configs.OPTIONAL_KEYS.get(stage, frozenset())
            assert set(values) <= known, f"{key}: unknown keys in {stage}"


def test_presets_and_attrs_json() -> None:
    assert resolve_attrs("qwen3_next", None).num_experts == 512
    attrs = resolve_attrs(None, json.dumps(SMALL.to_onnx_attributes()))
    assert attrs == SMALL
    with pytest.raises(MoetrtError, match="exactly one"):
        resolve_attrs(None, None)
    with pytest.raises(MoetrtError, match="unknown preset"):
        resolve_attrs("nope", None)
    with pytest.raises(MoetrtError, match="not a valid"):
        resolve_attrs(None, '{"num_experts": 4}')


def test_programmatic_dependent_launch_is_sm90_only() -> None:
    cfg = configs.default_config(SMALL, "bfloat16", 16)
    cfg["pdl"] = {"enabled": 1}
    bundle = compile_kernels(SMALL, "bfloat16", 90, buckets=(16,), configs={16: cfg})
    for key in bundle.buckets["16"]["variants"].values():
        assert bundle.buckets["16"]["constexprs"][key]["PDL"] == 1
        assert bundle.kernels[key].cubin.startswith(ELF_MAGIC)
    with pytest.raises(MoetrtError, match="sm_80 lacks"):
        compile_kernels(SMALL, "bfloat16", 80, buckets=(16,), configs={16: cfg})


def test_tune_picks_the_fastest_correct_candidate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The search logic with a stand-in timer: failing candidates are skipped, buckets sum their counts."""
    seen: list[tuple[int, int]] = []

    def fake_time(cfg: dict, t: int) -> float:
        seen.append((t, cfg["gate_up"]["BN"]))
        if cfg["gate_up"]["BN"] == 64 and not cfg["fused"]["enabled"]:
            raise MoetrtError("candidate is wrong", "")  # e.g. rejected by the correctness check
        return (  # each win well past tuner.KEEP_MARGIN, so the search takes it
            10.0 * t
            + cfg["gate_up"]["BN"] / 16
            + (0 if cfg["fused"]["enabled"] else 5)
            - 5 * (cfg["pdl"]["enabled"] == 1)  # the first PDL mode the fastest (the pdl round tries 0, 1, 2)
        )

    out = tmp_path / "sm90.json"
    best = tuner.tune(SMALL, "bfloat16", 90, fake_time, tokens=(2, 8, 40), out_path=out)
    entry = best[configs.entry_key(SMALL, "bfloat16", 16)]
    assert entry["tokens"] == [2, 8]
    assert entry["fused"]["enabled"] == 1 and entry["gate_up"]["BN"] == 16 and entry["pdl"]["enabled"] == 1
    assert {t for t, _ in seen} == {2, 8, 40}
    table = json.loads(out.read_text())["entries"]
    assert set(table) == {configs.entry_key(SMALL, "bfloat16", 16), configs.entry_key(SMALL, "bfloat16", 64)}
    # on an SM without programmatic dependent launch the round is not tried
    best = tuner.tune(SMALL, "bfloat16", 89, fake_time, tokens=(2,), out_path=tmp_path / "sm89.json")
    assert best[configs.entry_key(SMALL, "bfloat16", 16)]["pdl"]["enabled"] == 0

    # one token: the expert-group path's tiles are candidates too, and the table records the path chosen
    def gemv_time(cfg: dict, t: int) -> float:
        return 10.0 - 3 * cfg["gemv"]["enabled"] + cfg["gemv"]["BN"] / 64 + cfg["gemv"]["BH"] / 64

    best = tuner.tune(SMALL, "bfloat16", 90, gemv_time, tokens=(1,), out_path=tmp_path / "gemv.json")
    entry = best[configs.entry_key(SMALL, "bfloat16", 1)]
    assert entry["gemv"]["enabled"] == 1 and (entry["gemv"]["BN"], entry["gemv"]["BH"]) == (16, 16)
    best = tuner.tune(
        SMALL,
        "bfloat16",
        90,
        lambda cfg, t: gemv_time(cfg, t) + 6 * cfg["gemv"]["enabled"],
        tokens=(1,),
        out_path=tmp_path / "sorted.json",
    )
    assert best[configs.entry_key(SMALL, "bfloat16", 1)]["gemv"]["enabled"] == 0


SMALL_FP8 = dataclasses.replace(SMALL, weight_format="fp8_block", weight_block=16)
SMALL_MXFP4 = dataclasses.replace(SMALL, intermediate_size=64, weight_format="mxfp4", weight_block=32)


def test_quantized_entries_have_their_own_expert_tiles(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A quantized op takes the native entry's router / top-k / PDL and never its expert GEMM tiles."""
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._load_table.cache_clear()
    try:
        assert configs.entry_key(SMALL_FP8, "bfloat16", 1).startswith(
            configs.shape_key(SMALL) + "+fp8_block16/"
        )
        int4 = dataclasses.replace(SMALL, weight_format="int4", weight_block=16, has_weight_zero_point=True)
        assert configs.weights_key(int4) == "+int4g16z" and configs.weights_key(SMALL) == ""
        native = {
            "router": {"SPLIT": 3},
            "topk": {"RT": 8},
            "pdl": {"enabled": 1},
            "gate_up": {"BN": 128},
            "fused": {"enabled": 1},
        }
        configs.write_table({configs.entry_key(SMALL, "bfloat16", 16): native}, 90)
        cfg = configs.select_config(SMALL_FP8, "bfloat16", 90, 16)
        assert (cfg["router"]["SPLIT"], cfg["topk"]["RT"], cfg["pdl"]["enabled"]) == (3, 8, 1)
        assert cfg["gate_up"] == configs.default_config(SMALL_FP8, "bfloat16", 16)["gate_up"]
        assert cfg["fused"]["enabled"] == 0 and cfg["gemv"]["enabled"] == 0
        # tiles inside one scale group: the 16-wide blocks give 16-wide K tiles
        assert cfg["gate_up"]["BK"] == cfg["down"]["BK"] == 16
        assert cfg["dequant"]["fp8_cvt"] == 1  # SM 9.0 converts e4m3 in hardware
        assert configs.select_config(SMALL_FP8, "bfloat16", 89, 16)["dequant"]["fp8_cvt"] == 0
        assert configs.select_config(SMALL_MXFP4, "bfloat16", 90, 16)["dequant"]["fp8_cvt"] == 0
        own = {"gate_up": {"BN": 16, "num_warps": 8}, "down": {"BH": 32}}
        configs.write_table({configs.entry_key(SMALL_FP8, "bfloat16", 16): own}, 90)
        cfg = configs.select_config(SMALL_FP8, "bfloat16", 90, 16)
        assert (cfg["gate_up"]["BN"], cfg["gate_up"]["num_warps"], cfg["down"]["BH"]) == (16, 8, 32)
        assert cfg["router"]["SPLIT"] == 3
        # the native op does not see the quantized entry
        assert configs.select_config(SMALL, "bfloat16", 90, 16)["gate_up"]["BN"] == 128
    finally:
        configs._load_table.cache_clear()


@pytest.mark.parametrize("sm", [89, 90, 100, 120])
def test_fp8_activations_compile_for_fp8_tensor_cores(sm: int) -> None:
    """fp8 activations: e4m3 x e4m3 products on the tensor cores of SM 8.9 and later, tiles one weight block
    wide whatever the config says, in every bucket (decode and prefill), fp16 and bf16."""
    import dataclasses

    attrs = dataclasses.replace(
        SMALL, intermediate_size=64, weight_format="fp8_block", weight_block=32, activation_format="fp8_block"
    )
    for dtype in ("bfloat16", "float16"):
        bundle = compile_kernels(attrs, dtype, sm, buckets=(1, 16, None))
        for bucket in bundle.buckets.values():
            for stage in ("gate_up", "down_rows"):
                constexprs = bucket["constexprs"][bucket["variants"][stage]]
                assert constexprs["ACT_FP8"] == 1 and constexprs["BK"] == 32 and constexprs["PER_WEIGHT"] == 0
                assert bundle.kernels[bucket["variants"][stage]].cubin.startswith(ELF_MAGIC)


@pytest.mark.parametrize("sm", [80, 86, 87])
def test_fp8_activations_are_refused_without_fp8_tensor_cores(sm: int) -> None:
    import dataclasses

    attrs = dataclasses.replace(
        SMALL, intermediate_size=64, weight_format="fp8_block", weight_block=32, activation_format="fp8_block"
    )
    with pytest.raises(MoetrtError, match=f"fp8 activations run on fp8 tensor cores, which sm_{sm} lacks"):
        compile_kernels(attrs, "bfloat16", sm, buckets=(16,))
    with pytest.raises(MoetrtError, match="fp8 activations are for fp16 and bf16 ops"):
        compile_kernels(attrs, "float32", 90, buckets=(16,))


def test_hardware_fp8_conversion_needs_sm90() -> None:
    cfg = configs.default_config(SMALL_FP8, "bfloat16", 16)
    cfg["dequant"]["fp8_cvt"] = 1
    bundle = compile_kernels(SMALL_FP8, "bfloat16", 90, buckets=(16,), configs={16: cfg})
    gate_up = bundle.buckets["16"]["variants"]["gate_up"]
    assert bundle.buckets["16"]["constexprs"][gate_up]["FP8_CVT"] == 1
    with pytest.raises(MoetrtError, match="sm_89 lacks"):
        compile_kernels(SMALL_FP8, "bfloat16", 89, buckets=(16,), configs={16: cfg})


def test_tune_of_quantized_experts_writes_only_their_tiles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seen = []

    def fake_time(cfg: dict, t: int) -> float:
        seen.append(cfg)
        return 5.0 + cfg["gate_up"]["BK"] / 16 + cfg["down"]["BH"] / 64

    best = tuner.tune(SMALL_MXFP4, "bfloat16", 90, fake_time, tokens=(1, 8), out_path=tmp_path / "q.json")
    assert set(best) == {configs.entry_key(SMALL_MXFP4, "bfloat16", b) for b in (1, 16)}
    entry = best[configs.entry_key(SMALL_MXFP4, "bfloat16", 16)]
    assert set(entry) == {*configs.QUANTIZED_STAGES, "us", "tokens"}
    assert entry["gate_up"]["BK"] == 32 and entry["down"]["BH"] == 16
    assert not any(c["gemv"]["enabled"] or c["fused"]["enabled"] for c in seen)
    # one round (the tiles), each candidate changes gate_up or down, not both
    base = configs.select_config(SMALL_MXFP4, "bfloat16", 90, 16)
    assert all(c["gate_up"] == base["gate_up"] or c["down"] == base["down"] for c in seen)


def test_weights_option_of_aot_and_tune() -> None:
    """`--weights` turns a preset into its quantized op (block chosen as `moetrt fuse` does), once."""
    from moetrt.cli import with_weights

    fp8 = with_weights(PRESETS["qwen3_next"], "fp8", None, False)
    assert (fp8.weight_format, fp8.weight_block, fp8.has_weight_zero_point) == ("fp8_block", 128, False)
    int4 = with_weights(PRESETS["qwen3_30b"], "int4", 64, True)
    assert (int4.weight_format, int4.weight_block, int4.has_weight_zero_point) == ("int4", 64, True)
    assert with_weights(SMALL, "native", None, False) == SMALL
    with pytest.raises(MoetrtError, match="already store"):
        with_weights(SMALL_FP8, "int4", None, False)
    with pytest.raises(MoetrtError, match="applies to --weights int4"):
        with_weights(SMALL, "fp8", None, True)
    with pytest.raises(MoetrtError, match="does not fit"):
        with_weights(SMALL, "int4", 7, False)


def test_gpu_oracle_quantizes_fp8_activations_as_the_reference() -> None:
    """The tuner's and the benchmark's oracle (`gpu_reference`, here on CPU tensors) with fp8 activations
    agrees with `moe_reference` on the quantized op, and differs from the weight-only op by the quantization."""
    import dataclasses

    import torch

    from moetrt.core.tolerances import relative_error, tolerance
    from moetrt.op.presets import like
    from moetrt.op.reference import moe_reference, random_inputs
    from moetrt.tune.gpu_workload import gpu_quantized_inputs, gpu_reference

    base = like("qwen3_30b", 16, 4, 256, 256)
    attrs = dataclasses.replace(
        base, weight_format="fp8_block", weight_block=128, activation_format="fp8_block"
    )
    weights = {
        k: v for k, v in random_inputs(base, 1, dtype=torch.bfloat16, seed=1).items() if k != "hidden_states"
    }
    inputs, oracle = gpu_quantized_inputs(weights, attrs)
    inputs["hidden_states"] = oracle["hidden_states"] = random_inputs(base, 5, dtype=torch.bfloat16, seed=3)[
        "hidden_states"
    ]
    want = moe_reference(inputs, attrs, compute_dtype=torch.float64)["output"].float()
    native = attrs.with_native_weights()
    assert relative_error(
        gpu_reference(oracle, native, attrs.fp8_activation_block).output, want
    ) <= tolerance("bf16")
    assert relative_error(gpu_reference(oracle, native).output, want) > tolerance("bf16")


def test_gpu_oracle_dequantizes_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle's experts, written chunk by chunk into one tensor (`gpu_quantized_inputs`), equal the
    quantized experts dequantized at once, for an expert count the chunk does not divide."""
    import dataclasses

    import torch

    from moetrt.op import quant
    from moetrt.op.presets import like
    from moetrt.op.reference import random_inputs
    from moetrt.tune import gpu_workload

    monkeypatch.setattr(gpu_workload, "QUANTIZE_CHUNK", 2)
    base = like("qwen3_30b", 5, 2, 64, 32)
    weights = {
        k: v for k, v in random_inputs(base, 1, dtype=torch.bfloat16, seed=4).items() if k != "hidden_states"
    }
    for fmt, block in (("int4", 32), ("mxfp4", 32), ("fp8_block", 16)):
        attrs = dataclasses.replace(base, weight_format=fmt, weight_block=block)
        inputs, oracle = gpu_workload.gpu_quantized_inputs(weights, attrs)
        for which in ("gate_up", "down"):
            codes = inputs[f"expert_{which}_weight"]
            whole = quant.dequantize(
                fmt,
                block,
                quant.QuantizedWeight(codes, inputs[f"expert_{which}_scale"], None),
                weights[f"expert_{which}_weight"].shape[-1],
            )
            got = oracle[f"expert_{which}_weight"]
            assert got.dtype == torch.float32 and got.shape == weights[f"expert_{which}_weight"].shape
            assert torch.equal(got, whole), (fmt, which)


def test_a_config_the_plan_refuses_is_one_line_naming_its_entry() -> None:
    from moetrt.op.presets import like

    attrs = like("qwen3_30b", 16, 4, 256, 256, weight_format="mxfp4", weight_block=32)
    cfg = configs.default_config(attrs, "bfloat16", None, sm=90)
    cfg["gate_up"].update({"BM": 128, "BN": 128, "BK": 64, "num_warps": 4})
    cfg["dequant"]["per_weight"] = 1
    with pytest.raises(
        MoetrtError, match=r"bucket inf \(E16_K4_H256_I256_S0\+mxfp4g32/bfloat16/inf\) is refused: gate_up"
    ):
        compile_kernels(attrs, "bfloat16", 90, buckets=(None,), configs={None: cfg})
