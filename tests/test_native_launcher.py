"""The native launcher library on the CPU: its planner against plan.py for every bucket and path, argument
packing, and every refusal (damaged, truncated, foreign bundles; wrong SM; bad token counts)."""

from __future__ import annotations

import json
import struct

import pytest
from moetrt_testing.planning_bundles import EVERY_OPTION as FULL
from moetrt_testing.planning_bundles import SCRATCH_PARAMS, planning_bundle

from moetrt.core.errors import MoetrtError
from moetrt.kernels import configs as tuning
from moetrt.kernels import plan
from moetrt.kernels.aot import BUNDLE_MAGIC, BUNDLE_VERSION, KernelBundle
from moetrt.kernels.launcher import plan_from_native
from moetrt.kernels.native import NativeBundle, NativeLauncher
from moetrt.op.presets import PRESETS
from moetrt.op.spec import FP8_BLOCK, INT4, MXFP4, MoEAttributes

ATTRS = {
    "full": FULL,
    "plain": MoEAttributes(8, 2, 64, 48),
    "qwen3_next": MoEAttributes(
        512, 10, 2048, 512, norm_topk_prob=True, shared_intermediate_size=512, has_shared_gate=True
    ),
    "gpt_oss": MoEAttributes(
        32,
        4,
        64,
        64,
        topk_before_score=True,
        activation="swiglu_clamped",
        has_router_bias=True,
        has_expert_bias=True,
    ),
    "fp8": MoEAttributes(8, 2, 256, 128, weight_format=FP8_BLOCK, weight_block=128),
    "int4_zero": MoEAttributes(
        8, 2, 256, 128, weight_format=INT4, weight_block=64, has_weight_zero_point=True
    ),
    "mxfp4": MoEAttributes(8, 2, 64, 64, weight_format=MXFP4, weight_block=32, shared_intermediate_size=32),
}
TOKENS = (0, 1, 2, 5, 15, 16, 17, 63, 64, 65, 300, 511, 512, 513, 4096, 5001)


def _python_plan(bundle: KernelBundle, attrs: MoEAttributes, num_tokens: int):
    bound = plan.bucket_of(num_tokens, [b["bound"] for b in bundle.buckets.values()])
    cfg = bundle.buckets[plan.bucket_name(bound)]["config"]
    variants = plan.bucket_variants(attrs, bundle.dtype, bound, cfg)
    return (
        plan.launch_sequence(attrs, bundle.dtype, num_tokens, variants, cfg, bound),
        plan.workspace_layout(attrs, bundle.dtype, num_tokens, cfg, bound),
    )


def _assert_same_plans(bundle: KernelBundle, attrs: MoEAttributes, tokens=TOKENS) -> None:
    native = NativeBundle(bundle.to_bytes())
    for t in tokens:
        ops, layout = plan_from_native(native.plan(t))
        if t == 0:
            assert ops == [] and native.workspace_size(0) == 0
            continue
        want_ops, want_layout = _python_plan(bundle, attrs, t)
        assert ops == want_ops, t
        assert layout == want_layout, t
        assert native.workspace_size(t) == want_layout["total"].nbytes


