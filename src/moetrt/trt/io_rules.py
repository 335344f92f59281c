"""The plugin's shape, dtype, format, workspace and enqueue rules as pure functions (no TensorRT import).

Each `IPluginV3` method in `plugin.py` converts TensorRT's objects to the plain values used here and calls one
function of this module, so every rule is tested on a CPU machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from moetrt.core.errors import MoetrtError
from moetrt.op.spec import MoEAttributes, stored_dtype_name
from moetrt.trt.fields import IO_DTYPES

LINEAR = "LINEAR"


class ExprBuilder(Protocol):
    """The part of `trt.IExprBuilder` the shape rule uses (dimension expressions stay opaque)."""

    def constant(self, value: int) -> Any: ...

    def operation(self, op: str, first: Any, second: Any) -> Any: ...


@dataclass(frozen=True)
class TensorDesc:
    """A tensor as the plugin sees it at enqueue: concrete dims, dtype name (fp32/fp16/bf16/...), format."""

    dims: tuple[int, ...]
    dtype: str
    format: str = LINEAR


@dataclass(frozen=True)
class EnqueueCall:
    """The launcher's arguments: `MoELauncher.enqueue(num_tokens, input_ptrs, output_ptrs, workspace, stream)`."""

    num_tokens: int
    input_ptrs: tuple[int, ...]
    output_ptrs: tuple[int, ...]
    workspace_ptr: int
    stream: int


def num_outputs(attrs: MoEAttributes) -> int:
    return len(attrs.present_outputs())


def output_dtypes(attrs: MoEAttributes, input_dtypes: Sequence[str]) -> list[str]:
    """Every output has the dtype of hidden_states (the weights share it; see spec)."""
    _check_input_count(attrs, len(input_dtypes))
    return [input_dtypes[0]] * num_outputs(attrs)


def output_shapes(
    attrs: MoEAttributes, input_dims: Sequence[Sequence[Any]], builder: ExprBuilder
) -> list[list[Any]]:
    """Output dim expressions from input dim expressions: output = hidden's dims; router_logits = [..., E].

    Leading (token) dims pass through as TensorRT's expressions, so a dynamic token count stays dynamic.
    """
    _check_input_count(attrs, len(input_dims))
    hidden = list(input_dims[0])
    if len(hidden) < 2:
        raise MoetrtError(
            f"MoE hidden_states must be [T, H] (or [B, S, H]), got rank {len(hidden)}", "re-fuse the model"
        )
    shapes = [hidden]
    if attrs.output_router_logits:
        shapes.append([*hidden[:-1], builder.constant(attrs.num_experts)])
    return shapes


def num_tokens_expr(hidden_dims: Sequence[Any], builder: ExprBuilder) -> Any:
    """T as a dimension expression: the product of hidden_states' leading dims."""
    tokens = hidden_dims[0]
    for dim in hidden_dims[1:-1]:
        tokens = builder.operation("PROD", tokens, dim)
    return tokens


def num_tokens(hidden_dims: Sequence[int]) -> int:
    return math.prod(hidden_dims[:-1])


def check_input_dims(attrs: MoEAttributes, input_dims: Sequence[Sequence[int]]) -> None:
    """Check concrete (or -1 = dynamic) input dims against the contract; raises one MoetrtError naming them all."""
    _check_input_count(attrs, len(input_dims))
    expected = attrs.input_shapes()
    problems = []
    for name, dims in zip(attrs.present_inputs(), input_dims):
        want = expected[name]
        if name == "hidden_states":
            dims, want = (dims[-1],), (attrs.hidden_size,)
        if len(dims) != len(want) or any(d != w and d != -1 for d, w in zip(dims, want)):
            problems.append(f"{name} {tuple(dims)} != {want}")
    if problems:
        raise MoetrtError(
            "MoE plugin inputs do not match its attributes: " + "; ".join(problems),
            "re-export and re-fuse the model",
        )


