"""`Engine`: a TensorRT (or TensorRT-RTX) plan run by tensor name with torch CUDA tensors.

Before TensorRT is imported the plan is checked against its manifest.json (hash, header, target SM, see
`manifest.check_plan`), so a corrupt, foreign or wrong-GPU plan fails with one clear line. The MoE plugin is
registered for plans built with it. Dynamic shapes: inputs set the shapes, outputs are allocated from the shapes
TensorRT infers (or through an output allocator when they are data-dependent). `capture_graph` records one
CUDA graph for a fixed shape and replays it without any Python launch cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from moetrt.core.artifacts import MANIFEST_NAME, ONNX_NAME
from moetrt.core.errors import MoetrtError
from moetrt.runtime.decoder_io import check_decoder_feeds, state_from_manifest
from moetrt.runtime.manifest import check_plan, read_manifest
from moetrt.runtime.session import check_inputs
from moetrt.trt.profiles import check_in_profile
from moetrt.trt.trt_build import CapturingLogger, current_device_sm

_TRT_TO_TORCH = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
}


def import_backend(backend: str) -> ModuleType:
    """The TensorRT module an engine of `backend` needs, with the MoE plugin registered where it has one."""
    if backend == "tensorrt-rtx":
        from moetrt.trt.rtx_build import import_tensorrt_rtx

        return import_tensorrt_rtx()
    from moetrt.trt.plugin import import_tensorrt, register_plugin

    trt = import_tensorrt()
    register_plugin(trt)
    return trt


class Engine:
    """Run a plan: `engine({"input_ids": ids}) -> {"logits": ...}` (CUDA tensors in, CUDA tensors out)."""

    def __init__(self, plan_path: str | Path, manifest: dict[str, Any] | None = None) -> None:
        self.path = Path(plan_path)
        beside = self.path.parent / MANIFEST_NAME
        if manifest is None and beside.is_file():
            manifest = read_manifest(beside)
        device_sm = current_device_sm()
        check_plan(self.path, manifest, device_sm)
        assert manifest is not None  # check_plan refuses a plan without one
        if device_sm is None:
            raise MoetrtError(
                "no CUDA GPU is visible: TensorRT engines run on a GPU",
                f"run the portable model instead: `moetrt run {self.path.parent / ONNX_NAME}`",
            )
        self.manifest = manifest
        self.backend = manifest["engine"]["backend"]
        self.profiles = manifest["profiles"]
        trt = import_backend(self.backend)
        self._trt = trt
        self._logger = CapturingLogger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            detail = self._logger.errors[-1] if self._logger.errors else "no error message"
            raise MoetrtError(
                f"TensorRT could not load {self.path.name}: {detail}",
                f"rebuild it with `moetrt build` using this TensorRT ({trt.__version__})",
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: _TRT_TO_TORCH[self._engine.get_tensor_dtype(n).name] for n in names}
        self.input_specs = {
            n: (self._dtypes[n], [d if d >= 0 else "?" for d in self._engine.get_tensor_shape(n)])
            for n in self.input_names
        }
        self.state = state_from_manifest(manifest)
        self._profile = 0
        self._allocator: _OutputAllocator | None = None
        self._bound_inputs: dict[str, torch.Tensor] = {}

    def __call__(
        self, inputs: Mapping[str, torch.Tensor] | None = None, **named: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        self._prepare(dict(inputs or {}, **named))
        outputs = self._allocate_outputs()
        self._execute(torch.cuda.current_stream())
        if self._allocator is not None:
            outputs.update(self._allocator.take())
        return outputs

    def capture_graph(self, inputs: Mapping[str, torch.Tensor]) -> CudaGraphRunner:
        """Record one execution for these input shapes; replay it with new values of the same shapes."""
        static_inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        self._prepare(static_inputs)
        static_outputs = self._allocate_outputs()
        if self._allocator is not None:
            raise MoetrtError(
                "this engine has data-dependent output shapes, which a CUDA graph cannot capture",
                "call the engine directly",
            )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._execute(side)  # lets TensorRT finish its lazy set-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self._execute(side)
        return CudaGraphRunner(graph, static_inputs, static_outputs)

    def _prepare(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_inputs(feeds, self.input_specs)
        on_cpu = [name for name, t in feeds.items() if not t.is_cuda]
        if on_cpu:
            raise MoetrtError(
                f"inputs {on_cpu} are on the CPU; a TensorRT engine takes CUDA tensors",
                "move them with .cuda()",
            )
        shapes = {name: list(t.shape) for name, t in feeds.items()}
        if self.state is not None:
            check_decoder_feeds(self.state, shapes)
        profile = check_in_profile(self.profiles, shapes)
        if profile != self._profile:  # a cached decoder's prefill and decode profiles
            self._context.set_optimization_profile_async(profile, torch.cuda.current_stream().cuda_stream)
            self._profile = profile
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            feeds[name] = tensor
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        # TensorRT holds raw addresses: keep the (contiguous) inputs alive until the next call. Freed earlier,
        # the caching allocator could hand their memory to the outputs allocated next.
        self._bound_inputs = feeds
        return feeds

    def _allocate_outputs(self) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                # Data-dependent: TensorRT asks the allocator once it knows the size.
                self._allocator = self._allocator or _OutputAllocator(self._trt, self._dtypes)
                self._context.set_output_allocator(name, self._allocator)
                continue
            out = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            self._context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        return outputs

    def _execute(self, stream: torch.cuda.Stream) -> None:
        if not self._context.execute_async_v3(stream.cuda_stream):
            detail = self._logger.errors[-1] if self._logger.errors else "no error message"
            raise MoetrtError(
                f"TensorRT execution failed: {detail}", "check input shapes with `moetrt inspect`"
            )


class CudaGraphRunner:
    """A captured engine execution: `runner(inputs)` copies into the captured buffers and replays.

    The returned tensors are the captured output buffers: the next replay overwrites them (clone to keep).
    """

    def __init__(
        self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, static in self.inputs.items():
            if inputs[name].shape != static.shape:
                raise MoetrtError(
                    f"input {name} shape {tuple(inputs[name].shape)} differs from the captured "
                    f"{tuple(static.shape)}",
                    "capture another graph for this shape",
                )
            static.copy_(inputs[name])
        self.graph.replay()
        return self.outputs


class _OutputAllocator:
    """trt.IOutputAllocator that hands TensorRT torch buffers for outputs whose shape depends on the data."""

    def __new__(cls, trt: ModuleType, dtypes: dict[str, torch.dtype]) -> Any:
        class Allocator(trt.IOutputAllocator):
            def __init__(self) -> None:
                trt.IOutputAllocator.__init__(self)
                self.buffers: dict[str, torch.Tensor] = {}
                self.shapes: dict[str, tuple[int, ...]] = {}

            def reallocate_output_async(
                self, name: str, _memory: int, size: int, _alignment: int, _stream: int
            ) -> int:
                buffer = self.buffers.get(name)
                if buffer is None or buffer.numel() < size:
                    buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                    self.buffers[name] = buffer
                return buffer.data_ptr()

            def notify_shape(self, name: str, shape: Any) -> None:
                self.shapes[name] = tuple(shape)

            def take(self) -> dict[str, torch.Tensor]:
                out = {}
                for name, shape in self.shapes.items():
                    dtype = dtypes[name]
                    count = int(torch.tensor(shape).prod().item()) if shape else 1
                    out[name] = self.buffers[name].view(dtype)[:count].view(shape).clone()
                return out

        return Allocator()