@pytest.mark.parametrize("name", sorted(ATTRS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_native_plan_equals_python_plan(name: str, dtype: str) -> None:
    attrs = ATTRS[name]
    _assert_same_plans(planning_bundle(attrs, dtype), attrs)


@pytest.mark.parametrize(
    "path",
    ["gemv", "fused", "pdl", "split", "routed", "wide", "grouped", "tma", "persist", "in_router", "gate_col"],
)
def test_native_plan_follows_the_config(path: str) -> None:
    """The expert-group path, the fused decode path, PDL, split gate_up, the routed path, 64-row decode
    blocks, row blocks grouped per weight tile, TMA grouped GEMMs and persistent ones, as a tuned table
    selects them."""
    attrs = FULL
    configs = {}
    for bound in plan.BUCKETS:
        cfg = tuning.default_config(attrs, "bfloat16", bound)
        if path == "gemv":
            cfg["gemv"]["enabled"] = 1
        elif path == "fused":
            cfg["fused"] = {"enabled": 1, "BH": 64}
        elif path == "split":
            cfg["gemv"]["enabled"] = 0
            cfg["gate_up"]["SK"] = 4
        elif path == "wide":  # 64-row expert blocks at decode (configs.WIDE_DECODE_GATE_UP)
            cfg["gemv"]["enabled"] = 0
            cfg["gate_up"]["BM"] = 64
        elif path == "grouped":  # grids of whole groups of lcm(3, 2) = 6 row blocks (plan.grid_blocks)
            cfg["gemv"]["enabled"] = 0
            cfg["gate_up"]["GM"], cfg["down"]["GM"] = 3, 2
        elif path in ("tma", "persist"):  # descriptors built on the device: the scratch region, the argument
            cfg["gemv"]["enabled"] = 0
            if path == "persist":  # 5 programs looping over the prefill tiles (decode: one per tile)
                cfg["gate_up"]["PERSIST"] = cfg["down"]["PERSIST"] = 5
            cfg["gate_up"]["TMA"] = cfg["down"]["TMA"] = 1
            cfg["gate_up"]["GM"] = 2
            cfg["down"]["BK"] = 16  # I = 48 and the shared expert's 32 in whole tiles (plan.uses_tma)
        elif path == "in_router":  # the router kernel routes where every slot fits its registers
            cfg["gemv"]["enabled"] = 0
            cfg["topk"]["in_router"] = 1
        elif path == "gate_col":  # the shared gate's own column of router programs
            cfg["gemv"]["enabled"] = 0
            cfg["router"]["GATE_COL"] = 1
        elif path == "routed":  # with the other switches on: the routed path takes precedence
            cfg["routed"]["enabled"] = 1
            cfg["gemv"]["enabled"] = 1
            cfg["fused"] = {"enabled": 1, "BH": 64}
        else:
            cfg["pdl"] = {"enabled": 1}
        configs[bound] = cfg
    bundle = planning_bundle(attrs, "bfloat16", configs=configs)
    _assert_same_plans(bundle, attrs)
    stages = [op["stage"] for op in NativeBundle(bundle.to_bytes()).plan(3)["launches"]]
    expected = {
        "gemv": ["router", "topk_group", "gemv_gate_up", "gemv_down"],
        "fused": ["router", "topk", "experts"],
        "pdl": ["router", "topk", "gate_up", "down_rows"],
        "split": ["router", "topk", "gate_up", "down_rows"],
        "routed": ["router", "routed_experts"],
        "wide": ["router", "topk", "gate_up", "down_rows"],
        "grouped": ["router", "topk", "gate_up", "down_rows"],
        "tma": ["router", "topk", "gate_up", "down_rows"],
        "persist": ["router", "topk", "gate_up", "down_rows"],
        "in_router": ["router", "topk", "gate_up", "down_rows"],  # 3 tokens x top-2: past one program's sort
        "gate_col": ["router", "topk", "gate_up", "down_rows"],
    }[path]
    assert stages == expected
    if path == "split":  # decode buckets split (four programs per tile), prefill ones do not
        sizes = {t: plan_from_native(NativeBundle(bundle.to_bytes()).plan(t))[1] for t in (3, 700)}
        assert sizes[3]["gu_part"].nbytes > 0 and sizes[3]["gu_tickets"].nbytes > 0
        assert sizes[700]["gu_part"].nbytes == 0
    if path == "routed":  # up to 16 tokens; prefill buckets run the sorted path; counters in the zeroed span
        native = NativeBundle(bundle.to_bytes())
        assert [op["stage"] for op in native.plan(64)["launches"]][:2] == ["router", "topk"]
        launches, layout = plan_from_native(native.plan(3))
        assert launches[1].grid[0] == plan.routed_units(attrs, configs[16], 3)
        assert layout["units"].nbytes == 4 * (3 + 3) and layout["yw"].nbytes == 0
        zero_words = dict(launches[0].args)["int"]
        assert layout["units"].offset + layout["units"].nbytes <= int(zero_words) * 4
    if path == "pdl":
        assert all(op["pdl"] for op in NativeBundle(bundle.to_bytes()).plan(700)["launches"])
    if path == "in_router":  # T = 1: no top-k launch; the router takes the per-stream ticket
        assert attrs.top_k * 1 <= plan.LOCAL_SORT_MAX_SLOTS
        launches, _ = plan_from_native(NativeBundle(bundle.to_bytes()).plan(1))
        assert [op.stage for op in launches] == ["router", "gate_up", "down_rows"]
        assert launches[0].variant_key.startswith("router_topk_")
        assert ("state", "router_ticket") in launches[0].args
    if path == "gate_col":  # one column of router programs more than the expert blocks, every bucket
        assert attrs.has_shared_gate
        for t in (1, 3, 700):
            router = plan_from_native(NativeBundle(bundle.to_bytes()).plan(t))[0][0]
            be = configs[plan.bucket_of(t)]["router"]["BE"]
            assert router.stage == "router" and router.grid[1] == -(-attrs.num_experts // be) + 1
    if path == "grouped":  # the grids and the block table cover whole groups
        for t in (3, 700, 5001):
            launches, layout = plan_from_native(NativeBundle(bundle.to_bytes()).plan(t))
            grids = {op.stage: op.grid[0] for op in launches}
            blocks = layout["block_expert"].nbytes // 4
            assert blocks % 6 == 0 and grids["down_rows"] == blocks * -(
                -attrs.hidden_size // configs[None]["down"]["BH"]
            )

    if path == "tma":  # Triton's global scratch past the kernel's parameters, one region for both GEMMs
        for t in (3, 700, 5001):
            launches, layout = plan_from_native(NativeBundle(bundle.to_bytes()).plan(t))
            by_stage = {op.stage: op for op in launches}
            blocks = layout["block_expert"].nbytes // 4
            programs = {
                "gate_up": by_stage["gate_up"].grid[0],
                "down_rows": by_stage["down_rows"].grid[0],
            }
            assert programs["gate_up"] % blocks == 0 and programs["down_rows"] % blocks == 0
            assert layout["tma_scratch"].nbytes == 128 * max(programs["gate_up"], 2 * programs["down_rows"])
            for stage in ("gate_up", "down_rows"):
                assert by_stage[stage].args[-1] == ("ws", "tma_scratch")
                assert len(by_stage[stage].args) == len(plan.KERNEL_PARAMS[stage]) + 1
            assert by_stage["topk"].args[-1] != ("ws", "tma_scratch")
    if path == "persist":  # prefill: 5 programs, each with one descriptor more (the shared expert's weight)
        assert attrs.has_shared_expert
        for t, persistent in ((3, False), (700, True), (5001, True)):
            launches, layout = plan_from_native(NativeBundle(bundle.to_bytes()).plan(t))
            grids = {op.stage: op.grid[0] for op in launches}
            blocks = layout["block_expert"].nbytes // 4
            if persistent:
                assert grids["gate_up"] == grids["down_rows"] == 5
                assert layout["tma_scratch"].nbytes == 128 * 5 * max(1 + 1, 2 + 1)
            else:
                assert grids["gate_up"] % blocks == 0 and grids["gate_up"] > 5


def test_native_plan_of_fp8_activations() -> None:
    """fp8 activations: both planners lay out the e4m3 copies of x and of the routed activations (the router
    and gate_up kernels write them) on the sorted path, and none on the routed path (it quantizes in
    registers)."""
    attrs = MoEAttributes(
        8, 2, 256, 128, weight_format=FP8_BLOCK, weight_block=128, activation_format=FP8_BLOCK,
        shared_intermediate_size=64,
    )  # fmt: skip
    routed = tuning.default_config(attrs, "bfloat16", 16)
    routed["routed"]["enabled"] = 1
    bundle = planning_bundle(attrs, "bfloat16", configs={16: routed})
    _assert_same_plans(bundle, attrs)
    native = NativeBundle(bundle.to_bytes())
    for t in (1, 700):  # T = 1 bucket and prefill: sorted path
        _, layout = plan_from_native(native.plan(t))
        assert layout["xq"].nbytes == t * 256 and layout["xs"].nbytes == 4 * t * 2
        # the routed rows' e4m3 activation: the shared expert's T rows keep theirs in act
        assert layout["actq"].nbytes == 2 * t * 128 and layout["acts"].nbytes == 4 * 2 * t
        assert layout["act"].nbytes == 2 * t * 128  # the shared expert's T rows of NMAX = 128 bf16 values
    _, layout = plan_from_native(native.plan(5))  # the T <= 16 bucket takes the routed path
    assert all(layout[name].nbytes == 0 for name in ("xq", "xs", "actq", "acts"))


def test_native_plan_of_the_shipped_sm90_table() -> None:
    """Qwen3-Next's tuned H200 configs (their T = 1 bucket and tile choices) plan alike in both planners."""
    attrs = ATTRS["qwen3_next"]
    _assert_same_plans(planning_bundle(attrs, "bfloat16", sm=90), attrs, tokens=(1, 2, 8, 64, 512, 4096))
    mixtral = PRESETS["mixtral"]  # its prefill entries group the row blocks (gate_up.GM)
    _assert_same_plans(planning_bundle(mixtral, "bfloat16", sm=90), mixtral, tokens=(1, 64, 512, 4096))


def test_bundle_with_some_buckets_only() -> None:
    attrs = ATTRS["plain"]
    native = NativeBundle(planning_bundle(attrs, "float16", buckets=(16, 64)).to_bytes())
    assert [op["stage"] for op in native.plan(16)["launches"]][:2] == ["router", "topk"]
    with pytest.raises(MoetrtError, match="no token bucket for 65 tokens"):
        native.plan(65)


def test_launch_slots_resolve_every_pointer() -> None:
    """What the launcher hands cuLaunchKernel: inputs, outputs and workspace regions by name, T and host ints
    as i32 in the low bytes, absent inputs as hidden_states, Triton's scratch pointers null."""
    attrs, dtype, t = FULL, "float16", 9
    bundle = planning_bundle(attrs, dtype)
    native = NativeBundle(bundle.to_bytes())
    inputs = [0x10000 * (i + 1) for i in range(len(attrs.present_inputs()))]
    outputs, ws = [0x9000000, 0xA000000], 0xF0000000
    by_name = {**dict(zip(attrs.present_inputs(), inputs)), **dict(zip(attrs.present_outputs(), outputs))}
    ops, layout = plan_from_native(native.plan(t))
    for index, op in enumerate(ops):
        slots = native.launch_slots(t, index, inputs, outputs, ws)
        kernel = bundle.kernels[op.variant_key]
        assert len(slots) == len(kernel.param_types) + SCRATCH_PARAMS
        assert slots[-SCRATCH_PARAMS:] == [0] * SCRATCH_PARAMS
        for (src, ref), value in zip(op.args, slots):
            if src in ("in", "out"):
                assert value == by_name[ref]
            elif src == "ws":
                assert value == ws + layout[ref].offset
            elif src == "T":
                assert value == t
            else:
                assert value == struct.unpack("<I", struct.pack("<i", int(ref)))[0]


def test_launch_slots_point_state_arguments_at_the_state() -> None:
    """A bucket whose router kernel routes takes the ticket at its state offset, past the given state pointer."""
    attrs, dtype = FULL, "float16"
    cfg = tuning.default_config(attrs, dtype, 1)
    cfg["gemv"]["enabled"] = 0
    cfg["topk"]["in_router"] = 1
    native = NativeBundle(planning_bundle(attrs, dtype, configs={1: cfg}, buckets=(1, None)).to_bytes())
    inputs = [0x10000 * (i + 1) for i in range(len(attrs.present_inputs()))]
    ops, _ = plan_from_native(native.plan(1))
    assert ops[0].stage == "router" and ops[1].stage != "topk"
    state = 0xE0000000
    slots = native.launch_slots(1, 0, inputs, [0x9000000, 0xA000000], 0xF0000000, state)
    position = ops[0].args.index(("state", "router_ticket"))
    assert slots[position] == state + plan.STATE_REGIONS["router_ticket"][0]


def test_tma_scratch_fills_tritons_global_scratch_slot() -> None:
    """A TMA grouped GEMM's launch carries tma_scratch past the kernel's parameters: the slot Triton's ABI
    gives the global scratch pointer gets the region, the profile-scratch slot stays null, and the other
    kernels keep both null."""
    attrs, t = FULL, 700
    cfg = tuning.default_config(attrs, "bfloat16", None)
    cfg["gate_up"]["TMA"] = cfg["down"]["TMA"] = 1
    cfg["down"]["BK"] = 16  # I = 48 and the shared expert's 32 in whole tiles (plan.uses_tma)
    bundle = planning_bundle(attrs, "bfloat16", configs={None: cfg}, buckets=(None,))
    native = NativeBundle(bundle.to_bytes())
    inputs = [0x10000 * (i + 1) for i in range(len(attrs.present_inputs()))]
    ws = 0xF0000000
    ops, layout = plan_from_native(native.plan(t))
    assert layout["tma_scratch"].nbytes > 0
    for index, op in enumerate(ops):
        slots = native.launch_slots(t, index, inputs, [0x9000000, 0xA000000], ws)
        params = len(bundle.kernels[op.variant_key].param_types)
        assert len(slots) == params + SCRATCH_PARAMS
        scratch = ws + layout["tma_scratch"].offset if op.stage in ("gate_up", "down_rows") else 0
        assert slots[params:] == [scratch] + [0] * (SCRATCH_PARAMS - 1), op.stage


def test_absent_inputs_resolve_to_hidden_states() -> None:
    attrs, t = ATTRS["plain"], 3
    native = NativeBundle(planning_bundle(attrs, "bfloat16").to_bytes())
    inputs = [0x1000, 0x2000, 0x3000, 0x4000]
    launches = native.plan(t)["launches"]
    for index, op in enumerate(launches):
        slots = native.launch_slots(t, index, inputs, [0x5000], 0x100000)
        for (src, ref), value in zip(op["args"], slots):
            if src == "in":
                assert value == inputs[attrs.present_inputs().index(ref)]
                if ref == "hidden_states":
                    assert value == 0x1000
    router_bias_users = [op for op in launches if ["in", "router_bias"] in op["args"]]
    assert not router_bias_users  # plain has no router bias: its slot names hidden_states instead


def test_slot_count_mismatch_and_index_are_refused() -> None:
    native = NativeBundle(planning_bundle(ATTRS["plain"], "bfloat16").to_bytes())
    with pytest.raises(MoetrtError, match="1 input pointers for 4 inputs") as err:
        native.launch_slots(3, 0, [0x1000], [0x5000], 0x100000)
    assert err.value.hint.startswith("pass them in this order: hidden_states, router_weight")
    with pytest.raises(MoetrtError, match="outside the plan"):
        native.launch_slots(3, 9, [0x1000, 0x2000, 0x3000, 0x4000], [0x5000], 0x100000)


def _header(data: bytes) -> tuple[dict, bytes]:
    start = len(BUNDLE_MAGIC) + 4
    (length,) = struct.unpack("<I", data[len(BUNDLE_MAGIC) : start])
    return json.loads(data[start : start + length]), data[start + length :]


def _with_header(header: dict, blobs: bytes) -> bytes:
    text = json.dumps(header).encode()
    return BUNDLE_MAGIC + struct.pack("<I", len(text)) + text + blobs


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:6], "no moetrt header"),
        (lambda d: b"X" + d[1:], "no moetrt header"),
        (lambda d: d[:40], "truncated"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d[:12] + b"[" + d[13:], "not valid JSON"),
        (
            lambda d: _with_header({**_header(d)[0], "version": 9}, _header(d)[1]),
            f"version 9 is not {BUNDLE_VERSION}",
        ),
        (
            lambda d: _with_header({k: v for k, v in _header(d)[0].items() if k != "inputs"}, _header(d)[1]),
            'lacks "inputs"',
        ),
        (
            lambda d: _with_header(
                {**_header(d)[0], "state": {"bytes": 256, "regions": {"router_ticket": [254, 4]}}},
                _header(d)[1],
            ),
            "state region router_ticket lies outside its 256 bytes",
        ),
        (lambda d: _with_header({**_header(d)[0], "buckets": {}}, _header(d)[1]), "no token bucket"),
    ],
    ids=[
        "short",
        "magic",
        "header-cut",
        "cubin-cut",
        "json",
        "version",
        "no-inputs",
        "state-outside",
        "no-buckets",
    ],
)
def test_damaged_bundles_are_refused(damage, message: str) -> None:
    data = planning_bundle(ATTRS["plain"], "bfloat16").to_bytes()
    with pytest.raises(MoetrtError, match=message):
        NativeBundle(damage(data))


def test_sm_and_token_count_refusals() -> None:
    native = NativeBundle(planning_bundle(ATTRS["plain"], "bfloat16", sm=90).to_bytes())
    assert native.sm == 90 and native.num_inputs == 4 and native.num_outputs == 1
    native.check_sm(90)
    with pytest.raises(MoetrtError, match="bundle is for sm_90, the GPU is sm_89") as err:
        native.check_sm(89)
    assert "moetrt aot --sm 89" in err.value.hint
    with pytest.raises(MoetrtError, match="negative token count"):
        native.workspace_size(-1)


def test_launcher_without_a_driver_says_so() -> None:
    """On a machine without libcuda the launcher refuses in one line; planning above needed no driver."""
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has a CUDA driver")
    native = NativeBundle(planning_bundle(ATTRS["plain"], "bfloat16").to_bytes())
    with pytest.raises(MoetrtError, match="cannot open the CUDA driver"):
        NativeLauncher(native)
