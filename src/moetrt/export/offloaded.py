"""Export without holding the weights: trace a model whose parameters sit on disk, then stream them.

A Hugging Face checkpoint above `STREAM_MIN_BYTES` is loaded by transformers with every parameter offloaded to
disk (`device_map={"": "disk"}`): transformers converts the checkpoint's tensors (per-expert weights merged
into the stacked expert tensors, renames) one layer at a time and keeps, per parameter, where its bytes are:
the checkpoint's own safetensors shard, or a converted copy in the offload folder. The module is then moved to
the meta device (its buffers' values kept aside) and traced: torch.export needs only shapes. Each initializer
of the exported graph becomes a lazy tensor that reads its parameter (or buffer) when it is written, so the
ONNX external data is written one tensor at a time and memory holds about one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrt.core.dtypes import numpy_from_torch, precision
from moetrt.core.errors import MoetrtError

#: Checkpoints with more weight bytes than this are exported from disk (the same bound as the whole-model
#: self-check: below it holding the model is cheap and the written file is checked against it).
STREAM_MIN_BYTES = 2 << 30


@dataclass
class OffloadedWeights:
    """Where the values of a meta-device module's parameters and buffers are, by their name in the module."""

    loader: Any  # accelerate's OffloadedWeightsLoader: loader[name] reads one tensor
    buffers: dict[str, torch.Tensor]

    def has(self, name: str) -> bool:
        return name in self.buffers or name in self.loader.all_keys

    def read(self, name: str) -> torch.Tensor:
        return self.buffers[name] if name in self.buffers else self.loader[name]


def offload_to_meta(model: nn.Module) -> OffloadedWeights:
    """Turn a model loaded with `device_map={"": "disk"}` into a plain meta-device module (no accelerate hooks)
    and say where its values are."""
    from accelerate.hooks import remove_hook_from_module

    loader = None
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None:
            loader = getattr(weights_map, "dataset", weights_map)
            break
    if loader is None:
        raise MoetrtError(
            "transformers did not offload the model's weights to disk",
            "install accelerate (pip install accelerate) so large checkpoints can be exported from disk",
        )
    remove_hook_from_module(model, recurse=True)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to("meta")
    # A forward under torch.inference_mode (the cache-layout probe) leaves the hooks' parameters as inference
    # tensors, which torch.export refuses to trace: plain meta parameters of the same shapes instead.
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
                )
    return OffloadedWeights(loader=loader, buffers=buffers)


def attach_weights(model: Any, weights: OffloadedWeights, prefix: str) -> None:
    """Give every initializer of the exported `model` (onnx_ir) that the trace left without values a lazy
    tensor reading its value from `weights`; `prefix` is the exported root's path to the traced module."""
    import onnx_ir as ir

    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and not _is_meta(tensor):
            continue  # a constant the trace computed for real
        source = name[len(prefix) :] if name.startswith(prefix) else name
        if not weights.has(source):
            raise MoetrtError(
                f"the exported graph needs {name!r}, which is neither a parameter nor a buffer of the model",
                "export this model from a machine that can hold it (its trace made a constant on the meta device)",
            )
        dtype = value.dtype if value.dtype is not None else ir.DataType.FLOAT
        shape = value.shape if value.shape is not None else ir.Shape(tensor.shape)
        value.const_value = ir.LazyTensor(_reader(weights, source, name, dtype), dtype, shape, name=name)


def fold_weight_transposes(model: Any) -> None:
    """Fold `Transpose(weight)` of attached weights into transposed lazy weights, as the exporter's optimiser
    would fold them into arrays (it folds a Transpose of any size): the same graph, still read when written."""
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or len(node.inputs) != 1:
            continue
        weight = node.inputs[0]
        if weight is None or not isinstance(weight.const_value, ir.LazyTensor) or len(weight.uses()) != 1:
            continue
        if weight.name not in graph.initializers or weight.shape is None:
            continue
        perm_attr = node.attributes.get("perm")
        rank = len(weight.shape)
        perm = list(perm_attr.value) if perm_attr is not None else list(reversed(range(rank)))
        shape = ir.Shape([weight.shape[i] for i in perm])
        source = weight.const_value
        output = node.outputs[0]
        name = output.name
        output.name = f"{name}__folded"
        lazy = ir.LazyTensor(_transposed(source, perm, name), source.dtype, shape, name=name)
        value = ir.Value(name=name, type=ir.TensorType(source.dtype), shape=shape, const_value=lazy)
        output.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        graph.register_initializer(value)


def _transposed(source: Any, perm: list[int], name: str) -> Callable[[], Any]:
    import onnx_ir as ir

    return lambda: ir.tensor(np.ascontiguousarray(np.transpose(source.numpy(), perm)), name=name)


def _is_meta(tensor: Any) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.device.type == "meta"


def _reader(weights: OffloadedWeights, source: str, name: str, dtype: Any) -> Callable[[], Any]:
    """Reads one value, in the dtype the graph declares for it (parameters kept in float32 stay so)."""
    import onnx_ir as ir

    def read() -> Any:
        tensor = weights.read(source).detach()
        if tensor.is_floating_point():
            tensor = tensor.to(precision(dtype).torch)
        # Often a view of the safetensors file's memory map: released as soon as the writer drops it.
        return ir.tensor(numpy_from_torch(tensor.contiguous()), name=name)

    return read