def supports_format_combination(
    attrs: MoEAttributes, pos: int, in_out: Sequence[tuple[str, str]], num_inputs: int
) -> bool:
    """TensorRT asks position by position; in_out[i] = (dtype, format). Linear only; one float dtype for all."""
    if num_inputs != len(attrs.present_inputs()) or len(in_out) != num_inputs + num_outputs(attrs):
        return False
    if not 0 <= pos < len(in_out):
        return False
    dtype, fmt = in_out[pos]
    if fmt != LINEAR:
        return False
    if pos == 0:
        return dtype in IO_DTYPES
    return dtype == expected_dtype(attrs, pos, in_out[0][0])


def expected_dtype(attrs: MoEAttributes, pos: int, activation: str) -> str:
    """The dtype name TensorRT must give position `pos` (inputs, then outputs): a quantized expert part's own
    (`spec.stored_dtype`: uint8 codes, float32 scales), else the activations' (hidden_states')."""
    inputs = attrs.present_inputs()
    stored = stored_dtype_name(inputs[pos], attrs) if pos < len(inputs) else None
    return activation if stored is None else stored


def workspace_size(
    launcher: Any,
    max_hidden_dims: Sequence[int],
    min_hidden_dims: Sequence[int] | None = None,
    bucket_bounds: Sequence[int | None] = (),
) -> int:
    """Workspace enough for every token count of the profile (TensorRT passes its min and max dims).

    Each token bucket has its own block sizes, so the need is not monotonic across buckets: take the largest
    of the profile's max and the upper bound of every bucket inside the profile (monotonic within a bucket).
    """
    most = num_tokens(max_hidden_dims)
    least = num_tokens(min_hidden_dims) if min_hidden_dims is not None else most
    candidates = {most} | {b for b in bucket_bounds if b is not None and least <= b <= most}
    return max(int(launcher.workspace_size(tokens)) for tokens in sorted(candidates))


def enqueue_call(
    attrs: MoEAttributes,
    dtype: str,
    input_descs: Sequence[TensorDesc],
    output_descs: Sequence[TensorDesc],
    inputs: Sequence[int],
    outputs: Sequence[int],
    workspace: int,
    stream: int,
) -> EnqueueCall | None:
    """Map TensorRT's enqueue arguments to the launcher's; None when there are no tokens (nothing to launch)."""
    _check_input_count(attrs, len(input_descs))
    if (
        len(inputs) != len(input_descs)
        or len(outputs) != num_outputs(attrs)
        or len(output_descs) != len(outputs)
    ):
        raise MoetrtError(
            f"MoE plugin enqueue got {len(inputs)} inputs / {len(outputs)} outputs, expected "
            f"{len(attrs.present_inputs())} / {num_outputs(attrs)}",
            "rebuild the engine",
        )
    descs = (*input_descs, *output_descs)
    wrong = [d.dtype for pos, d in enumerate(descs) if d.dtype != expected_dtype(attrs, pos, dtype)]
    if wrong:
        raise MoetrtError(
            f"MoE plugin built for {dtype} got tensors of {sorted(set(wrong))}", "rebuild the engine"
        )
    hidden = input_descs[0].dims
    if hidden[-1] != attrs.hidden_size:
        raise MoetrtError(f"MoE hidden size {hidden[-1]} != {attrs.hidden_size}", "rebuild the engine")
    tokens = num_tokens(hidden)
    if tokens == 0:
        return None
    pointers = [*inputs, *outputs]
    if any(int(p) == 0 for p in pointers):
        raise MoetrtError("MoE plugin got a null tensor pointer", "check the engine's bindings")
    return EnqueueCall(
        tokens, tuple(int(p) for p in inputs), tuple(int(p) for p in outputs), int(workspace), int(stream)
    )


def enqueue(launcher: Any, call: EnqueueCall | None) -> None:
    """Launch on TensorRT's stream with TensorRT's workspace; no allocation, no synchronisation."""
    if call is None:
        return
    launcher.enqueue(
        call.num_tokens, list(call.input_ptrs), list(call.output_ptrs), call.workspace_ptr, call.stream
    )


def _check_input_count(attrs: MoEAttributes, count: int) -> None:
    want = len(attrs.present_inputs())
    if count != want:
        raise MoetrtError(
            f"MoE plugin got {count} inputs, its attributes name {want} ({', '.join(attrs.present_inputs())})",
            "re-fuse the model so the node's inputs match its has_* attributes",
        )
