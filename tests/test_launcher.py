"""The CUDA-driver launcher's pure parts: argument packing against the compiled kernels, launch plans, workspace."""

from __future__ import annotations

import itertools
import struct
import subprocess
import sys

import pytest

from moetrt.kernels import configs as tuning
from moetrt.kernels import plan
from moetrt.kernels.launcher import pack_kernel_params, resolve_launch_args
from moetrt.op.spec import MoEAttributes

FULL = MoEAttributes(
    16,
    4,
    64,
    48,
    scoring="sigmoid",
    has_score_correction_bias=True,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    has_router_bias=True,
    has_expert_bias=True,
    shared_intermediate_size=32,
    has_shared_gate=True,
    output_router_logits=True,
)
PLAIN = MoEAttributes(8, 2, 64, 48)


def test_pack_layout() -> None:
    blob, offsets = pack_kernel_params(
        ["*bf16", "i32", "*i32", "fp32", "*i8"], [0x7F00_0000_1000, -5, 16, 1.5, 0]
    )
    assert offsets == [0, 8, 16, 24, 32]
    assert len(blob) == 40
    assert struct.unpack_from("<Q", blob, 0)[0] == 0x7F00_0000_1000
    assert struct.unpack_from("<i", blob, 8)[0] == -5
    assert struct.unpack_from("<Q", blob, 16)[0] == 16
    assert struct.unpack_from("<f", blob, 24)[0] == 1.5
    assert struct.unpack_from("<Q", blob, 32)[0] == 0


@pytest.mark.parametrize(
    ("types", "values", "message"),
    [
        (["*bf16"], [-1], "64-bit address"),
        (["*bf16"], [1 << 64], "64-bit address"),
        (["*bf16"], [1.0], "64-bit address"),
        (["i32"], [1 << 31], "out of range"),
        (["i64"], [1], "unsupported"),
        (["i32", "i32"], [1], "2 parameters but 1 values"),
    ],
)
def test_pack_rejects_bad_arguments(types: list[str], values: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_kernel_params(types, values)


def test_param_lists_match_the_triton_signatures() -> None:
    """KERNEL_PARAMS (what the launcher packs) = each kernel's non-constexpr parameters, in order."""
    from moetrt.kernels.triton_moe import KERNELS

    assert set(KERNELS) == set(plan.KERNEL_PARAMS)
    for name, fn in KERNELS.items():
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        assert runtime == [n for n, _ in plan.KERNEL_PARAMS[name]], name


def test_packing_matches_the_compiled_entry_points() -> None:
    """What the launcher packs per parameter (8-byte pointer, 4-byte int) = the cubin entry's .param list."""
    from moetrt.kernels.aot import compile_variant, ptx_entry_params
    from moetrt.kernels.triton_moe import KERNELS

    cfg = tuning.default_config(PLAIN, "float16", 16)
    variants = plan.bucket_variants(PLAIN, "float16", 16, cfg)
    kernel = compile_variant(variants["topk"], "float16", 90)
    import triton
    from triton.backends.compiler import GPUTarget

    # the same compile as aot, to read the PTX entry (compile_variant keeps only the cubin)
    fn = KERNELS["topk"]
    constexprs = dict(variants["topk"].constexprs)
    runtime = dict(
        zip([n for n, _ in plan.KERNEL_PARAMS["topk"]], plan.param_types("topk", "float16"), strict=True)
    )
    signature = {n: runtime.get(n, "constexpr") for n in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")
    }
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernel.num_warps})
    entry = ptx_entry_params(compiled.asm["ptx"])
    types = list(kernel.param_types) + ["*i8"] * kernel.scratch_params
    blob, offsets = pack_kernel_params(types, [0] * len(types))
    assert len(entry) == len(types)
    widths = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)] + [len(blob) - offsets[-1]]
    for ptx_type, ty, width in zip(entry, types, widths, strict=True):
        if ty.startswith("*"):
            assert ptx_type == "u64"
        else:
            assert ptx_type in ("u32", "b32", "s32")
        assert width == 8


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
        assert region.offset % (16 if name in ("tickets", "htickets", "ngroups", "acc") else 256) == 0, name
    router = ops[0]
    zero_words = int(
        dict(zip([n for n, _ in plan.KERNEL_PARAMS["router"]], router.args, strict=True))["zero_words"][1]
    )
    assert layout["counts"].offset == 0
    assert zero_words * 4 == layout["acc"].offset + layout["acc"].nbytes
    assert layout["tickets"].offset < layout["htickets"].offset <= layout["ngroups"].offset
    assert layout["ngroups"].offset + layout["ngroups"].nbytes <= layout["acc"].offset + 1
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


