"""Put a checkpoint's stored-quantized experts into the fused MoE nodes, in place of the float tables.

For a model exported from a checkpoint whose experts are stored quantized (FP8 blocks, MXFP4, GPTQ / AWQ int4:
`export.quantized_checkpoint`), the fused nodes' float expert tables are replaced by the stored codes and
scales, read when the model is written, one layer at a time: the float tables are never computed for the file.
The i-th fused node (graph order) takes the i-th MoE layer (layer order); the counts must agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import lru_cache

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from moetrt.core.errors import MoetrtError
from moetrt.op.quant import QuantizedWeight
from moetrt.op.spec import DOMAIN, OP_TYPE, MoEAttributes, check_block
from moetrt.passes.base import CountedPass, CountedPassResult
from moetrt.passes.quantize_experts import replace_experts

#: One MoE layer's stored experts: (gate_up [E, 2I, H], down [E, H, I]) in the op's quantized layouts.
LayerReader = Callable[[], tuple[QuantizedWeight, QuantizedWeight]]


class StoredExpertsPass(CountedPass):
    name = "stored_experts"

    def __init__(
        self, weight_format: str, block: int, zero_point: bool, layers: Sequence[LayerReader]
    ) -> None:
        super().__init__()
        self.weight_format, self.block, self.zero_point = weight_format, block, zero_point
        self.layers = list(layers)

    def call(self, model: ir.Model) -> CountedPassResult:
        opset = model.opset_imports.get("", 18)
        nodes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP_TYPE]
        if len(nodes) != len(self.layers):
            raise MoetrtError(
                f"{len(nodes)} MoE block(s) fused but the checkpoint stores {len(self.layers)} expert layer(s)",
                "every MoE layer must fuse for its stored experts to be used; see `moetrt fuse --explain`",
            )
        for node, layer in zip(nodes, self.layers, strict=True):
            old = MoEAttributes.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
            if old.is_quantized:
                raise MoetrtError(
                    f"fused node {node.name} is already quantized", "export the checkpoint again"
                )
            for k in (old.hidden_size, old.intermediate_size):
                why = check_block(self.weight_format, self.block, k)
                if why:
                    raise MoetrtError(f"the checkpoint's {self.weight_format} blocks do not fit: {why}", "")
            new = dataclasses.replace(
                old,
                weight_format=self.weight_format,
                weight_block=self.block,
                has_weight_zero_point=self.zero_point,
            )
            replace_experts(model, node, old, new, opset, _parts(layer, new, node.name))
        if nodes:  # the float expert tables are no longer read
            common_passes.RemoveUnusedNodesPass()(model)
        return CountedPassResult(model, bool(nodes), len(nodes))


def _parts(
    layer: LayerReader, attrs: MoEAttributes, where: str
) -> Callable[[str, str], Callable[[], ir.TensorProtocol]]:
    read = lru_cache(maxsize=1)(layer)  # codes, scales (and zeros) of a table are written one after another
    shapes = attrs.input_shapes()

    def part(which: str, field: str) -> Callable[[], ir.TensorProtocol]:
        def compute() -> ir.TensorProtocol:
            gate_up, down = read()
            value = getattr(gate_up if which == "gate_up" else down, field)
            suffix = {"codes": "weight", "scale": "scale", "zero": "zero"}[field]
            want = tuple(shapes[f"expert_{which}_{suffix}"])
            if value is None or tuple(value.shape) != want:
                got = None if value is None else tuple(value.shape)
                raise MoetrtError(
                    f"{where}: the checkpoint's {which} {field} is {got}, the fused node needs {want}",
                    "the checkpoint's experts do not match the model config.json describes",
                )
            return ir.Tensor(value.contiguous().numpy())

        return compute

    return part
