"""The plugin's shape / dtype / format / workspace / enqueue rules (pure functions behind each IPluginV3 method)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest

from moetrt.core.errors import MoetrtError
from moetrt.op.spec import MoEAttributes
from moetrt.trt import io_rules
from moetrt.trt.io_rules import EnqueueCall, TensorDesc

PLAIN = MoEAttributes(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
FULL = MoEAttributes(
    num_experts=16,
    top_k=4,
    hidden_size=64,
    intermediate_size=32,
    scoring="sigmoid",
    has_score_correction_bias=True,
    has_router_bias=True,
    has_expert_bias=True,
    shared_intermediate_size=16,
    has_shared_gate=True,
    output_router_logits=True,
)


@dataclass(frozen=True)
class Expr:
    """A symbolic dimension expression, like TensorRT's IDimensionExpr: a name, a constant or an operation."""

    text: str

    def __str__(self) -> str:
        return self.text


class SymbolicBuilder:
    """IExprBuilder stand-in: builds readable expressions so the test sees exactly what the rule asked for."""

    def constant(self, value: int) -> Expr:
        return Expr(str(value))

    def operation(self, op: str, first: Expr, second: Expr) -> Expr:
        return Expr(f"{op}({first},{second})")


def _input_dims(attrs: MoEAttributes, tokens: Any) -> list[list[Any]]:
    return [
        [tokens if d == "T" else Expr(str(d)) for d in shape] for shape in attrs.input_shapes("T").values()
    ]


def test_output_shapes_keep_the_dynamic_token_dim() -> None:
    tokens = Expr("T")
    shapes = io_rules.output_shapes(PLAIN, _input_dims(PLAIN, tokens), SymbolicBuilder())
    assert [[str(d) for d in s] for s in shapes] == [["T", "64"]]
    shapes = io_rules.output_shapes(FULL, _input_dims(FULL, tokens), SymbolicBuilder())
    assert [[str(d) for d in s] for s in shapes] == [["T", "64"], ["T", "16"]]
    assert shapes[0][0] is tokens  # passed through, not re-derived


def test_output_shapes_of_batch_seq_hidden() -> None:
    dims = _input_dims(FULL, Expr("T"))
    dims[0] = [Expr("B"), Expr("S"), Expr("64")]
    shapes = io_rules.output_shapes(FULL, dims, SymbolicBuilder())
    assert [[str(d) for d in s] for s in shapes] == [["B", "S", "64"], ["B", "S", "16"]]
    assert str(io_rules.num_tokens_expr(dims[0], SymbolicBuilder())) == "PROD(B,S)"
    assert io_rules.num_tokens((3, 5, 64)) == 15 and io_rules.num_tokens((7, 64)) == 7


def test_wrong_input_count_is_refused() -> None:
    with pytest.raises(MoetrtError, match="got 3 inputs"):
        io_rules.output_shapes(PLAIN, _input_dims(PLAIN, Expr("T"))[:3], SymbolicBuilder())


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_output_dtypes_follow_hidden_states(dtype: str) -> None:
    assert io_rules.output_dtypes(PLAIN, [dtype] * 4) == [dtype]
    assert io_rules.output_dtypes(FULL, [dtype] * len(FULL.present_inputs())) == [dtype, dtype]


def test_check_input_dims() -> None:
    shapes = [list(s) for s in PLAIN.input_shapes(-1).values()]
    io_rules.check_input_dims(PLAIN, shapes)  # -1 = dynamic is fine
    shapes[2][1] = 33  # gate_up rows must be 2 * I = 64
    with pytest.raises(MoetrtError, match="expert_gate_up_weight"):
        io_rules.check_input_dims(PLAIN, shapes)


DTYPES = ["fp32", "fp16", "bf16", "int8", "int32"]
FORMATS = ["LINEAR", "CHW32"]


def _expected(pos: int, in_out: list[tuple[str, str]]) -> bool:
    dtype, fmt = in_out[pos]
    if fmt != "LINEAR":
        return False
    return dtype in ("fp32", "fp16", "bf16") if pos == 0 else dtype == in_out[0][0]