def test_resolve_args_maps_every_pointer() -> None:
    attrs, dtype, t = FULL, "float16", 9
    bound = plan.bucket_of(t)
    cfg = tuning.default_config(attrs, dtype, bound)
    variants = plan.bucket_variants(attrs, dtype, bound, cfg)
    layout = plan.workspace_layout(attrs, dtype, t, cfg, bound)
    inputs = [0x10000 * (i + 1) for i in range(len(attrs.present_inputs()))]
    outputs = [0x9000000, 0xA000000]
    ws = 0xF0000000
    by_name = dict(zip(attrs.present_inputs(), inputs, strict=True))
    for op in plan.launch_sequence(attrs, dtype, t, variants, cfg, bound):
        values = resolve_launch_args(op, attrs, layout, 2, t, inputs, outputs, ws)
        params = plan.KERNEL_PARAMS[variants[op.stage].kernel]
        assert len(values) == len(params) + 2 and values[-2:] == [0, 0]  # Triton's two scratch pointers
        named = dict(zip([n for n, _ in params], values[:-2], strict=True))
        for name, kind in params:
            if kind == "T":
                assert named[name] == t
        if "x_ptr" in named:
            assert named["x_ptr"] == by_name["hidden_states"]
        if "corr_bias_ptr" in named:
            assert named["corr_bias_ptr"] == by_name["score_correction_bias"]
        if "out_ptr" in named:
            assert named["out_ptr"] == outputs[0]
        if "logits_out_ptr" in named:
            assert named["logits_out_ptr"] == outputs[1]
        if "topk_ids_ptr" in named:
            assert named["topk_ids_ptr"] == ws + layout["topk_ids"].offset


def test_absent_inputs_resolve_to_hidden_states() -> None:
    attrs, dtype, t = PLAIN, "bfloat16", 3
    cfg = tuning.default_config(attrs, dtype, 16)
    variants = plan.bucket_variants(attrs, dtype, 16, cfg)
    layout = plan.workspace_layout(attrs, dtype, t, cfg, 16)
    inputs = [0x1000, 0x2000, 0x3000, 0x4000]
    for op in plan.launch_sequence(attrs, dtype, t, variants, cfg, 16):
        values = resolve_launch_args(op, attrs, layout, 0, t, inputs, [0x5000], 0x100000)
        named = dict(zip([n for n, _ in plan.KERNEL_PARAMS[variants[op.stage].kernel]], values, strict=True))
        for absent in ("router_b_ptr", "corr_bias_ptr", "shared_gate_w_ptr", "b_gu_ptr", "logits_out_ptr"):
            if absent in named:
                assert named[absent] == 0x1000


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
    """With `fused` in the config, decode runs router · top-k · experts · finalize; the accumulator is zeroed."""
    attrs, dtype, t = FULL, "bfloat16", 5
    cfg = tuning.default_config(attrs, dtype, 16)
    cfg["fused"] = {"enabled": 1, "BH": 64}
    variants = plan.bucket_variants(attrs, dtype, 16, cfg)
    layout = plan.workspace_layout(attrs, dtype, t, cfg, 16)
    ops = plan.launch_sequence(attrs, dtype, t, variants, cfg, 16)
    assert [op.stage for op in ops] == ["router", "topk", "experts", "finalize"]
    assert layout["acc"].nbytes == 4 * t * attrs.hidden_size
    assert layout["act"].nbytes == 0 and layout["yw"].nbytes == 0
    zero_words = int(ops[0].args[[n for n, _ in plan.KERNEL_PARAMS["router"]].index("zero_words")][1])
    assert zero_words * 4 == layout["acc"].offset + layout["acc"].nbytes
    # prefill ignores the flag
    prefill = plan.bucket_variants(
        attrs, dtype, None, {**tuning.default_config(attrs, dtype, None), "fused": {"enabled": 1, "BH": 64}}
    )
    assert "experts" not in prefill and "reduce" in prefill


def test_pdl_flag_reaches_every_launch() -> None:
    cfg = tuning.default_config(FULL, "float16", None)
    assert not any(
        op.pdl
        for op in plan.launch_sequence(
            FULL, "float16", 100, plan.bucket_variants(FULL, "float16", None, cfg), cfg, None
        )
    )
    cfg["pdl"] = {"enabled": 1}
    ops = plan.launch_sequence(
        FULL, "float16", 100, plan.bucket_variants(FULL, "float16", None, cfg), cfg, None
    )
    assert ops and all(op.pdl for op in ops)


def test_pdl_launch_config() -> None:
    driver = pytest.importorskip("cuda.bindings.driver")
    from moetrt.kernels.launcher import pdl_launch_config

    config = pdl_launch_config(driver, (7, 2, 1), 256, 4096, driver.CUstream(0))
    assert (config.gridDimX, config.gridDimY, config.gridDimZ) == (7, 2, 1)
    assert (config.blockDimX, config.sharedMemBytes, config.numAttrs) == (256, 4096, 1)
    attr = config.attrs[0]
    assert attr.id == driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attr.value.programmaticStreamSerializationAllowed == 1


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
