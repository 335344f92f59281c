"""Quantize the routed experts of every fused MoE node: round to nearest, one scale per block or group
(`op.quant.quantize`), into the op's quantized layouts (codes, scales, zero points as initializers).

Runs after `pack_weights` (the experts are then [E, N, K] initializers). Each node gets the quantized attributes
and the function body of its new variant; the router and the shared expert stay as they are. Codes and scales
are `LazyTensor`s computed when the model is written, one weight at a time, so memory holds about one expert
table whatever the model's size (each part quantizes its table again: codes, scales and zero points of one
table cost two or three roundings, not a copy of the model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from moetrt.core.errors import MoetrtError
from moetrt.op.function_body import make_moe_function, overload_name
from moetrt.op.spec import (
    ACTIVATION_FORMATS,
    ACTIVATIONS_OPTIONS,
    DEFAULT_BLOCK,
    DOMAIN,
    DOMAIN_VERSION,
    FP8_BLOCK,
    INT4,
    MXFP4,
    NATIVE,
    OP_TYPE,
    WEIGHT_FORMATS,
    WEIGHTS_OPTIONS,
    MoEAttributes,
    check_block,
)
from moetrt.passes.base import CountedPass, CountedPassResult
from moetrt.passes.graph_utils import unique_initializer_name

METHOD = (
    "round to nearest, one scale per block or group (amax / the largest code; MXFP4's shared exponent per the "
    "OCP MX specification), routed experts only (router and shared expert native)"
)
#: The block sizes tried, largest first, when none is given: the first that fits every reduction is used.
BLOCK_CANDIDATES = (128, 64, 32, 16)


@dataclass(frozen=True)
class ExpertQuantization:
    """What `--weights` asks for: a format, its block (None: chosen per model) and int4 zero points; and what
    `--activations` asks of the routed experts' inputs (fp8: quantized per token and block, fp8 weights only)."""

    weight_format: str
    block: int | None = None
    zero_point: bool = False
    activation_format: str = NATIVE

    @classmethod
    def from_option(
        cls, weights: str, block: int | None, zero_point: bool, activations: str = "native"
    ) -> ExpertQuantization | None:
        """`--weights` and `--activations` as given (native weights: None)."""
        fmt = WEIGHTS_OPTIONS[weights]
        return None if fmt == NATIVE else cls(fmt, block, zero_point, ACTIVATIONS_OPTIONS[activations])

    def describe(self) -> dict[str, object]:
        return {
            "format": self.weight_format,
            "block": self.block,
            "zero_point": self.zero_point,
            "activations": self.activation_format,
            "method": METHOD,
        }


def choose_block(weight_format: str, attrs: MoEAttributes, block: int | None) -> int:
    """The block size for `attrs`' experts: `block` when given (checked), else the format's default or the
    largest candidate that divides both reductions (hidden and intermediate size)."""
    reductions = (attrs.hidden_size, attrs.intermediate_size)
    if block is not None:
        for k in reductions:
            why = check_block(weight_format, block, k)
            if why:
                raise MoetrtError(
                    f"--weight-block {block} does not fit: {why}", "pick a block that divides both"
                )
        return block
    for candidate in (DEFAULT_BLOCK[weight_format], *BLOCK_CANDIDATES):
        if all(check_block(weight_format, candidate, k) is None for k in reductions):
            return candidate
    raise MoetrtError(
        f"no {weight_format} group size fits the reductions {reductions}",
        "quantize another format, or leave these experts native",
    )


