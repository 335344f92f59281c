"""GPU: the AOT cubins through the CUDA-driver launcher against the PyTorch oracle (run with pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from moetrt.core.devices import current_sm
from moetrt.core.dtypes import kernel_name_of
from moetrt.core.errors import MoetrtError
from moetrt.core.tolerances import tolerance
from moetrt.op.presets import like
from moetrt.op.reference import moe_reference, random_inputs
from moetrt.op.spec import MoEAttributes

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

VARIANTS = {
    "softmax_renorm_shared_gate": like(
        "qwen3_next", 64, 6, 256, 128, shared_intermediate_size=96, output_router_logits=True
    ),
    "deepseek_grouped": like("deepseek_v3", 64, 6, 256, 128, n_group=8, topk_group=3),
    "gpt_oss": like("gpt_oss_20b", 16, 4, 192, 160),
    "gelu_tanh": MoEAttributes(8, 2, 128, 96, activation="gelu_tanh_glu"),
}
CASES = [(name, torch.bfloat16) for name in VARIANTS] + [
    ("softmax_renorm_shared_gate", torch.float16),
    ("softmax_renorm_shared_gate", torch.float32),
    ("gpt_oss", torch.float32),
]


def _bundle(attrs: MoEAttributes, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from moetrt.kernels.torch_ops import _cached_bundle

    return _cached_bundle(attrs, kernel_name_of(dtype), current_sm())


@pytest.mark.parametrize(("variant", "dtype"), CASES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 65, 300])
def test_launcher_matches_reference(variant: str, dtype: torch.dtype, num_tokens: int) -> None:
    from moetrt.kernels.torch_ops import moe_forward

    attrs = VARIANTS[variant]
    inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens, skew=0.0)
    outputs = {
        name: torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        for name, shape in [
            ("output", (num_tokens, attrs.hidden_size)),
            ("router_logits", (num_tokens, attrs.num_experts)),
        ]
        if name in attrs.present_outputs()
    }
    got = moe_forward(inputs, attrs, _bundle(attrs, dtype), outputs=outputs)
    ref = moe_reference({k: v.cpu() for k, v in inputs.items()}, attrs, compute_dtype=torch.float64)
    for name in attrs.present_outputs():
        g, r = got[name].double().cpu(), ref[name].double()
        assert not torch.isnan(g).any(), f"{name} has NaN (unwritten elements)"
        rel = ((g - r).norm() / r.norm()).item()
        assert rel <= tolerance(dtype), f"{name}: rel err {rel:.2e}"


def test_skewed_routing_and_empty_input() -> None:
    from moetrt.kernels.torch_ops import moe_forward

    attrs = VARIANTS["softmax_renorm_shared_gate"]
    inputs = random_inputs(attrs, 200, dtype=torch.bfloat16, device="cuda", seed=3, skew=8.0)
    got = moe_forward(inputs, attrs, _bundle(attrs, torch.bfloat16))["output"].double().cpu()
    ref = moe_reference({k: v.cpu() for k, v in inputs.items()}, attrs, torch.float64)["output"].double()
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-2
    empty = random_inputs(attrs, 0, dtype=torch.bfloat16, device="cuda")
    assert moe_forward(empty, attrs, _bundle(attrs, torch.bfloat16))["output"].shape == (0, attrs.hidden_size)


def test_launcher_rejects_bad_pointer_lists() -> None:
    from moetrt.kernels.launcher import MoELauncher

    attrs = VARIANTS["gelu_tanh"]
    launcher = MoELauncher(_bundle(attrs, torch.bfloat16), attrs)
    with pytest.raises(MoetrtError, match="input pointers"):
        launcher.enqueue(4, [0], [0], 0, 0)


def _poisoned_outputs(attrs: MoEAttributes, num_tokens: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Output buffers filled with NaN: an element the kernels never write shows up in the comparison."""
    out = {"output": torch.full((num_tokens, attrs.hidden_size), float("nan"), dtype=dtype, device="cuda")}
    if attrs.output_router_logits:
        out["router_logits"] = torch.full(
            (num_tokens, attrs.num_experts), float("nan"), dtype=dtype, device="cuda"
        )
    return out


