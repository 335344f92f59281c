"""Launch the MoE cubins with the CUDA driver API (cuda-python): the code path the TensorRT plugin calls.

No torch and no Triton here: cubins come from a `KernelBundle`, pointers are raw CUDA device pointers, the
stream is a raw CUstream handle. Argument packing (`pack_kernel_params`) is a pure function, tested on CPU
against the entry points Triton compiled.
"""

from __future__ import annotations

import ctypes
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from moetrt.core.devices import sm_from_capability
from moetrt.core.errors import MoetrtError
from moetrt.kernels import plan
from moetrt.kernels.aot import KernelBundle
from moetrt.op.spec import MoEAttributes

_DEFAULT_SHARED_LIMIT = 48 * 1024
_PACK = {"ptr": "<Q", "i32": "<i", "fp32": "<f"}


def pack_kernel_params(param_types: Sequence[str], values: Sequence[int | float]) -> tuple[bytes, list[int]]:
    """Pack kernel arguments as cuLaunchKernel expects them: one little-endian slot per parameter.

    param_types are Triton signature types ('*bf16', '*i32', 'i32', 'fp32', ...) of every parameter of the
    compiled entry point, in order. Returns (blob, offset of each parameter in blob); every slot is 8-byte
    aligned so the kernelParams array can point into one buffer.
    """
    if len(param_types) != len(values):
        raise ValueError(f"{len(param_types)} parameters but {len(values)} values")
    blob = bytearray()
    offsets = []
    for ty, value in zip(param_types, values, strict=True):
        kind = "ptr" if ty.startswith("*") else ty
        if kind not in _PACK:
            raise ValueError(f"unsupported parameter type {ty!r}")
        if kind == "ptr" and (not isinstance(value, int) or value < 0 or value >= 1 << 64):
            raise ValueError(f"pointer argument {value!r} is not a 64-bit address")
        if kind == "i32" and not -(1 << 31) <= int(value) < 1 << 31:
            raise ValueError(f"i32 argument {value} out of range")
        offsets.append(len(blob))
        blob += struct.pack(_PACK[kind], value)
        blob += b"\0" * (-len(blob) % 8)
    return bytes(blob), offsets


def resolve_launch_args(
    launch: plan.Launch,
    attrs: MoEAttributes,
    layout: dict[str, plan.Region],
    scratch_params: int,
    num_tokens: int,
    input_ptrs: Sequence[int],
    output_ptrs: Sequence[int],
    workspace_ptr: int,
) -> list[int]:
    """Values of one launch's parameters: op tensors, workspace regions, T and host ints, then null scratch.

    Pure (no CUDA): input pointers in attrs.present_inputs() order, outputs in present_outputs() order.
    """
    inputs = dict(zip(attrs.present_inputs(), input_ptrs, strict=True))
    outputs = dict(zip(attrs.present_outputs(), output_ptrs, strict=True))
    values: list[int] = []
    for src, ref in launch.args:
        if src == "in":
            values.append(inputs[ref])
        elif src == "out":
            values.append(outputs[ref])
        elif src == "ws":
            values.append(workspace_ptr + layout[ref].offset)
        elif src == "T":
            values.append(num_tokens)
        else:
            values.append(int(ref))
    return values + [0] * scratch_params


def pdl_launch_config(drv: Any, grid: tuple[int, int, int], threads: int, shared: int, stream: Any) -> Any:
    """cuLaunchKernelEx config with programmatic stream serialization: the kernel may start launching while
    the previous one finishes; it waits for it with griddepcontrol.wait before touching memory (SM90+)."""
    config = drv.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
    config.sharedMemBytes = shared
    config.hStream = stream
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    config.attrs = [attr]
    config.numAttrs = 1
    return config


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError as err:
            raise MoetrtError(
                "cuda-python is not installed", "pip install cuda-python (or cuda-bindings)"
            ) from err
    return driver


