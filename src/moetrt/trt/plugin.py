"""`IPluginV3` for the fused MoE op, for the `tensorrt` Python module (10.8+); TensorRT is imported lazily.

Every method converts TensorRT's objects to plain values and calls one pure function in `fields.py` or
`io_rules.py`. Build phase: the ONNX parser hands the node's attributes to `create_plugin`; `configure_plugin`
learns the I/O dtype and fetches the cubins for the target SM, which `get_fields_to_serialize` writes into the
engine. Runtime phase: the fields give back attributes, dtype and cubins; `enqueue` launches them with the CUDA
driver on TensorRT's stream and workspace (no Triton, no JIT).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from moetrt.core import devices, dtypes
from moetrt.core.errors import MoetrtError
from moetrt.op import spec
from moetrt.trt import io_rules
from moetrt.trt.fields import (
    Fields,
    PluginState,
    attributes_to_fields,
    state_from_fields,
    state_to_fields,
)

# (attrs, io dtype, sm) → KernelBundle bytes. The default compiles with the AOT compiler.
KernelSource = Callable[[spec.MoEAttributes, str, int], bytes]

_TRT_DTYPE_NAMES = {p.trt_name: p.name for p in dtypes.PRECISIONS}


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as err:
        raise MoetrtError(
            "the `tensorrt` Python module is not installed",
            "install TensorRT 10.8 or later (pip install tensorrt), or use --engine-backend tensorrt-rtx",
        ) from err
    return tensorrt


def io_dtype_name(trt_dtype: Any) -> str:
    """trt.DataType → fp32 / fp16 / bf16 (other types keep TensorRT's name, lower case, for io_rules to refuse)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    return _TRT_DTYPE_NAMES.get(name, name.lower())


def compile_kernel_bytes(attrs: spec.MoEAttributes, dtype: str, sm: int, workers: int = 1) -> bytes:
    """The cubins and launch configs of one variant for one SM, as the plugin field carries them.

    `workers` > 1 compiles the kernels in that many processes (Triton's compiler is single-threaded).
    """
    from moetrt.kernels.aot import compile_kernels

    return compile_kernels(attrs, dtypes.kernel_name_of(dtype), sm, workers=workers).to_bytes()


def current_sm() -> int:
    return devices.current_sm()


@functools.cache
def _launcher(blob: bytes, attrs: spec.MoEAttributes) -> Any:
    # One launcher (loaded CUDA modules) per engine's kernels, shared by every execution context.
    from moetrt.kernels.aot import KernelBundle
    from moetrt.kernels.launcher import MoELauncher

    return MoELauncher(KernelBundle.from_bytes(blob), attrs)


def to_field_collection(trt: ModuleType, fields: Fields) -> Any:
    """A `trt.PluginFieldCollection` viewing `fields`' arrays.

    TensorRT's PluginField keeps a pointer, not a reference: the caller keeps `fields` alive for as long as
    TensorRT may read the collection (the plugin holds its serialized fields until the next call).
    """
    kinds = {
        "int32": trt.PluginFieldType.INT32,
        "float32": trt.PluginFieldType.FLOAT32,
        "char": trt.PluginFieldType.CHAR,
        "int8": trt.PluginFieldType.INT8,
    }
    return trt.PluginFieldCollection(
        [trt.PluginField(name, data, kinds[kind]) for name, (data, kind) in fields.items()]
    )


def from_field_collection(fc: Any) -> dict[str, Any]:
    return {f.name: f.data for f in fc} if fc is not None else {}


class BuildSettings:
    """What plugins built in this process embed: cubins for `sm` (None: the current GPU's), from `kernel_source`."""

    def __init__(self, sm: int | None = None, kernel_source: KernelSource | None = None) -> None:
        self.sm = sm
        self.kernel_source = kernel_source or compile_kernel_bytes

    def target_sm(self) -> int:
        return self.sm if self.sm is not None else current_sm()


def make_plugin_classes(trt: ModuleType, settings: BuildSettings):
    """Define the plugin and its creator on top of `trt`'s base classes (tensorrt or a compatible module)."""

    class MoEPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, state: PluginState, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.state = state
            self.phase = phase
            self.num_outputs = io_rules.num_outputs(state.attrs)
            self.plugin_name = spec.PLUGIN_NAME
            self.plugin_version = spec.PLUGIN_VERSION
            self.plugin_namespace = spec.PLUGIN_NAMESPACE
            # Same attributes → same timing; lets TensorRT reuse one timing for every MoE layer of a model.
            self.timing_cache_id = repr(state.attrs)

        # IPluginV3
        def get_capability_interface(self, _type: Any) -> Any:
            return self

        def clone(self) -> MoEPlugin:
            return MoEPlugin(
                PluginState(self.state.attrs, self.state.dtype, dict(self.state.bundles)), self.phase
            )

        # IPluginV3OneBuild
        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            names = io_rules.output_dtypes(self.state.attrs, [io_dtype_name(t) for t in input_types])
            by_name = {io_dtype_name(t): t for t in input_types}
            return [by_name[n] for n in names]

        def get_output_shapes(
            self, inputs: list[Any], _shape_inputs: list[Any], expr_builder: Any
        ) -> list[Any]:
            builder = _ExprBuilder(trt, expr_builder)
            dims = [[d[i] for i in range(len(d))] for d in inputs]
            return [
                _dims_exprs(trt, shape) for shape in io_rules.output_shapes(self.state.attrs, dims, builder)
            ]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            descs = [(io_dtype_name(d.desc.type), d.desc.format.name) for d in in_out]
            return io_rules.supports_format_combination(self.state.attrs, pos, descs, num_inputs)

        def configure_plugin(self, inp: list[Any], _out: list[Any]) -> None:
            io_rules.check_input_dims(self.state.attrs, [tuple(d.desc.dims) for d in inp])
            self.state.dtype = io_dtype_name(inp[0].desc.type)
            target = settings.target_sm()
            if target not in self.state.bundles:
                self.state.bundles[target] = settings.kernel_source(
                    self.state.attrs, self.state.dtype, target
                )

        def get_workspace_size(self, inputs: list[Any], _outputs: list[Any]) -> int:
            launcher = self._launcher()
            buckets = getattr(getattr(launcher, "bundle", None), "buckets", {}) or {}
            bounds = [bucket.get("bound") for bucket in buckets.values()]
            return io_rules.workspace_size(launcher, tuple(inputs[0].max), tuple(inputs[0].min), bounds)

        def get_valid_tactics(self) -> list[int]:
            return []

        def get_fields_to_serialize(self) -> Any:
            self._serialized_fields = state_to_fields(self.state)  # TensorRT reads the arrays after we return
            return to_field_collection(trt, self._serialized_fields)

        # IPluginV3OneRuntime
        def set_tactic(self, _tactic: int) -> None:
            return None

        def on_shape_change(self, inp: list[Any], _out: list[Any]) -> None:
            io_rules.check_input_dims(self.state.attrs, [tuple(d.dims) for d in inp])

        def attach_to_context(self, _context: Any) -> MoEPlugin:
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            call = io_rules.enqueue_call(
                self.state.attrs,
                self.state.dtype or io_dtype_name(input_desc[0].type),
                [_desc(d) for d in input_desc],
                [_desc(d) for d in output_desc],
                inputs,
                outputs,
                workspace,
                stream,
            )
            io_rules.enqueue(self._launcher(), call)

        def _launcher(self) -> Any:
            # At run time the GPU decides; at build time (workspace sizing) the target does.
            return _launcher(self.state.bundle_for(settings.target_sm()), self.state.attrs)

    class MoEPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = spec.PLUGIN_NAME
            self.plugin_namespace = spec.PLUGIN_NAMESPACE
            self.plugin_version = spec.PLUGIN_VERSION
            defaults = spec.MoEAttributes(num_experts=1, top_k=1, hidden_size=1, intermediate_size=1)
            self._field_arrays = attributes_to_fields(defaults)
            self.field_names = to_field_collection(trt, self._field_arrays)

        def create_plugin(self, _name: str, fc: Any, phase: Any) -> MoEPlugin:
            return MoEPlugin(state_from_fields(from_field_collection(fc)), phase)

    return MoEPlugin, MoEPluginCreator


class _ExprBuilder:
    """Adapts `trt.IExprBuilder` to io_rules.ExprBuilder (operation names instead of enum members)."""

    def __init__(self, trt: ModuleType, builder: Any) -> None:
        self._trt, self._builder = trt, builder

    def constant(self, value: int) -> Any:
        return self._builder.constant(value)

    def operation(self, op: str, first: Any, second: Any) -> Any:
        return self._builder.operation(getattr(self._trt.DimensionOperation, op), first, second)


def _dims_exprs(trt: ModuleType, exprs: list[Any]) -> Any:
    # Sized constructor + item assignment: the form every TensorRT 10 Python binding accepts.
    out = trt.DimsExprs(len(exprs))
    for i, expr in enumerate(exprs):
        out[i] = expr
    return out


def _desc(desc: Any) -> io_rules.TensorDesc:
    return io_rules.TensorDesc(tuple(desc.dims), io_dtype_name(desc.type), desc.format.name)


_registered: dict[int, tuple[Any, BuildSettings]] = {}


def register_plugin(
    trt: ModuleType | None = None,
    sm: int | None = None,
    kernel_source: KernelSource | None = None,
    library: str | Path | None = None,
) -> Any:
    """Register the MoE plugin creator with `trt`'s plugin registry (once per module); returns the creator.

    After this, TensorRT's ONNX parser builds every `moetrt::MoE` node with the plugin instead of inlining its
    function body, and engines holding the plugin deserialize. `library`: load the C++ plugin library
    (libmoetrt_plugin.so, built from src/moetrt/native with TensorRT's headers) into the registry instead of
    this module's Python class; its rules are the same (tests/test_native_cmake.py compares them), but at build
    time it reads each node's kernels from the node (`embedded_kernels`). A later call updates the build
    settings (target SM, kernel source) of the Python creator already registered.
    """
    trt = trt or import_tensorrt()
    if library is not None:
        return _load_library(trt, Path(library))
    if id(trt) in _registered:
        creator, settings = _registered[id(trt)]
        settings.sm = sm
        settings.kernel_source = kernel_source or compile_kernel_bytes
        return creator
    settings = BuildSettings(sm, kernel_source)
    _, creator_cls = make_plugin_classes(trt, settings)
    creator = creator_cls()
    registry = trt.get_plugin_registry()
    if not registry.register_creator(creator, spec.PLUGIN_NAMESPACE):
        raise MoetrtError(
            "TensorRT refused to register the moetrt MoE plugin creator",
            "another plugin named moetrt::MoE is already registered in this process",
        )
    _registered[id(trt)] = (creator, settings)
    return creator


def _load_library(trt: ModuleType, library: Path) -> Any:
    if not library.is_file():
        raise MoetrtError(
            f"plugin library {library} does not exist",
            "build it: cmake -S src/moetrt/native -B build/native -DTensorRT_ROOT=<TensorRT> && cmake --build build/native",
        )
    registry = trt.get_plugin_registry()
    existing = registry.get_creator(spec.PLUGIN_NAME, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE)
    if existing is not None and id(trt) in _registered:
        raise MoetrtError(
            "the Python moetrt::MoE plugin is already registered in this process",
            "load the plugin library in a fresh process (one creator per name)",
        )
    if existing is None:
        registry.load_library(str(library))
        existing = registry.get_creator(spec.PLUGIN_NAME, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE)
    if existing is None:
        raise MoetrtError(
            f"TensorRT loaded {library.name} but found no moetrt::MoE creator in it",
            "rebuild libmoetrt_plugin.so from this moetrt version",
        )
    return existing


def field_arrays(fields: Fields) -> dict[str, np.ndarray]:
    """Fields as plain arrays, the shape `state_from_fields` receives from a `PluginFieldCollection`."""
    return {name: data for name, (data, _kind) in fields.items()}