def _assert_matches_reference(
    got: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    attrs: MoEAttributes,
    dtype: torch.dtype,
    label: str,
) -> None:
    """Every output without NaN and within the dtype's tolerance of the float64 oracle on the same inputs."""
    ref = moe_reference({k: v.cpu() for k, v in inputs.items()}, attrs, compute_dtype=torch.float64)
    for key in attrs.present_outputs():
        g, r = got[key].double().cpu(), ref[key].double()
        assert not torch.isnan(g).any(), f"{key} has NaN"
        rel = ((g - r).norm() / r.norm()).item()
        assert rel <= tolerance(dtype), f"{label} {key}: rel err {rel:.2e}"


@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mxfp4_tiles_across_scale_groups_match_reference(bk: int, dtype: torch.dtype) -> None:
    """mxfp4 decode tiles wider than a scale group (gate_up and down BK of 2 or 4 groups): bf16 folds each group's
    scale into the decoder (triton_common.mxfp4_tile_bf16), fp16 dequantizes in float32; through the launcher
    against the oracle on the same dequantized weights."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.op.presets import like

    attrs = like(
        "qwen3_next", 32, 4, 256, 128, shared_intermediate_size=64, weight_format="mxfp4", weight_block=32
    )
    name = kernel_name_of(dtype)
    configs = {}
    for bound in (1, 16, 64):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["gate_up"].update({"BK": bk, "SK": 1})
        cfg["down"]["BK"] = bk
        cfg["dequant"]["per_weight"] = 0
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(1, 16, 64), configs=configs, workers=8)
    for num_tokens in (1, 9, 64):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, dtype))
        _assert_matches_reference(got, inputs, attrs, dtype, f"mxfp4 BK {bk} T={num_tokens}")


@pytest.mark.parametrize("in_router", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_gate_column_matches_reference(dtype: torch.dtype, in_router: int) -> None:
    """The router's shared gate in a column of programs of its own (`router.GATE_COL`) through the AOT launcher,
    in every bucket (the router split over H at decode), with the routing router kernel's ticket counting the
    column's programs (in_router), against the oracle; NaN-poisoned outputs show an unwritten gate."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels import plan
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    attrs = VARIANTS["softmax_renorm_shared_gate"]
    name = kernel_name_of(dtype)
    configs = {}
    for bound in plan.BUCKETS:
        cfg = tuning.default_config(attrs, name, bound, sm=current_sm())
        cfg["router"]["GATE_COL"] = 1
        cfg["topk"]["in_router"] = in_router
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), configs=configs, workers=8)
    for num_tokens in (1, 7, 64, 300):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, dtype))
        _assert_matches_reference(got, inputs, attrs, dtype, f"GATE_COL T={num_tokens} in_router={in_router}")