class QuantizeExpertsPass(CountedPass):
    name = "quantize"

    def __init__(
        self,
        weight_format: str,
        block: int | None = None,
        zero_point: bool = False,
        activation_format: str = NATIVE,
    ) -> None:
        super().__init__()
        if weight_format not in WEIGHT_FORMATS or weight_format == NATIVE:
            raise MoetrtError(
                f"unknown expert weight format {weight_format!r}",
                f"use one of {', '.join(f for f in WEIGHT_FORMATS if f != NATIVE)}",
            )
        if zero_point and weight_format != INT4:
            raise MoetrtError("zero points are for int4 weights only", "leave out the zero-point option")
        if activation_format not in ACTIVATION_FORMATS or (
            activation_format != NATIVE and weight_format != FP8_BLOCK
        ):
            raise MoetrtError(
                f"activation format {activation_format!r} does not go with {weight_format} weights",
                "fp8 activations need fp8 weights",
            )
        self.weight_format, self.block, self.zero_point = weight_format, block, zero_point
        self.activation_format = activation_format

    def call(self, model: ir.Model) -> CountedPassResult:
        opset = model.opset_imports.get("", 18)
        graph, count = model.graph, 0
        for node in list(graph):
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            attrs = MoEAttributes.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
            if attrs.is_quantized:
                continue
            new = dataclasses.replace(
                attrs,
                weight_format=self.weight_format,
                weight_block=choose_block(self.weight_format, attrs, self.block),
                has_weight_zero_point=self.zero_point,
                activation_format=self.activation_format,
            )
            self._quantize_node(model, node, attrs, new, opset)
            count += 1
        if count:  # the native expert tables are no longer read
            common_passes.RemoveUnusedNodesPass()(model)
        return CountedPassResult(model, count > 0, count)

    def _quantize_node(
        self, model: ir.Model, node: ir.Node, old: MoEAttributes, new: MoEAttributes, opset: int
    ) -> None:
        by_name = dict(zip(old.present_inputs(), node.inputs))
        sources = {}
        for which in ("gate_up", "down"):
            value = by_name[f"expert_{which}_weight"]
            if value is None or value.const_value is None:
                raise MoetrtError(
                    f"fused node {node.name}: its {which} experts are not stored weights",
                    "fuse the model first (`moetrt fuse`), then quantize",
                )
            sources[which] = value.const_value
        replace_experts(
            model, node, old, new, opset, lambda which, part: _quantized_part(sources[which], new, part)
        )


#: The quantized parts of one expert table: input name suffix -> field of `op.quant.QuantizedWeight`.
_PARTS = {"weight": "codes", "scale": "scale", "zero": "zero"}


def replace_experts(
    model: ir.Model,
    node: ir.Node,
    old: MoEAttributes,
    new: MoEAttributes,
    opset: int,
    part_tensor: Callable[[str, str], Callable[[], ir.TensorProtocol]],
) -> None:
    """Give fused `node` (attributes `old`) quantized experts: attributes `new`, one lazy initializer per part
    (`part_tensor(which, field)` computes it: which is gate_up | down, field codes | scale | zero) and the
    function body of the new variant."""
    graph = model.graph
    by_name = dict(zip(old.present_inputs(), node.inputs))
    for which in ("gate_up", "down"):
        parts = ("weight", "scale", "zero") if new.has_weight_zero_point else ("weight", "scale")
        for input_part in parts:
            field_name = _PARTS[input_part]
            name = unique_initializer_name(
                graph, f"{node.name or 'moe'}.expert_{which}_{input_part}.{new.weight_format}"
            )
            shape = new.input_shapes()[f"expert_{which}_{input_part}"]
            float_scale = field_name == "scale" and new.weight_format != MXFP4  # e8m0 scales are bytes
            dtype = ir.DataType.FLOAT if float_scale else ir.DataType.UINT8
            tensor = ir.LazyTensor(part_tensor(which, field_name), dtype, ir.Shape(shape), name=name)
            quantized = ir.Value(
                name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
            )
            graph.register_initializer(quantized)
            by_name[f"expert_{which}_{input_part}"] = quantized
    inputs = [by_name[name] for name in new.present_inputs()]
    node.resize_inputs(len(inputs))
    for index, value in enumerate(inputs):
        node.replace_input_with(index, value)
    for key, attr_value in new.to_onnx_attributes().items():
        node.attributes[key] = ir.convenience.convert_attribute(key, attr_value)
    overload = overload_name(new)
    node.overload = overload
    key = (DOMAIN, OP_TYPE, overload)
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(make_moe_function(new, overload, opset=opset))
    model.opset_imports[DOMAIN] = DOMAIN_VERSION  # the codes are written in this version's layout


def _quantized_part(
    source: ir.TensorProtocol, attrs: MoEAttributes, part: str
) -> Callable[[], ir.TensorProtocol]:
    def compute() -> ir.TensorProtocol:
        import torch

        from moetrt.op.quant import quantize

        weight = torch.from_numpy(np.array(source.numpy(), dtype=np.float32))  # a writable float32 copy
        stored = quantize(attrs.weight_format, attrs.weight_block, weight, attrs.has_weight_zero_point)
        result = getattr(stored, part)
        assert result is not None
        return ir.Tensor(result.contiguous().numpy())

    return compute