def test_supports_format_combination_truth_table() -> None:
    num_inputs = len(PLAIN.present_inputs())
    slots = num_inputs + 1
    combos = list(itertools.product(itertools.product(DTYPES, FORMATS), repeat=2))
    accepted = 0
    for first, other in combos:
        for pos in range(slots):
            in_out = [first] + [other] * (slots - 1)
            got = io_rules.supports_format_combination(PLAIN, pos, in_out, num_inputs)
            assert got == _expected(pos, in_out), (pos, in_out)
            accepted += got
    assert accepted > 0
    # Whole combinations TensorRT may pick: all linear, one float dtype.
    for dtype in ("fp32", "fp16", "bf16"):
        in_out = [(dtype, "LINEAR")] * slots
        assert all(io_rules.supports_format_combination(PLAIN, p, in_out, num_inputs) for p in range(slots))
    mixed = [("fp16", "LINEAR")] * slots
    mixed[-1] = ("fp32", "LINEAR")
    assert not io_rules.supports_format_combination(PLAIN, slots - 1, mixed, num_inputs)
    # Wrong arity or position: never supported.
    assert not io_rules.supports_format_combination(PLAIN, 0, [("fp16", "LINEAR")] * slots, num_inputs + 1)
    assert not io_rules.supports_format_combination(PLAIN, slots, [("fp16", "LINEAR")] * slots, num_inputs)


class RecordingLauncher:
    """Stands in for MoELauncher: records what the plugin would launch (the GPU test uses the real one)."""

    def __init__(self, bytes_per_token: int = 1024) -> None:
        self.bytes_per_token = bytes_per_token
        self.calls: list[tuple[Any, ...]] = []
        self.sizes: list[int] = []

    def workspace_size(self, num_tokens: int) -> int:
        self.sizes.append(num_tokens)
        return 4096 + self.bytes_per_token * num_tokens

    def enqueue(self, *args: Any) -> None:
        self.calls.append(args)


def test_workspace_uses_the_profile_max_tokens() -> None:
    launcher = RecordingLauncher()
    assert io_rules.workspace_size(launcher, (4096, 64)) == 4096 + 1024 * 4096
    assert io_rules.workspace_size(launcher, (4, 512, 64)) == 4096 + 1024 * 2048
    assert launcher.sizes == [4096, 2048]


def test_workspace_covers_every_bucket_of_the_profile() -> None:
    class BucketedLauncher(RecordingLauncher):
        # Decode buckets (<= 64 tokens) pad to wide blocks: 64 tokens need more than 100 do.
        def workspace_size(self, num_tokens: int) -> int:
            self.sizes.append(num_tokens)
            return 50_000 if num_tokens <= 64 else 100 * num_tokens

    launcher = BucketedLauncher()
    bounds = (16, 64, 512, None)
    assert io_rules.workspace_size(launcher, (100, 64), (1, 64), bounds) == 50_000
    assert launcher.sizes == [16, 64, 100]
    assert io_rules.workspace_size(launcher, (4096, 64), (1, 64), bounds) == 409_600
    # A profile above the decode buckets never asks for them.
    launcher.sizes.clear()
    assert io_rules.workspace_size(launcher, (1000, 64), (128, 64), bounds) == 100_000
    assert launcher.sizes == [512, 1000]


def _descs(attrs: MoEAttributes, tokens: int, dtype: str) -> tuple[list[TensorDesc], list[TensorDesc]]:
    inputs = [
        TensorDesc(tuple(tokens if d == "T" else d for d in shape), dtype)
        for shape in attrs.input_shapes("T").values()
    ]
    outputs = [TensorDesc((tokens, attrs.hidden_size), dtype)]
    if attrs.output_router_logits:
        outputs.append(TensorDesc((tokens, attrs.num_experts), dtype))
    return inputs, outputs


@pytest.mark.parametrize("attrs", [PLAIN, FULL], ids=["plain", "full"])
def test_enqueue_maps_tensorrt_arguments_in_order(attrs: MoEAttributes) -> None:
    in_descs, out_descs = _descs(attrs, 37, "bf16")
    in_ptrs = [0x1000 * (i + 1) for i in range(len(in_descs))]
    out_ptrs = [0x9000 * (i + 1) for i in range(len(out_descs))]
    call = io_rules.enqueue_call(attrs, "bf16", in_descs, out_descs, in_ptrs, out_ptrs, 0xABC000, 0x77)
    assert call == EnqueueCall(37, tuple(in_ptrs), tuple(out_ptrs), 0xABC000, 0x77)
    launcher = RecordingLauncher()
    io_rules.enqueue(launcher, call)
    assert launcher.calls == [(37, in_ptrs, out_ptrs, 0xABC000, 0x77)]


