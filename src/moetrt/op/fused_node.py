"""The one check of a fused `moetrt::MoE` node as it stands in a model: attributes within the contract, one input
per present weight, the outputs its attributes promise, and a function body to run it. Fuse (--decompose),
verify, build and inspect all read fused nodes through it, so a hand-edited or truncated model is refused
with the node's name, never run or built."""

from __future__ import annotations

import onnx

from moetrt.core.errors import MoetrtError
from moetrt.op.spec import DOMAIN, INT4, MXFP4, NIBBLE_RUN, NIBBLE_RUNS_SINCE, OP_TYPE, MoEAttributes

_REFUSE_HINT = "fuse the exported model again with `moetrt fuse` (do not edit fused nodes by hand)"


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def check_fused_node(node: onnx.NodeProto, function_keys: set[tuple[str, str, str]]) -> MoEAttributes:
    """The node's attributes, or a MoetrtError naming the node and what is wrong with it."""
    name = node.name or node.output[0] if node.output else "<unnamed>"
    raw = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    try:
        attrs = MoEAttributes.from_onnx_attributes(raw)
    except ValueError as err:
        raise MoetrtError(f"fused MoE node {name!r}: {err}", _REFUSE_HINT) from None
    wanted = attrs.present_inputs()
    given = list(node.input)
    if len(given) != len(wanted) or not all(given):
        raise MoetrtError(
            f"fused MoE node {name!r} has {sum(bool(i) for i in given)} inputs; its attributes need {len(wanted)} "
            f"({', '.join(wanted)})",
            _REFUSE_HINT,
        )
    if len(node.output) != len(attrs.present_outputs()) or not all(node.output):
        raise MoetrtError(
            f"fused MoE node {name!r} has {len(node.output)} outputs; its attributes need "
            f"{len(attrs.present_outputs())} ({', '.join(attrs.present_outputs())})",
            _REFUSE_HINT,
        )
    if (node.domain, node.op_type, node.overload) not in function_keys:
        raise MoetrtError(
            f"fused MoE node {name!r} has no function body in the model, so no runtime but the TensorRT plugin "
            "can run it and it cannot be decomposed",
            _REFUSE_HINT,
        )
    return attrs


def check_fused_model(model: onnx.ModelProto) -> list[MoEAttributes]:
    """Every fused node of `model` checked (see `check_fused_node`), in graph order; a quantized node's stored
    codes, scales and zero points must also have the shapes its attributes give."""
    keys = {(f.domain, f.name, f.overload) for f in model.functions}
    stored = {init.name: tuple(init.dims) for init in model.graph.initializer}
    version = next((o.version for o in model.opset_import if o.domain == DOMAIN), NIBBLE_RUNS_SINCE)
    checked = []
    for node in fused_nodes(model):
        attrs = check_fused_node(node, keys)
        if attrs.is_quantized:
            _check_quantized_shapes(node, attrs, stored)
        if attrs.weight_format in (INT4, MXFP4) and version < NIBBLE_RUNS_SINCE:
            # the bytes hold other k than the kernels read: refused rather than built into a wrong engine
            raise MoetrtError(
                f"fused MoE node {node.name!r} stores {attrs.weight_format} codes in the byte order of {DOMAIN} op "
                f"version {version} (k = 2j and 2j + 1 a byte); this moetrt reads version {NIBBLE_RUNS_SINCE}'s "
                f"runs of {NIBBLE_RUN}",
                "fuse the exported model again with this moetrt (`moetrt fuse --weights ...` or `moetrt build`)",
            )
        checked.append(attrs)
    return checked


def _check_quantized_shapes(
    node: onnx.NodeProto, attrs: MoEAttributes, stored: dict[str, tuple[int, ...]]
) -> None:
    expected = attrs.input_shapes()
    wrong = [
        f"{name} {stored[value]} != {expected[name]}"
        for name, value in zip(attrs.present_inputs(), node.input)
        if name.startswith("expert_") and value in stored and stored[value] != expected[name]
    ]
    if wrong:
        raise MoetrtError(
            f"fused MoE node {node.name!r} stores {attrs.weight_format} experts whose shapes do not match its "
            f"attributes (block {attrs.weight_block}): {'; '.join(wrong)}",
            "quantize the fused model again with `moetrt fuse --weights`",
        )