@pytest.mark.parametrize(
    ("weight_format", "block", "down_warps"), [("int4", 32, 8), ("mxfp4", 32, 8), ("int4", 128, 4)]
)
def test_prefill_tiles_dequantized_per_weight_match_reference(
    weight_format: str, block: int, down_warps: int
) -> None:
    """4-bit prefill tiles dequantized per weight and multiplied weights first (wgmma takes the tile from
    registers), as the H200 table's T = 4096 entries of Qwen3-30B: gate_up 128 x 128 x 64, down rows 128 x 64, at
    Qwen3-30B's width, against the oracle on the same dequantized weights. Across scale groups at 4 warps (128
    rows a warp group) these wrote NaN; the plan refuses that (plan.check_weights_first_rows), and a tile inside
    one group of 128 is right at 4 warps."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.op.presets import like

    attrs = like("qwen3_30b", 16, 4, 2048, 768, weight_format=weight_format, weight_block=block)
    name = kernel_name_of(torch.bfloat16)
    cfg = tuning.default_config(attrs, name, None, sm=current_sm())
    cfg["gate_up"].update({"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3, "SK": 1})
    cfg["down"].update({"BH": 128, "BK": 64, "num_warps": down_warps, "num_stages": 4})
    cfg["dequant"]["per_weight"] = 1
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(None,), configs={None: cfg}, workers=8)
    for num_tokens in (300, 700):
        inputs = random_inputs(attrs, num_tokens, dtype=torch.bfloat16, device="cuda", seed=num_tokens)
        got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, torch.bfloat16))
        _assert_matches_reference(got, inputs, attrs, torch.bfloat16, f"{weight_format} T={num_tokens}")


@pytest.mark.parametrize("variant", ["softmax_renorm_shared_gate", "gpt_oss", "deepseek_grouped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_decode_path_matches_reference(variant: str, dtype: torch.dtype) -> None:
    """The decode buckets with the fused experts kernel (a tuning candidate) through the launcher."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    attrs = VARIANTS[variant]
    name = kernel_name_of(dtype)
    configs = {}
    for bound in (16, 64):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["fused"] = {"enabled": 1, "BH": 32 if dtype == torch.float32 else 64}
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(16, 64), configs=configs, workers=8)
    assert "experts" in bundle.buckets["16"]["variants"]
    for num_tokens in (1, 7, 64):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        out = _poisoned_outputs(attrs, num_tokens, dtype)
        got = moe_forward(inputs, attrs, bundle, outputs=out)
        _assert_matches_reference(got, inputs, attrs, dtype, f"T={num_tokens}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_activations_match_reference(dtype: torch.dtype) -> None:
    """fp8 activations: x and the activation quantized per token and 128-block, e4m3 x e4m3 on the tensor
    cores, against the oracle that quantizes alike (op.reference), decode and prefill, split gate_up too."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.op.presets import like

    attrs = like(
        "qwen3_next", 32, 4, 256, 256, shared_intermediate_size=64, weight_format="fp8_block",
        weight_block=128, activation_format="fp8_block",
    )  # fmt: skip
    name = kernel_name_of(dtype)
    split = tuning.default_config(attrs, name, 16)
    split["gate_up"]["SK"] = 2
    for configs in (None, {16: split}):
        bundle = compile_kernels(attrs, name, current_sm(), configs=configs, workers=8)
        for num_tokens in (1, 9, 64, 300):
            inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
            got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, dtype))
            _assert_matches_reference(got, inputs, attrs, dtype, f"fp8 activations T={num_tokens}")


@pytest.mark.parametrize("weights", ["native", "fp8_block", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pdl", [0, 1])
def test_split_gate_up_matches_reference(weights: str, dtype: torch.dtype, pdl: int) -> None:
    """Decode buckets with gate_up split over H (`gate_up.SK`, a tuning candidate): partial sums, a ticket per
    tile, the last split applies the activation; under PDL too, against the oracle."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.op.presets import like

    quantized = {} if weights == "native" else {"weight_format": weights, "weight_block": 32}
    attrs = like("qwen3_next", 64, 6, 256, 128, shared_intermediate_size=96, **quantized)
    name = kernel_name_of(dtype)
    configs = {}
    for bound, sk in ((1, 4), (16, 2), (64, 4)):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["gate_up"].update({"SK": sk, "BK": 32})
        cfg["pdl"] = {"enabled": pdl}
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(1, 16, 64), configs=configs, workers=8)
    one = bundle.buckets["1"]
    assert one["constexprs"][one["variants"]["gate_up"]]["SK"] == 4
    for num_tokens in (1, 2, 16, 64):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        for _ in range(2):  # twice: the tickets are zeroed by each call's router kernel
            out = _poisoned_outputs(attrs, num_tokens, dtype)
            got = moe_forward(inputs, attrs, bundle, outputs=out)
            _assert_matches_reference(got, inputs, attrs, dtype, f"{weights} SK T={num_tokens}")


