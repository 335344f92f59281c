"""Engine builds through a TensorRT ONNX parser: shared pieces (profiles, logger, parse, build) and the
`tensorrt` path, where the parser builds each `moetrt::MoE` node with the registered IPluginV3.

Works with any module of TensorRT's Python API (`tensorrt`, `tensorrt_rtx`); `rtx_build.py` adds the
TensorRT-RTX specifics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import onnx

from moetrt.core.devices import sm_from_capability
from moetrt.core.errors import MoetrtError
from moetrt.core.files import write_bytes_atomic
from moetrt.trt.profiles import add_profiles
from moetrt.trt.targets import Target

if TYPE_CHECKING:
    from moetrt.trt.plugin import KernelSource

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EngineBuild:
    """What a build wrote, for the manifest."""

    plan_path: Path
    backend: str
    seconds: float
    plan_magic: str
    plugin: bool
    runs_on_sms: list[int]
    library_version: str
    warnings: list[str]


def onnx_output_dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    """The dims of graph output `name` (as `onnx_input_dims` gives them); [] when there is no such output."""
    for value in model.graph.output:
        if value.name == name:
            return [_dim(d) for d in value.type.tensor_type.shape.dim]
    return []


def _dim(dim: Any) -> int | str:
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else (dim.dim_param or "?")


def onnx_input_dims(model: onnx.ModelProto) -> list[tuple[str, list[int | str]]]:
    """Graph inputs (initializers excluded) with their dims: an int, or the dim's name (or "?") when dynamic."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str] = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(dim.dim_value)
            else:
                dims.append(dim.dim_param or "?")
        inputs.append((value.name, dims))
    return inputs


class CapturingLogger:
    """A TensorRT ILogger that keeps errors and warnings for the one-line failure message."""

    def __new__(cls, trt: ModuleType, verbose: bool = False) -> Any:
        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.warnings: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    self.warnings.append(msg)
                elif verbose:
                    print(f"[TensorRT] {msg}")

        return _Logger()


def parse_onnx(trt: ModuleType, builder: Any, logger: Any, model: onnx.ModelProto, onnx_path: Path) -> Any:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files beside the model.
    ok = (
        parser.parse_from_file(str(onnx_path))
        if _has_external_data(model)
        else parser.parse(model.SerializeToString(), str(onnx_path))
    )
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MoetrtError(
            f"the TensorRT ONNX parser refused {onnx_path.name}: {errors[0] if errors else ''}",
            "check `moetrt inspect` on the ONNX file; report the op it names",
        )
    return network


def build_and_serialize(
    trt: ModuleType,
    builder: Any,
    network: Any,
    config: Any,
    logger: Any,
    profiles: Sequence[dict[str, Any]],
    plan_path: Path,
    backend: str,
    plugin: bool,
    sm: int,
    started: float,
) -> EngineBuild:
    """Add the optimization profile, build, write `plan_path` atomically; what the build did, for the manifest."""
    add_profiles(builder, config, network, profiles)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1] if logger.errors else "no error message"
        raise MoetrtError(
            f"TensorRT failed to build the engine: {detail}", "run with --verbose for TensorRT's log"
        )
    data = bytes(serialized)
    write_bytes_atomic(plan_path, data)
    return EngineBuild(
        plan_path,
        backend,
        time.perf_counter() - started,
        data[:4].hex(),
        plugin,
        [sm],
        trt.__version__,
        logger.warnings[-20:],
    )


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def current_device_sm() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return sm_from_capability(*torch.cuda.get_device_capability())


def check_build_device(target: Target) -> None:
    """TensorRT (unlike TensorRT-RTX) builds for the GPU it runs on: refuse early, before kernels compile."""
    device_sm = current_device_sm()
    if device_sm is None:
        raise MoetrtError(
            "TensorRT builds engines on a CUDA GPU and none is visible",
            "run `moetrt build` on a machine with the target GPU, or use --engine-backend tensorrt-rtx",
        )
    if device_sm != target.sm:
        raise MoetrtError(
            f"TensorRT builds for the GPU it runs on (SM {device_sm}), not for target {target.name} "
            f"(SM {target.sm})",
            f"build on a {target.name} GPU, or pass --target sm_{device_sm}",
        )


def build_tensorrt_engine(
    onnx_path: Path,
    plan_path: Path,
    target: Target,
    profiles: Sequence[dict[str, Any]],
    progress: Progress,
    verbose: bool = False,
    workspace_gib: float | None = None,
    kernel_source: KernelSource | None = None,
    plugin_library: Path | None = None,
    dtype: str | None = None,
) -> EngineBuild:
    """Build `plan_path` from the fused ONNX with full TensorRT and the MoE IPluginV3 (cubins for target.sm).

    `kernel_source(attrs, dtype, sm)` gives each plugin its kernel bytes (default: compile them on demand).
    With `plugin_library` (libmoetrt_plugin.so), TensorRT loads the C++ plugin and the parser reads each MoE
    node's kernels, compiled for the I/O `dtype` and written into a copy of the model (`embedded_kernels`);
    without it, the Python plugin class compiles them when TensorRT configures it.
    """
    from moetrt.trt.plugin import compile_kernel_bytes, import_tensorrt, register_plugin

    trt = import_tensorrt()
    check_build_device(target)
    start = time.perf_counter()
    register_plugin(trt, sm=target.sm, kernel_source=kernel_source, library=plugin_library)
    logger = CapturingLogger(trt, verbose)
    builder = trt.Builder(logger)
    model = onnx.load(str(onnx_path), load_external_data=False)
    progress("parsing the fused ONNX with TensorRT's parser (MoE nodes → moetrt::MoE plugin)")
    if plugin_library is None:
        network = parse_onnx(trt, builder, logger, model, onnx_path)
    else:
        from moetrt.trt.embedded_kernels import embed_kernels

        if dtype is None:
            raise MoetrtError(
                "the C++ plugin's build needs the I/O dtype", "pass dtype to build_tensorrt_engine"
            )
        embed_kernels(model, dtype, target.sm, kernel_source or compile_kernel_bytes)
        # beside the original, so its external weight files resolve; removed once parsed
        parse_path = onnx_path.with_name(f".{onnx_path.stem}.with-kernels.onnx")
        try:
            onnx.save(model, str(parse_path))
            network = parse_onnx(trt, builder, logger, model, parse_path)
        finally:
            parse_path.unlink(missing_ok=True)
    plugin_layers = sum(
        1 for i in range(network.num_layers) if network.get_layer(i).type == trt.LayerType.PLUGIN_V3
    )
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    progress(
        f"building the TensorRT {trt.__version__} engine for {target.name} ({plugin_layers} MoE plugin layers)"
    )
    return build_and_serialize(
        trt,
        builder,
        network,
        config,
        logger,
        profiles,
        plan_path,
        "tensorrt",
        plugin_layers > 0,
        target.sm,
        start,
    )