def test_enqueue_with_zero_tokens_launches_nothing() -> None:
    in_descs, out_descs = _descs(PLAIN, 0, "fp16")
    call = io_rules.enqueue_call(PLAIN, "fp16", in_descs, out_descs, [1] * 4, [2], 3, 4)
    launcher = RecordingLauncher()
    io_rules.enqueue(launcher, call)
    assert call is None and launcher.calls == []


def test_enqueue_refusals() -> None:
    in_descs, out_descs = _descs(PLAIN, 5, "fp16")
    with pytest.raises(MoetrtError, match="built for fp16"):
        io_rules.enqueue_call(
            PLAIN, "fp16", [TensorDesc((5, 64), "fp32"), *in_descs[1:]], out_descs, [1] * 4, [2], 3, 4
        )
    with pytest.raises(MoetrtError, match="null tensor pointer"):
        io_rules.enqueue_call(PLAIN, "fp16", in_descs, out_descs, [1, 0, 1, 1], [2], 3, 4)
    with pytest.raises(MoetrtError, match="outputs"):
        io_rules.enqueue_call(PLAIN, "fp16", in_descs, out_descs, [1] * 4, [2, 3], 3, 4)
    with pytest.raises(MoetrtError, match="hidden size"):
        io_rules.enqueue_call(
            PLAIN, "fp16", [TensorDesc((5, 63), "fp16"), *in_descs[1:]], out_descs, [1] * 4, [2], 3, 4
        )


@pytest.mark.parametrize(
    ("weight_format", "block", "zero", "scale_dtype"),
    [("int4", 16, True, "fp32"), ("fp8_block", 16, False, "fp32"), ("mxfp4", 32, False, "uint8")],
)
def test_quantized_experts_take_their_stored_types(
    weight_format: str, block: int, zero: bool, scale_dtype: str
) -> None:
    """Quantized experts' codes and zero points are uint8, scales float32 (e8m0 bytes for mxfp4); TensorRT must
    bind exactly those, and everything else in the activations' dtype."""
    attrs = MoEAttributes(
        8, 2, 64, 32, shared_intermediate_size=32, weight_format=weight_format, weight_block=block,
        has_weight_zero_point=zero,
    )  # fmt: skip
    names = attrs.present_inputs()
    want = {"expert_gate_up_weight": "uint8", "expert_down_weight": "uint8"}
    want |= {"expert_gate_up_scale": scale_dtype, "expert_down_scale": scale_dtype}
    if zero:
        want |= {"expert_gate_up_zero": "uint8", "expert_down_zero": "uint8"}
    in_out = [(want.get(name, "bf16"), "LINEAR") for name in names] + [("bf16", "LINEAR")]
    assert [io_rules.expected_dtype(attrs, p, "bf16") for p in range(len(in_out))] == [d for d, _ in in_out]
    assert all(io_rules.supports_format_combination(attrs, p, in_out, len(names)) for p in range(len(in_out)))
    codes = names.index("expert_gate_up_weight")
    wrong = list(in_out)
    wrong[codes] = ("bf16", "LINEAR")  # codes bound as activations: refused
    assert not io_rules.supports_format_combination(attrs, codes, wrong, len(names))
    shared = names.index("shared_gate_up_weight")  # the shared expert stays native
    wrong = list(in_out)
    wrong[shared] = ("uint8", "LINEAR")
    assert not io_rules.supports_format_combination(attrs, shared, wrong, len(names))
    descs = [
        TensorDesc(tuple(5 if d == "T" else d for d in shape), want.get(name, "bf16"))
        for name, shape in attrs.input_shapes("T").items()
    ]
    out_descs = [TensorDesc((5, 64), "bf16")]
    ptrs = [16 * (i + 1) for i in range(len(descs))]
    call = io_rules.enqueue_call(attrs, "bf16", descs, out_descs, ptrs, [4096], 8192, 0)
    assert call is not None and call.input_ptrs == tuple(ptrs)
    bad = list(descs)
    bad[codes] = TensorDesc(bad[codes].dims, "bf16")
    with pytest.raises(MoetrtError, match="built for bf16"):
        io_rules.enqueue_call(attrs, "bf16", bad, out_descs, ptrs, [4096], 8192, 0)