@pytest.mark.parametrize("weights", ["native", "fp8_block", "int4", "mxfp4"])
@pytest.mark.parametrize("fused", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_routed_path_matches_reference(weights: str, fused: int, dtype: torch.dtype) -> None:
    """The routed decode path (routing, gate_up and down in one launch after the router; H-tile units that wait
    for their token's gate_up units, or the fused form's atomics) through the launcher, with PDL on SM90+ and
    back-to-back calls (the unit counters are zeroed by each call's router kernel), against the oracle."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels import plan
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.op.presets import like

    quantized = {} if weights == "native" else {"weight_format": weights, "weight_block": 32}
    attrs = like("qwen3_next", 64, 6, 256, 128, shared_intermediate_size=96, **quantized)
    name = kernel_name_of(dtype)
    configs = {}
    for bound in (1, 16):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["routed"].update({"enabled": 1, "fused": fused, "BN": 32, "BK": 32, "BH": 32, "BKD": 32})
        cfg["pdl"] = {"enabled": int(torch.cuda.get_device_capability()[0] >= 9)}
        configs[bound] = cfg
    assert plan.routed_fused(attrs, configs[1]) == bool(fused)
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(1, 16), configs=configs, workers=8)
    assert "routed_experts" in bundle.buckets["1"]["variants"]
    for num_tokens in (1, 2, 9, 16):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        for _ in range(2):
            out = _poisoned_outputs(attrs, num_tokens, dtype)
            got = moe_forward(inputs, attrs, bundle, outputs=out)
            _assert_matches_reference(got, inputs, attrs, dtype, f"{weights} routed T={num_tokens}")


@pytest.mark.parametrize("weights", ["native", "fp8_block", "int4", "mxfp4"])
@pytest.mark.parametrize("fused", [0, 1])
@pytest.mark.parametrize("pdl", [0, 1, 2])
def test_routing_in_the_router_matches_reference(weights: str, fused: int, pdl: int) -> None:
    """The router kernel's last program routing (topk.in_router: no top-k launch) through the launcher: many
    calls in a row on new inputs (the per-stream ticket must be zero at each call's start), two streams, and a
    CUDA graph replayed on new inputs (captured after one call on its stream; a first call under capture is
    refused in one line)."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels import plan
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs SM90+")
    if fused and weights != "native":
        pytest.skip("the fused experts kernel takes native weights")
    quantized = {} if weights == "native" else {"weight_format": weights, "weight_block": 32}
    attrs = like(
        "qwen3_next", 64, 6, 256, 128, shared_intermediate_size=96, output_router_logits=True, **quantized
    )
    dtype = torch.bfloat16
    cfg = tuning.default_config(attrs, "bfloat16", 1)
    cfg["gemv"]["enabled"] = cfg["routed"]["enabled"] = 0
    cfg["topk"]["in_router"] = 1
    cfg["fused"] = {"enabled": fused, "BH": 64}
    cfg["pdl"] = {"enabled": pdl}
    assert plan.routes_in_router(attrs, cfg, 1)
    bundle = compile_kernels(attrs, "bfloat16", current_sm(), buckets=(1,), configs={1: cfg}, workers=8)
    assert "topk" not in bundle.buckets["1"]["variants"]
    side = torch.cuda.Stream()
    for seed in range(6):
        inputs = random_inputs(attrs, 1, dtype=dtype, device="cuda", seed=seed)
        with torch.cuda.stream(side if seed % 2 else torch.cuda.current_stream()):
            got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, 1, dtype))
        torch.cuda.synchronize()
        _assert_matches_reference(got, inputs, attrs, dtype, f"{weights} in_router call {seed}")

    inputs = random_inputs(attrs, 1, dtype=dtype, device="cuda", seed=100)
    out = _poisoned_outputs(attrs, 1, dtype)
    with torch.cuda.stream(side):
        moe_forward(inputs, attrs, bundle, outputs=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        moe_forward(inputs, attrs, bundle, outputs=out)
    for seed in range(101, 105):
        fresh = random_inputs(attrs, 1, dtype=dtype, device="cuda", seed=seed)
        inputs["hidden_states"].copy_(fresh["hidden_states"])
        out["output"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_reference(out, inputs, attrs, dtype, f"{weights} in_router replay {seed}")

    capture = torch.cuda.graph(torch.cuda.CUDAGraph(), stream=torch.cuda.Stream())
    with pytest.raises(MoetrtError, match="being captured"), capture:
        moe_forward(inputs, attrs, bundle, outputs=out)


@pytest.mark.parametrize("block_rows", [32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_wide_decode_blocks_match_reference(block_rows: int, dtype: torch.dtype) -> None:
    """Decode buckets with 32- or 64-row expert blocks (configs.WIDE_DECODE_GATE_UP: few experts, many tokens
    each) through the launcher: random routing, and skewed routing that puts more rows on one expert than a
    block holds, with PDL on SM90+, against the oracle."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    attrs = like("mixtral", 8, 2, 256, 512)
    name = kernel_name_of(dtype)
    configs = {}
    for bound in (16, 64):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["gate_up"].update({"BM": block_rows, "BN": 64, "BK": 64 if dtype == torch.float32 else 128})
        cfg["pdl"] = {"enabled": int(torch.cuda.get_device_capability()[0] >= 9)}
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(16, 64), configs=configs, workers=8)
    for num_tokens, skew in ((9, 0.0), (40, 0.0), (64, 0.0), (64, 8.0), (33, 8.0)):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens, skew=skew)
        got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, dtype))
        _assert_matches_reference(got, inputs, attrs, dtype, f"BM {block_rows} T={num_tokens} skew={skew}")


@pytest.mark.parametrize(
    ("weight_format", "block", "zero"),
    [
        ("fp8_block", 16, False),
        ("int4", 16, True),
        ("int4", 32, True),
        ("int4", 32, False),
        ("mxfp4", 32, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantized_experts_match_reference(
    weight_format: str, block: int, zero: bool, dtype: torch.dtype
) -> None:
    """Quantized routed experts through the launcher (dequantized in the GEMM loops) against the oracle on the
    same dequantized weights, at decode and prefill token counts, the shared expert native."""
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward
    from moetrt.op.presets import like

    attrs = like(
        "qwen3_next", 32, 4, 128, 64, shared_intermediate_size=64, weight_format=weight_format,
        weight_block=block, has_weight_zero_point=zero,
    )  # fmt: skip
    bundle = compile_kernels(attrs, kernel_name_of(dtype), current_sm(), workers=8)
    for num_tokens in (1, 9, 64, 300, 1000):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, dtype))
        _assert_matches_reference(got, inputs, attrs, dtype, f"{weight_format} T={num_tokens}")


@pytest.mark.parametrize("variant", ["softmax_renorm_shared_gate", "gpt_oss", "deepseek_grouped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pdl", [0, 1])
def test_expert_group_path_matches_reference(variant: str, dtype: torch.dtype, pdl: int) -> None:
    """The expert-group (gemv) decode path through the launcher, with the fused switch also on (the group path
    must win), back-to-back calls (its shared-expert programs start before the routing under PDL)."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs SM90+")
    attrs = VARIANTS[variant]
    name = kernel_name_of(dtype)
    configs = {}
    for bound in (1, 16):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["gemv"]["enabled"] = 1
        cfg["fused"]["enabled"] = 1
        cfg["pdl"] = {"enabled": pdl}
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(1, 16), configs=configs, workers=8)
    assert "gemv_gate_up" in bundle.buckets["1"]["variants"]  # stage -> variant key
    for num_tokens in (1, 2, 9, 16):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens)
        out = _poisoned_outputs(attrs, num_tokens, dtype)
        for _ in range(3):
            got = moe_forward(inputs, attrs, bundle, outputs=out)
        _assert_matches_reference(got, inputs, attrs, dtype, f"T={num_tokens}")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9, reason="SM90+")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", [1, 2])
