"""A probed copy of an ONNX model: the same graph with chosen inner values added as graph outputs.

Diagnosis runs this copy in onnxruntime at the failing shapes to see inside the artifact: the output of each
module (attention, linear attention, MoE block: the values its nodes hand to nodes outside it, found by the
exporter's module scopes) and, for each fused `moetrt::MoE` node, its input and the experts it selected
(its function body made again with `expose_ids`, so onnxruntime runs the same ops and shows their routing).
The copy holds no weights: it sits in a temporary directory with links to the original's external data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from moetrt.core.artifacts import NODE_NAME_SCOPES, node_scopes
from moetrt.core.dtypes import torch_from_numpy
from moetrt.core.onnx_io import load_onnx
from moetrt.op.function_body import make_moe_function
from moetrt.op.fused_node import check_fused_model, fused_nodes
from moetrt.op.spec import DOMAIN, OP_TYPE, MoEAttributes


@dataclass(frozen=True)
class FusedBlockProbe:
    """One fused node: its module, attributes, input names, and the probe outputs of its hidden input and
    its selected experts."""

    module: str | None  # the block's module path ("" is the exported root); None when the file does not say
    attrs: MoEAttributes
    inputs: dict[str, str]  # op input name (spec.INPUT_ORDER) -> graph value name
    hidden_output: str
    ids_output: str


@dataclass
class ProbedModel:
    path: Path
    #: module path -> the graph outputs added for it (values its nodes hand to nodes outside it)
    module_outputs: dict[str, list[str]] = field(default_factory=dict)
    fused_blocks: list[FusedBlockProbe] = field(default_factory=list)


def node_module_scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == NODE_NAME_SCOPES:
            return node_scopes(prop.value)
    return []


def write_probed_model(source: Path, directory: Path, modules: Iterable[str]) -> ProbedModel:
    """Write the probed copy of `source` into `directory` (which must be empty) and say what it probes."""
    model = load_onnx(source, load_external_data=False)
    graph = model.graph
    existing = {o.name for o in graph.output}
    probed = ProbedModel(path=directory / source.name)

    def add_output(name: str) -> None:
        if name and name not in existing:
            graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)

    scopes = [set(node_module_scopes(node)) for node in graph.node]
    for module in modules:
        outputs = _module_outputs(graph, scopes, module)
        for name in outputs:
            add_output(name)
        probed.module_outputs[module] = outputs

    opset = next((o.version for o in model.opset_import if o.domain == ""), 18)
    functions = {(f.domain, f.name, f.overload): f for f in model.functions}
    for node, attrs in zip(fused_nodes(model), check_fused_model(model)):
        overload = f"{node.overload}_probe_ids"
        if (DOMAIN, OP_TYPE, overload) not in functions:
            function = make_moe_function(attrs, overload, opset=opset, expose_ids=True)
            model.functions.append(function)
            functions[(DOMAIN, OP_TYPE, overload)] = function
        while len(node.output) < len(attrs.present_outputs()):
            node.output.append("")
        ids_name = f"{node.name or node.output[0]}/probe_expert_ids"
        node.output.append(ids_name)
        node.overload = overload
        add_output(node.input[0])
        add_output(ids_name)
        scopes_of_node = node_module_scopes(node)
        probed.fused_blocks.append(
            FusedBlockProbe(
                module=scopes_of_node[-1] if scopes_of_node else None,
                attrs=attrs,
                inputs=dict(zip(attrs.present_inputs(), node.input, strict=False)),
                hidden_output=node.input[0],
                ids_output=ids_name,
            )
        )

    _link_external_data(model, source.parent, directory)
    onnx.save_model(model, str(probed.path))
    return probed


def _module_outputs(graph: onnx.GraphProto, scopes: list[set[str]], module: str) -> list[str]:
    """Values made by nodes of `module` and read by nodes outside it (or by the graph's outputs), in the order
    they are made."""
    made_at = {
        out: index
        for index, (node, s) in enumerate(zip(graph.node, scopes))
        if module in s
        for out in node.output
        if out
    }
    read_outside: list[str] = []
    for node, s in zip(graph.node, scopes):
        if module in s or not s:  # nodes without scopes (made by the exporter's optimiser) decide nothing
            continue
        read_outside.extend(name for name in node.input if name in made_at)
    read_outside.extend(o.name for o in graph.output if o.name in made_at)
    return sorted(set(read_outside), key=made_at.__getitem__)  # the module's last result comes last


def _link_external_data(model: onnx.ModelProto, source_dir: Path, directory: Path) -> None:
    locations = set()
    for tensor in external_data_helper._get_all_tensors(model):  # every initializer and Constant tensor
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            locations.add(info.location)
    for location in locations:
        target = directory / location
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((source_dir / location).resolve(), target)


def stored_tensor(graph: Any, name: str) -> Any:
    """The value of initializer `name` of an onnx-ir graph as a torch tensor (memory-mapped from external data:
    only read it), or None when `name` is not a stored value."""
    value = graph.initializers.get(name)
    if value is None or value.const_value is None:
        return None
    return torch_from_numpy(value.const_value.numpy())
