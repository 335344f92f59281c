"""The fused-node check: a node as `moetrt fuse` writes it passes; every hand edit that breaks it is refused."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch
from moetrt_testing.single_op_model import single_moe_model

from moetrt.core.errors import MoetrtError
from moetrt.op.fused_node import check_fused_model, fused_nodes
from moetrt.op.presets import like
from moetrt.op.spec import DOMAIN


def _model() -> onnx.ModelProto:
    model, _ = single_moe_model(like("qwen3_next", 8, 2, 32, 16), torch.float32)
    return model


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    next(a for a in node.attribute if a.name == name).i = value


def test_a_fused_model_passes() -> None:
    (attrs,) = check_fused_model(_model())
    expected = like("qwen3_next", 8, 2, 32, 16)
    # float attributes are float32 on the node (1.702 reads back as 1.7020000219)
    assert attrs == dataclasses.replace(expected, swiglu_alpha=attrs.swiglu_alpha)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: _set_int(fused_nodes(m)[0], "top_k", 16), "top_k 16 outside 1..num_experts"),
        (lambda m: _set_int(fused_nodes(m)[0], "hidden_size", -64), "hidden_size -64 is not a positive"),
        (
            lambda m: fused_nodes(m)[0].attribute.add(name="colour", type=onnx.AttributeProto.INT, i=1),
            "unknown MoE attribute",
        ),
        (lambda m: fused_nodes(m)[0].input.pop(), "inputs; its attributes need"),
        (lambda m: fused_nodes(m)[0].output.append("extra"), "outputs; its attributes need"),
        (lambda m: m.ClearField("functions"), "has no function body"),
    ],
)
def test_hand_edits_are_refused_with_the_node_name(edit: object, message: str) -> None:
    model = _model()
    edit(model)  # type: ignore[operator]
    with pytest.raises(MoetrtError, match=message) as err:
        check_fused_model(model)
    assert fused_nodes(model)[0].name in err.value.message and "moetrt fuse" in err.value.hint


@pytest.mark.parametrize(
    ("weight_format", "block"), [("int4", 16), ("mxfp4", 32), ("fp8_block", 16), ("native", 0)]
)
def test_4bit_codes_of_op_version_1_are_refused(weight_format: str, block: int) -> None:
    """Version 1 paired k = 2j and 2j + 1 in byte j: its 4-bit bytes would be read as other k, so such a node is
    refused; its other formats kept their layouts and still pass."""
    attrs = like("qwen3_next", 8, 2, 64, 32, weight_format=weight_format, weight_block=block)
    model, _ = single_moe_model(attrs, torch.float32)
    assert check_fused_model(model)  # as written now (version 2)
    next(o for o in model.opset_import if o.domain == DOMAIN).version = 1
    if weight_format in ("int4", "mxfp4"):
        with pytest.raises(MoetrtError, match="byte order of moetrt op version 1") as err:
            check_fused_model(model)
        assert "moe_0" in err.value.message and "fuse the exported model again" in err.value.hint
    else:
        assert check_fused_model(model)