def test_programmatic_dependent_launch_matches_reference(fused: bool, mode: int) -> None:
    """Every bucket launched with programmatic stream serialization (cuLaunchKernelEx + griddepcontrol), the
    next kernel launched at once (mode 1) or as the programs exit (mode 2)."""
    from moetrt.kernels import configs as tuning
    from moetrt.kernels import plan
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward

    attrs = VARIANTS["softmax_renorm_shared_gate"]
    configs = {}
    for bound in plan.BUCKETS:
        cfg = tuning.default_config(attrs, "bfloat16", bound)
        cfg["pdl"] = {"enabled": mode}
        cfg["fused"] = {"enabled": int(fused), "BH": 64}
        configs[bound] = cfg
    bundle = compile_kernels(attrs, "bfloat16", current_sm(), configs=configs, workers=8)
    for num_tokens in (1, 30, 200, 700):
        inputs = random_inputs(attrs, num_tokens, dtype=torch.bfloat16, device="cuda", seed=num_tokens)
        out = {
            "output": torch.full(
                (num_tokens, attrs.hidden_size), float("nan"), dtype=torch.bfloat16, device="cuda"
            ),
            "router_logits": torch.full(
                (num_tokens, attrs.num_experts), float("nan"), dtype=torch.bfloat16, device="cuda"
            ),
        }
        for _ in range(3):  # back-to-back calls: each call's first kernel overlaps the previous call's last
            got = moe_forward(inputs, attrs, bundle, outputs=out)
        ref = moe_reference({k: v.cpu() for k, v in inputs.items()}, attrs, compute_dtype=torch.float64)
        for key in attrs.present_outputs():
            g, r = got[key].double().cpu(), ref[key].double()
            assert not torch.isnan(g).any(), f"{key} has NaN"
            assert ((g - r).norm() / r.norm()).item() <= 1e-2, f"T={num_tokens} {key}"


