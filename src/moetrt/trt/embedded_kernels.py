"""The kernels of each fused MoE node written into the node itself, for the C++ plugin library's build phase.

TensorRT's ONNX parser hands a plugin creator only the node's attributes (those the creator names). The C++
plugin cannot compile Triton kernels, so before the parser runs, each `moetrt::MoE` node of the model
TensorRT parses (a copy: the build directory's ONNX stays clean) gets the fields an engine carries anyway:
`kernels_sm<NN>` (INT8 tensor of the bundle bytes), `io_dtype` (string) and `float_attrs_f64` (INT8 tensor of
the float attributes as float64). `parser_fields` models how the parser turns attributes into plugin fields,
so the hand-off is tested without TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moetrt.op.fused_node import fused_nodes
from moetrt.op.spec import MoEAttributes
from moetrt.trt.fields import KERNELS_PREFIX, Fields, float64_blob

KernelSource = Callable[[MoEAttributes, str, int], bytes]
#: node attributes this module adds (besides kernels_sm<NN>)
ADDED_ATTRIBUTES = ("io_dtype", "float_attrs_f64")


def node_attributes(node: onnx.NodeProto) -> MoEAttributes:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return MoEAttributes.from_onnx_attributes(
        {k: v for k, v in values.items() if k not in ADDED_ATTRIBUTES and not k.startswith(KERNELS_PREFIX)}
    )


def embed_kernels(model: onnx.ModelProto, dtype: str, sm: int, kernel_source: KernelSource) -> int:
    """Add kernels for `sm` and the I/O dtype to every fused MoE node of `model` (in place); how many nodes."""
    count = 0
    for node in fused_nodes(model):
        attrs = node_attributes(node)
        kept = [
            a
            for a in node.attribute
            if a.name not in ADDED_ATTRIBUTES and not a.name.startswith(KERNELS_PREFIX)
        ]
        del node.attribute[:]
        node.attribute.extend(kept)
        blob = np.frombuffer(kernel_source(attrs, dtype, sm), dtype=np.int8)
        node.attribute.extend(
            [
                helper.make_attribute(f"{KERNELS_PREFIX}{sm}", numpy_helper.from_array(blob)),
                helper.make_attribute("io_dtype", dtype),
                helper.make_attribute("float_attrs_f64", numpy_helper.from_array(float64_blob(attrs))),
            ]
        )
        count += 1
    return count


def parser_fields(node: onnx.NodeProto, names: set[str] | None = None) -> Fields:
    """The plugin fields TensorRT's ONNX parser makes of `node`'s attributes (those in `names`, the creator's
    field names; all without): INT → INT32, FLOAT → FLOAT32, STRING → CHAR (its bytes, no terminating NUL),
    an INT8 TENSOR → INT8."""
    out: Fields = {}
    for attr in node.attribute:
        if names is not None and attr.name not in names:
            continue
        if attr.type == onnx.AttributeProto.INT:
            out[attr.name] = (np.array([attr.i], dtype=np.int32), "int32")
        elif attr.type == onnx.AttributeProto.FLOAT:
            out[attr.name] = (np.array([attr.f], dtype=np.float32), "float32")
        elif attr.type == onnx.AttributeProto.STRING:
            out[attr.name] = (np.frombuffer(attr.s, dtype=np.int8).copy(), "char")
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.INT8:
            out[attr.name] = (numpy_helper.to_array(attr.t).astype(np.int8), "int8")
        else:
            raise ValueError(f"attribute {attr.name} of type {attr.type} has no plugin field form")
    return out
