"""The IPluginV3 classes themselves, on the base classes of TensorRT-RTX's Python module (the same plugin API as
`tensorrt`): creator metadata, create → configure → serialize → deserialize, formats, workspace, enqueue.

No network is built here (TensorRT-RTX cannot add a Python plugin layer); TensorRT calls these same methods.
"""

from __future__ import annotations

from typing import Any

import pytest

from moetrt.op.spec import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, MoEAttributes
from moetrt.trt import plugin as plugin_module
from moetrt.trt.fields import attributes_to_fields
from moetrt.trt.plugin import (
    BuildSettings,
    from_field_collection,
    make_plugin_classes,
    to_field_collection,
)

trt = pytest.importorskip("tensorrt_rtx_bindings")

ATTRS = MoEAttributes(
    num_experts=8,
    top_k=2,
    hidden_size=64,
    intermediate_size=32,
    shared_intermediate_size=16,
    output_router_logits=True,
)
NUM_INPUTS = len(ATTRS.present_inputs())


class RecordingLauncher:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def workspace_size(self, num_tokens: int) -> int:
        return 256 * num_tokens

    def enqueue(self, *args: Any) -> None:
        self.calls.append(args)


@pytest.fixture
def classes(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, RecordingLauncher, list[tuple[Any, ...]]]:
    compiled: list[tuple[Any, ...]] = []

    def kernel_source(attrs: MoEAttributes, dtype: str, sm: int) -> bytes:
        compiled.append((attrs, dtype, sm))
        return f"cubins:{dtype}:sm{sm}".encode() + bytes(range(256))

    launcher = RecordingLauncher()
    monkeypatch.setattr(plugin_module, "_launcher", lambda blob, attrs: launcher)
    plugin_cls, creator_cls = make_plugin_classes(trt, BuildSettings(sm=90, kernel_source=kernel_source))
    return plugin_cls, creator_cls, launcher, compiled


def _desc(dtype: Any, dims: list[int], fmt: Any = None) -> Any:
    desc = trt.PluginTensorDesc()
    desc.type, desc.format, desc.dims = dtype, fmt or trt.TensorFormat.LINEAR, trt.Dims(dims)
    return desc


def _dynamic(dtype: Any, dims: list[int], max_tokens: int) -> Any:
    d = trt.DynamicPluginTensorDesc()
    d.desc = _desc(dtype, dims)
    d.min = trt.Dims([1, *dims[1:]])
    d.opt = trt.Dims(dims)
    d.max = trt.Dims([max_tokens, *dims[1:]])
    return d


def _io(dtype: Any, tokens: int, max_tokens: int = 512) -> tuple[list[Any], list[Any]]:
    shapes = [[tokens if d == "T" else d for d in s] for s in ATTRS.input_shapes("T").values()]
    inputs = [
        _dynamic(dtype, s, max_tokens) if i == 0 else _dynamic(dtype, s, s[0]) for i, s in enumerate(shapes)
    ]
    outputs = [_dynamic(dtype, [tokens, 64], max_tokens), _dynamic(dtype, [tokens, 8], max_tokens)]
    return inputs, outputs


def test_creator_is_named_like_the_onnx_op(classes: Any) -> None:
    _, creator_cls, _, _ = classes
    creator = creator_cls()
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == (
        PLUGIN_NAME,
        PLUGIN_VERSION,
        PLUGIN_NAMESPACE,
    )
    assert {f.name for f in creator.field_names} >= {"num_experts", "top_k", "scoring", "activation"}


@pytest.mark.parametrize(("trt_dtype", "name"), [("FLOAT", "fp32"), ("HALF", "fp16"), ("BF16", "bf16")])
def test_build_then_runtime_round_trip(classes: Any, trt_dtype: str, name: str) -> None:
    _, creator_cls, launcher, compiled = classes
    dtype = getattr(trt.DataType, trt_dtype)
    creator = creator_cls()
    parser_fields = attributes_to_fields(ATTRS)
    plugin = creator.create_plugin("moe_0", to_field_collection(trt, parser_fields), trt.TensorRTPhase.BUILD)
    assert plugin.num_outputs == 2 and plugin.plugin_name == PLUGIN_NAME
    assert plugin.get_capability_interface(trt.PluginCapabilityType.BUILD) is plugin

    inputs, outputs = _io(dtype, 16)
    in_out = inputs + outputs
    assert all(plugin.supports_format_combination(p, in_out, NUM_INPUTS) for p in range(len(in_out)))
    assert plugin.get_output_data_types([dtype] * NUM_INPUTS) == [dtype, dtype]

    plugin.configure_plugin(inputs, outputs)
    assert compiled == [(plugin.state.attrs, name, 90)]
    assert plugin.get_workspace_size(inputs, outputs) == 256 * 512  # profile max tokens

    serialized = plugin.get_fields_to_serialize()
    runtime = creator.create_plugin("moe_0", serialized, trt.TensorRTPhase.RUNTIME)
    assert runtime.state.attrs == plugin.state.attrs
    assert runtime.state.dtype == name
    assert runtime.state.bundles == plugin.state.bundles and 90 in runtime.state.bundles
    assert from_field_collection(serialized)["io_dtype"].tobytes().rstrip(b"\0") == name.encode()

    context_plugin = runtime.attach_to_context(None)
    assert context_plugin is not runtime and context_plugin.state.bundles == runtime.state.bundles
    in_descs = [i.desc for i in _io(dtype, 5)[0]]
    out_descs = [o.desc for o in _io(dtype, 5)[1]]
    context_plugin.on_shape_change(in_descs, out_descs)
    in_ptrs = [0x10000 + i for i in range(NUM_INPUTS)]
    context_plugin.enqueue(in_descs, out_descs, in_ptrs, [0x20000, 0x30000], 0x40000, 0x55)
    assert launcher.calls == [(5, in_ptrs, [0x20000, 0x30000], 0x40000, 0x55)]


def test_unsupported_formats_and_dtypes(classes: Any) -> None:
    _, creator_cls, _, _ = classes
    fields = attributes_to_fields(ATTRS)  # alive while TensorRT reads the collection
    plugin = creator_cls().create_plugin("moe", to_field_collection(trt, fields), trt.TensorRTPhase.BUILD)
    inputs, outputs = _io(trt.DataType.INT8, 4)
    assert not plugin.supports_format_combination(0, inputs + outputs, NUM_INPUTS)
    inputs, outputs = _io(trt.DataType.HALF, 4)
    outputs[0].desc = _desc(trt.DataType.FLOAT, [4, 64])
    assert not plugin.supports_format_combination(NUM_INPUTS, inputs + outputs, NUM_INPUTS)
    inputs[0].desc = _desc(trt.DataType.HALF, [4, 64], trt.TensorFormat.CHW32)
    assert not plugin.supports_format_combination(0, inputs + outputs, NUM_INPUTS)


def test_clone_does_not_share_kernel_dict(classes: Any) -> None:
    _, creator_cls, _, _ = classes
    fields = attributes_to_fields(ATTRS)  # alive while TensorRT reads the collection
    plugin = creator_cls().create_plugin("moe", to_field_collection(trt, fields), trt.TensorRTPhase.BUILD)
    plugin.state.bundles[90] = b"a"
    twin = plugin.clone()
    twin.state.bundles[80] = b"b"
    assert 80 not in plugin.state.bundles and twin.state.bundles[90] == b"a"