@pytest.mark.parametrize("variant", ["softmax_renorm_shared_gate", "gpt_oss", "deepseek_grouped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("pdl", "persist"),
    [(0, 0), (1, 0), (1, 7), (1, 1_000_000)],
    ids=["", "pdl", "pdl-persist", "pdl-persist-wide"],
)
def test_tma_grouped_gemms_match_reference(variant: str, dtype: torch.dtype, pdl: int, persist: int) -> None:
    """gate_up and down_rows with their tiles by TMA (descriptors built on the device in the tma_scratch region,
    plan.uses_tma), prefill and sorted decode buckets, row blocks grouped, with and without PDL, and with 7
    persistent programs looping over the prefill tiles (plan.persistent_programs), or with more asked than there
    are tiles, which both launchers cut to one per SM (plan.device_grid), through the AOT launcher, and
    through Triton's JIT launcher (its own scratch allocator), against the oracle; random and skewed routing."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs SM 9.0 or later")
    from moetrt.kernels import configs as tuning
    from moetrt.kernels import plan
    from moetrt.kernels.aot import compile_kernels
    from moetrt.kernels.torch_ops import moe_forward, moe_forward_triton

    attrs = VARIANTS[variant]
    name = kernel_name_of(dtype)
    configs = {}
    for bound in (16, 512, None):
        cfg = tuning.default_config(attrs, name, bound)
        cfg["gemv"]["enabled"] = 0
        cfg["gate_up"].update({"TMA": 1, "GM": 2})
        cfg["down"]["TMA"] = 1
        cfg["down"]["BK"] = 32
        cfg["gate_up"]["PERSIST"] = cfg["down"]["PERSIST"] = persist
        cfg["pdl"] = {"enabled": pdl}
        assert plan.uses_tma(attrs, name, cfg, bound, "gate_up") and plan.uses_tma(
            attrs, name, cfg, bound, "down_rows"
        )
        configs[bound] = cfg
    bundle = compile_kernels(attrs, name, current_sm(), buckets=(16, 512, None), configs=configs, workers=8)
    for num_tokens, skew in ((5, 0.0), (300, 0.0), (300, 8.0), (1500, 0.0)):
        inputs = random_inputs(attrs, num_tokens, dtype=dtype, device="cuda", seed=num_tokens, skew=skew)
        got = moe_forward(inputs, attrs, bundle, outputs=_poisoned_outputs(attrs, num_tokens, dtype))
        _assert_matches_reference(got, inputs, attrs, dtype, f"TMA T={num_tokens} skew={skew} pdl={pdl}")
        if (not pdl or persist) and dtype == torch.bfloat16:  # the JIT path (it compiles on the GPU host)
            bound = plan.bucket_of(num_tokens)
            jit = moe_forward_triton(inputs, attrs, config=configs[bound])
            _assert_matches_reference(jit, inputs, attrs, dtype, f"TMA (JIT) T={num_tokens} skew={skew}")
