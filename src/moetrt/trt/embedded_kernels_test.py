"""Kernels written into fused MoE nodes, and the fields TensorRT's parser makes of them, read back by
Python's field reader (the C++ reader: tests/test_native_cmake.py)."""

from __future__ import annotations

import numpy as np
import pytest
from moetrt_testing.planning_bundles import planning_bundle
from moetrt_testing.single_op_model import single_moe_model

from moetrt.op.fused_node import check_fused_model, fused_nodes
from moetrt.op.spec import MoEAttributes
from moetrt.trt.embedded_kernels import embed_kernels, node_attributes, parser_fields
from moetrt.trt.fields import state_from_fields

ATTRS = MoEAttributes(
    8, 2, 32, 16, routed_scaling_factor=1.702, shared_intermediate_size=16, has_shared_gate=True
)


def _source(calls: list) -> object:
    def source(attrs: MoEAttributes, dtype: str, sm: int) -> bytes:
        calls.append((attrs, dtype, sm))
        return planning_bundle(attrs, "bfloat16", sm=sm).to_bytes()

    return source


def test_every_node_gets_its_kernels_and_keeps_its_attributes() -> None:
    model, _ = single_moe_model(ATTRS)
    on_node = node_attributes(fused_nodes(model)[0])  # ONNX float attributes are float32
    calls: list = []
    assert embed_kernels(model, "bf16", 90, _source(calls)) == 1
    assert calls == [(on_node, "bf16", 90)]
    node = fused_nodes(model)[0]
    assert node_attributes(node) == on_node
    names = [a.name for a in node.attribute]
    assert {"kernels_sm90", "io_dtype", "float_attrs_f64"} <= set(names)
    embed_kernels(model, "bf16", 90, _source(calls))  # again: replaced, not doubled
    assert sorted(a.name for a in fused_nodes(model)[0].attribute) == sorted(names)


def test_parser_fields_rebuild_the_state_exactly() -> None:
    """What the parser hands the creator gives back the node's attributes and the bundle bytes."""
    model, _ = single_moe_model(ATTRS)
    on_node = node_attributes(fused_nodes(model)[0])
    embed_kernels(model, "bf16", 90, _source([]))
    node = fused_nodes(model)[0]
    fields = parser_fields(node)
    assert fields["io_dtype"][1] == "char" and fields["kernels_sm90"][1] == "int8"
    assert fields["routed_scaling_factor"][1] == "float32"  # what the parser gives: rounded
    state = state_from_fields({name: data for name, (data, _kind) in fields.items()})
    assert state.attrs == on_node  # the values the kernels were compiled with, exactly
    assert state.dtype == "bf16"
    assert state.bundles[90] == planning_bundle(on_node, "bfloat16", sm=90).to_bytes()
    only_named = parser_fields(node, {"num_experts", "kernels_sm90"})
    assert set(only_named) == {"num_experts", "kernels_sm90"}
    assert np.array_equal(only_named["num_experts"][0], [8])


def test_the_model_on_disk_stays_clean() -> None:
    """The build embeds into a copy: a node with kernels is not a valid fused node for the other tools."""
    model, _ = single_moe_model(ATTRS)
    embed_kernels(model, "bf16", 90, _source([]))
    with pytest.raises(Exception, match="unknown MoE attribute"):
        check_fused_model(model)