class MoELauncher:
    """Loads a bundle's cubins into the current CUDA context and enqueues the op on a stream."""

    def __init__(self, bundle: KernelBundle, attrs: MoEAttributes) -> None:
        if bundle.moe_attributes() != attrs:
            raise MoetrtError(
                "kernel bundle was compiled for other MoE attributes",
                "compile a bundle for these attributes (aot.compile_kernels)",
            )
        self.bundle = bundle
        self.attrs = attrs
        self._drv = _driver()
        self._ensure_context()
        self._functions: dict[str, Any] = {}
        self._modules = []
        for key, kernel in bundle.kernels.items():
            module = self._check(self._drv.cuModuleLoadData(kernel.cubin), f"loading cubin {key}")
            self._modules.append(module)
            function = self._check(
                self._drv.cuModuleGetFunction(module, kernel.name.encode()), f"finding {kernel.name}"
            )
            if kernel.shared > _DEFAULT_SHARED_LIMIT:
                attr = self._drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                self._check(
                    self._drv.cuFuncSetAttribute(function, attr, kernel.shared),
                    f"allowing {kernel.shared} bytes of shared memory for {key}",
                )
            self._functions[key] = function
        self._buckets: dict[int | None, tuple[dict[str, plan.StageRef], dict[str, Any]]] = {}
        for bucket in bundle.buckets.values():
            refs = {
                stage: plan.StageRef(key, tuple(bucket["constexprs"][key].items()))
                for stage, key in bucket["variants"].items()
            }
            self._buckets[bucket["bound"]] = (refs, bucket["config"])
        if not self._buckets:
            raise MoetrtError("kernel bundle has no token bucket", "recompile it with aot.compile_kernels")
        self._plans: OrderedDict[int, tuple[list[plan.Launch], dict[str, plan.Region]]] = OrderedDict()
        self._packed_cache: OrderedDict[tuple[Any, ...], tuple[Any, Any]] = OrderedDict()

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._drv.CUresult.CUDA_SUCCESS:
            name = self._drv.cuGetErrorName(err)[1]
            raise MoetrtError(
                f"CUDA driver error {name.decode() if isinstance(name, bytes) else name} while {what}",
                "check the device pointers, the stream and that the bundle's SM matches the GPU",
            )
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _ensure_context(self) -> None:
        drv = self._drv
        self._check(drv.cuInit(0), "initialising the CUDA driver")
        ctx = self._check(drv.cuCtxGetCurrent(), "reading the current context")
        if ctx is None or int(ctx) == 0:
            device = self._check(drv.cuDeviceGet(0), "opening device 0")
            ctx = self._check(drv.cuDevicePrimaryCtxRetain(device), "retaining the primary context")
            self._check(drv.cuCtxSetCurrent(ctx), "making the primary context current")
        device = self._check(drv.cuCtxGetDevice(), "reading the current device")
        attr = drv.CUdevice_attribute
        major = self._check(
            drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), ""
        )
        minor = self._check(
            drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), ""
        )
        if sm_from_capability(major, minor) != self.bundle.sm:
            raise MoetrtError(
                f"kernel bundle is for sm_{self.bundle.sm}, the GPU is sm_{major}{minor}",
                f"compile the kernels for sm_{major}{minor} (moetrt aot --sm {major}{minor})",
            )

    def workspace_size(self, num_tokens: int) -> int:
        """Bytes of device workspace `enqueue` needs for `num_tokens` tokens (256-byte aligned)."""
        if num_tokens <= 0:
            return 0
        return self.launch_plan(num_tokens)[1]["total"].nbytes

    def launch_plan(self, num_tokens: int) -> tuple[list[plan.Launch], dict[str, plan.Region]]:
        """The launches and workspace layout for `num_tokens` (cached per token count)."""
        cached = self._plans.get(num_tokens)
        if cached is None:
            try:
                bound = plan.bucket_of(num_tokens, tuple(self._buckets))
            except ValueError as err:
                raise MoetrtError(
                    f"kernel bundle has no token bucket for {num_tokens} tokens",
                    "compile it with the unbounded bucket (the default of compile_kernels)",
                ) from err
            refs, cfg = self._buckets[bound]
            dtype = self.bundle.dtype
            cached = (
                plan.launch_sequence(self.attrs, dtype, num_tokens, refs, cfg, bound),
                plan.workspace_layout(self.attrs, dtype, num_tokens, cfg, bound),
            )
            self._plans[num_tokens] = cached
            if len(self._plans) > 256:
                self._plans.popitem(last=False)
        return cached

    def resolve_args(
        self,
        launch: plan.Launch,
        num_tokens: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
    ) -> list[int]:
        """Device pointers / ints of one launch's runtime parameters, scratch pointers (null) appended."""
        return resolve_launch_args(
            launch,
            self.attrs,
            self.launch_plan(num_tokens)[1],
            self.bundle.kernels[launch.variant_key].scratch_params,
            num_tokens,
            input_ptrs,
            output_ptrs,
            workspace_ptr,
        )

    def enqueue(
        self,
        num_tokens: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
        stream: int,
    ) -> None:
        """Launch the op for `num_tokens` tokens on `stream` (asynchronous; nothing for 0 tokens)."""
        if len(input_ptrs) != len(self.attrs.present_inputs()):
            raise MoetrtError(
                f"{len(input_ptrs)} input pointers for {len(self.attrs.present_inputs())} inputs",
                f"pass them in this order: {', '.join(self.attrs.present_inputs())}",
            )
        if len(output_ptrs) != len(self.attrs.present_outputs()):
            raise MoetrtError(
                f"{len(output_ptrs)} output pointers for {len(self.attrs.present_outputs())} outputs",
                f"pass them in this order: {', '.join(self.attrs.present_outputs())}",
            )
        if num_tokens < 0:
            raise MoetrtError(f"negative token count {num_tokens}", "pass T >= 0")
        if num_tokens == 0:
            return
        misaligned = [p for p in [*input_ptrs, *output_ptrs, workspace_ptr] if p % 16]
        if misaligned or not workspace_ptr:
            raise MoetrtError(
                "a device pointer is null or not 16-byte aligned",
                "allocate inputs, outputs and workspace with the CUDA allocator (256-byte aligned)",
            )
        self.enqueue_ops(
            num_tokens, input_ptrs, output_ptrs, workspace_ptr, stream, self.launch_plan(num_tokens)[0]
        )

    def enqueue_ops(
        self,
        num_tokens: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
        stream: int,
        ops: Sequence[plan.Launch],
    ) -> None:
        """Launch some ops of the plan (all of them: `enqueue`; one at a time: per-stage profiling)."""
        drv = self._drv
        cu_stream = drv.CUstream(stream)
        for op in ops:
            params, keep_alive = self._packed(
                op, num_tokens, tuple(input_ptrs), tuple(output_ptrs), workspace_ptr
            )
            kernel = self.bundle.kernels[op.variant_key]
            gx, gy, gz = op.grid
            if op.pdl:
                config = pdl_launch_config(drv, op.grid, 32 * kernel.num_warps, kernel.shared, cu_stream)
                self._check(
                    drv.cuLaunchKernelEx(
                        config, self._functions[op.variant_key], ctypes.addressof(params), 0
                    ),
                    f"launching {op.stage} (programmatic dependent launch)",
                )
            else:
                self._check(
                    drv.cuLaunchKernel(
                        self._functions[op.variant_key],
                        gx,
                        gy,
                        gz,
                        32 * kernel.num_warps,
                        1,
                        1,
                        kernel.shared,
                        cu_stream,
                        ctypes.addressof(params),
                        0,
                    ),
                    f"launching {op.stage}",
                )
            del keep_alive

    def _packed(
        self,
        op: plan.Launch,
        num_tokens: int,
        input_ptrs: tuple[int, ...],
        output_ptrs: tuple[int, ...],
        workspace_ptr: int,
    ) -> tuple[Any, Any]:
        """The kernelParams array of one launch (cached: a serving loop reuses the same pointers)."""
        key = (op, num_tokens, input_ptrs, output_ptrs, workspace_ptr)
        cached = self._packed_cache.get(key)
        if cached is None:
            kernel = self.bundle.kernels[op.variant_key]
            values = self.resolve_args(op, num_tokens, input_ptrs, output_ptrs, workspace_ptr)
            types = list(kernel.param_types) + ["*i8"] * kernel.scratch_params
            blob, offsets = pack_kernel_params(types, values)
            buffer = ctypes.create_string_buffer(blob, len(blob))
            base = ctypes.addressof(buffer)
            params = (ctypes.c_void_p * len(offsets))(*[base + off for off in offsets])
            cached = self._packed_cache[key] = (params, buffer)
            if len(self._packed_cache) > 512:
                self._packed_cache.popitem(last=False)
        return cached
