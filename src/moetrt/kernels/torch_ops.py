"""PyTorch conveniences over the fused MoE kernels.

`moe_forward`: CUDA tensors through the ahead-of-time cubins and the CUDA-driver launcher (the same path the
TensorRT plugin takes). `moe_forward_triton`: the same launch sequence through Triton's JIT, which also runs on
CPU tensors under TRITON_INTERPRET=1 (used by the CPU tests).
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from moetrt.core.devices import sm_from_capability
from moetrt.core.dtypes import kernel_name_of
from moetrt.core.errors import MoetrtError
from moetrt.kernels import plan
from moetrt.op.spec import MoEAttributes, stored_dtype

if TYPE_CHECKING:
    from moetrt.kernels.aot import KernelBundle
    from moetrt.kernels.launcher import MoELauncher

_KIND_DTYPE = {"f32": torch.float32, "i32": torch.int32, "q": torch.uint8}


def check_inputs(
    inputs: dict[str, torch.Tensor], attrs: MoEAttributes, device_type: str | None = None
) -> int:
    """Validate names, shapes, dtypes, contiguity and alignment; return the token count."""
    missing = [name for name in attrs.present_inputs() if name not in inputs]
    if missing:
        raise MoetrtError(
            f"missing MoE inputs {missing}",
            f"pass every input of attrs.present_inputs(): {list(attrs.present_inputs())}",
        )
    hidden = inputs["hidden_states"]
    if hidden.dim() != 2:
        raise MoetrtError(
            f"hidden_states must be [T, H], got shape {tuple(hidden.shape)}",
            "flatten batch and sequence into one token dimension",
        )
    num_tokens = hidden.shape[0]
    kernel_name_of(hidden.dtype)
    for name, shape in attrs.input_shapes(num_tokens).items():
        tensor = inputs[name]
        if tuple(tensor.shape) != tuple(shape):
            raise MoetrtError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}",
                "check the weights against the MoE attributes (spec.py layouts)",
            )
        want = _input_dtype(name, attrs, hidden.dtype)
        if tensor.dtype != want:
            raise MoetrtError(
                f"{name} is {tensor.dtype} but must be {want} (hidden_states is {hidden.dtype})",
                "cast every native weight to the dtype of hidden_states; quantized parts as op/quant.py stores them",
            )
        if device_type is not None and tensor.device.type != device_type:
            raise MoetrtError(
                f"{name} is on {tensor.device}, expected a {device_type} tensor",
                f"move every input to {device_type}",
            )
        if not tensor.is_contiguous():
            raise MoetrtError(f"{name} is not contiguous", "call .contiguous() on it first")
        if tensor.numel() and tensor.data_ptr() % 16:
            raise MoetrtError(f"{name} is not 16-byte aligned", "pass a freshly allocated tensor (.clone())")
    return num_tokens


def _input_dtype(name: str, attrs: MoEAttributes, activation: torch.dtype) -> torch.dtype:
    """The dtype an op input must have (`spec.stored_dtype`; else the activations')."""
    stored = stored_dtype(name, attrs)
    return activation if stored is None else getattr(torch, stored)


def _outputs(attrs: MoEAttributes, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    t = hidden.shape[0]
    out = {"output": torch.empty(t, attrs.hidden_size, dtype=hidden.dtype, device=hidden.device)}
    if attrs.output_router_logits:
        out["router_logits"] = torch.empty(t, attrs.num_experts, dtype=hidden.dtype, device=hidden.device)
    return out


def _interpreter_fixes() -> None:
    """Gaps of Triton 3.6's CPU interpreter, patched in the interpreter only (compiled kernels unaffected):
    scalars are 1-element arrays and loop bounds call int() on them, which numpy >= 2.4 refuses; bf16 is
    held as raw 16-bit integers (e4m3 as 8-bit ones), so tl.dot multiplies the bit patterns, int/bool -> bf16 casts copy integer
    bits, fp32 -> bf16 truncates where the GPU rounds to nearest even, and fp32 -> e4m3 loses the carry of its
    rounding into the exponent. The fixes compute what the GPU computes: bf16 products exact in fp32 with fp32
    accumulation, casts rounded to nearest even."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_moetrt_fixes", False):
        return
    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(
        self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any
    ) -> Any:
        def upcast(x: Any) -> Any:
            if x.dtype == tl.bfloat16:
                bits = x.data.view(np.uint16).astype(np.uint32) << 16
                return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
            if x.dtype == tl.float8e4nv:  # e4m3 codes: their values, exact in fp32
                import torch

                values = torch.from_numpy(x.data.view(np.uint8)).view(torch.float8_e4m3fn).float().numpy()
                return interpreter.TensorHandle(values, tl.float32)
            return x

        return original_dot(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    def to_f32(x: Any) -> Any:
        if x.dtype.scalar == tl.bfloat16:
            return (x.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return x.data.astype(np.float32)

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        src_bf16, dst_bf16 = src.dtype.scalar == tl.bfloat16, dst_type.scalar == tl.bfloat16
        if dst_bf16 and not src_bf16:
            bits = to_f32(src).view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        if src_bf16 and not dst_bf16:
            f32 = to_f32(src)
            return interpreter.TensorHandle(f32.astype(interpreter._get_np_dtype(dst_type)), dst_type.scalar)
        return original_cast(self, src, dst_type)

    original_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        if dst_type.scalar == tl.float8e4nv and not src.dtype.scalar.is_fp8():
            import torch  # e4m3 rounded to nearest even, as the GPU's cvt.rn.satfinite (values within +-448)

            values = torch.from_numpy(to_f32(src)).clamp(-448.0, 448.0)  # satfinite
            codes = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(codes, tl.float8e4nv)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    interpreter.InterpreterBuilder.cast_impl = cast_impl
    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter._moetrt_fixes = True


def moe_forward_triton(
    inputs: dict[str, torch.Tensor],
    attrs: MoEAttributes,
    config: dict[str, Any] | None = None,
    bucket: int | str | None = "auto",
) -> dict[str, torch.Tensor]:
    """Run the op's launch sequence through Triton JIT (GPU, or CPU with TRITON_INTERPRET=1).

    `config` overrides the bucket's block sizes (default: configs.default_config); `bucket` forces a token
    bucket (e.g. the prefill path for a few tokens). The workspace is filled with garbage first, so a kernel
    that relies on unwritten memory fails the comparison.
    """
    from moetrt.kernels.configs import default_config
    from moetrt.kernels.triton_moe import KERNELS

    num_tokens = check_inputs(inputs, attrs)
    hidden = inputs["hidden_states"]
    dtype = kernel_name_of(hidden.dtype)
    outputs = _outputs(attrs, hidden)
    if num_tokens == 0:
        return outputs
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_fixes()
    bound = plan.bucket_of(num_tokens) if bucket == "auto" else bucket
    if bound is not None and (not isinstance(bound, int) or num_tokens > bound):
        raise MoetrtError(
            f"bucket {bound!r} cannot serve {num_tokens} tokens", "pass 'auto', None or a larger bound"
        )
    cfg = config or default_config(attrs, dtype, bound)
    if plan.uses_pdl(cfg) and os.environ.get("TRITON_INTERPRET") == "1":
        raise MoetrtError(
            "programmatic dependent launch has no CPU interpreter form",
            "pass a config with pdl disabled (the default)",
        )
    variants = plan.bucket_variants(attrs, dtype, bound, cfg)
    layout = plan.workspace_layout(attrs, dtype, num_tokens, cfg, bound)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    workspace = torch.randint(0, 256, (layout["total"].nbytes,), dtype=torch.uint8, generator=gen).to(
        hidden.device
    )
    by_key = {v.key: v for v in variants.values()}
    # what a launcher keeps per stream: zero before the call, and zero again after it (checked below)
    state = torch.zeros(plan.STATE_BYTES // 4, dtype=torch.int32, device=hidden.device)

    def region(name: str, dt: torch.dtype) -> torch.Tensor:
        reg = layout[name]
        if reg.nbytes == 0:
            return workspace[:16].view(dt)
        return workspace[reg.offset : reg.offset + reg.nbytes].view(dt)

    # persistent grids: at most one program per SM of this GPU (plan.device_grid)
    sm_count = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 0
    for op in plan.launch_sequence(attrs, dtype, num_tokens, variants, cfg, bound):
        variant = by_key[op.variant_key]
        args: list[Any] = []
        params = plan.KERNEL_PARAMS[variant.kernel]
        # past the kernel's parameters: Triton's global scratch (tma_scratch), which Triton's launcher allocates
        assert op.args[len(params) :] in ((), plan.TMA_SCRATCH_ARG), op.args[len(params) :]
        if len(op.args) > len(params) and hidden.is_cuda:
            _set_triton_allocator()
        for (_, kind), (src, ref) in zip(params, op.args[: len(params)], strict=True):
            if src == "T":
                args.append(num_tokens)
            elif src == "int":
                args.append(int(ref))
            elif src == "in":
                args.append(inputs[ref])
            elif src == "out":
                args.append(outputs[ref])
            elif src == "state":
                offset, nbytes = plan.STATE_REGIONS[ref]
                args.append(state[offset // 4 : (offset + nbytes) // 4])
            else:
                args.append(region(ref, hidden.dtype if kind == "x" else _KIND_DTYPE[kind]))
        grid = plan.device_grid(op.grid, dict(variant.constexprs), sm_count)
        KERNELS[variant.kernel][grid](
            *args, **dict(variant.constexprs), num_warps=variant.num_warps, num_stages=variant.num_stages
        )
    if bool(state.any()):  # a later call would find it non-zero and route wrong
        raise MoetrtError("a kernel left the launcher's per-stream state non-zero", "report this as a bug")
    return outputs


@cache
def _set_triton_allocator() -> None:
    """Triton's JIT launcher allocates a kernel's global scratch (the TMA grouped GEMMs' descriptors) through
    this allocator; the AOT launcher points it at the workspace instead."""
    import triton

    def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)


@cache
def _cached_bundle(attrs: MoEAttributes, dtype: str, sm: int) -> KernelBundle:
    from moetrt.kernels.aot import compile_kernels

    return compile_kernels(attrs, dtype, sm, workers=min(16, os.cpu_count() or 1))


_LAUNCHERS: dict[tuple[int, int], MoELauncher] = {}


def moe_forward(
    inputs: dict[str, torch.Tensor],
    attrs: MoEAttributes,
    bundle: KernelBundle | None = None,
    outputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the op on CUDA tensors through AOT cubins and the CUDA-driver launcher on torch's current stream.

    Without `bundle`, one is compiled (and cached per process) for the current device's SM. `outputs`
    (optional) are preallocated output tensors to write into.
    """
    num_tokens = check_inputs(inputs, attrs, device_type="cuda")
    hidden = inputs["hidden_states"]
    bundle = _bundle_for(attrs, hidden, bundle)
    if outputs is None:
        outputs = _outputs(attrs, hidden)
    else:
        expected = _outputs(attrs, hidden[:0])
        for name in attrs.present_outputs():
            out = outputs.get(name)
            want = (num_tokens, expected[name].shape[1])
            if (
                out is None
                or tuple(out.shape) != want
                or out.dtype != hidden.dtype
                or not out.is_contiguous()
            ):
                raise MoetrtError(
                    f"output {name} must be a contiguous {hidden.dtype} tensor of shape {want}",
                    "or pass outputs=None to allocate them",
                )
    if num_tokens:
        _enqueue(inputs, attrs, bundle, outputs, num_tokens)
    return outputs


def moe_expert_ids(
    inputs: dict[str, torch.Tensor], attrs: MoEAttributes, bundle: KernelBundle | None = None
) -> torch.Tensor:
    """The experts [T, top_k] (int32) the kernels route each token to: the op runs once on CUDA tensors and
    the top-k ids are read back from its workspace. Lets a comparison route the reference the same way
    where a near-tie of router scores can flip the choice."""
    num_tokens = check_inputs(inputs, attrs, device_type="cuda")
    hidden = inputs["hidden_states"]
    if num_tokens == 0:
        return torch.empty(0, attrs.top_k, dtype=torch.int32, device=hidden.device)
    bundle = _bundle_for(attrs, hidden, bundle)
    launcher, workspace = _enqueue(inputs, attrs, bundle, _outputs(attrs, hidden), num_tokens)
    region = launcher.launch_plan(num_tokens)[1]["topk_ids"]
    ids = workspace[region.offset : region.offset + region.nbytes].view(torch.int32)
    return ids.view(num_tokens, attrs.top_k).clone()


def _bundle_for(attrs: MoEAttributes, hidden: torch.Tensor, bundle: KernelBundle | None) -> KernelBundle:
    """`bundle`, checked against the inputs' dtype; without one, the process's bundle for this device's SM."""
    dtype = kernel_name_of(hidden.dtype)
    if bundle is None:
        major, minor = torch.cuda.get_device_capability(hidden.device)
        return _cached_bundle(attrs, dtype, sm_from_capability(major, minor))
    if bundle.dtype != dtype:
        raise MoetrtError(
            f"kernel bundle was compiled for {bundle.dtype}, inputs are {dtype}",
            f"compile a bundle for {dtype}",
        )
    return bundle


def _enqueue(
    inputs: dict[str, torch.Tensor],
    attrs: MoEAttributes,
    bundle: KernelBundle,
    outputs: dict[str, torch.Tensor],
    num_tokens: int,
) -> tuple[MoELauncher, torch.Tensor]:
    """Launch the op on torch's current stream (launcher cached per bundle and device); its workspace back."""
    from moetrt.kernels.launcher import MoELauncher

    hidden = inputs["hidden_states"]
    with torch.cuda.device(hidden.device):
        cache_key = (id(bundle), hidden.device.index or 0)
        launcher = _LAUNCHERS.get(cache_key)
        if launcher is None or launcher.bundle is not bundle:
            launcher = _LAUNCHERS[cache_key] = MoELauncher(bundle, attrs)
        workspace = torch.empty(launcher.workspace_size(num_tokens), dtype=torch.uint8, device=hidden.device)
        launcher.enqueue(
            num_tokens,
            [inputs[name].data_ptr() for name in attrs.present_inputs()],
            [outputs[name].data_ptr() for name in attrs.present_outputs()],
            workspace.data_ptr(),
            torch.cuda.current_stream(hidden.device).cuda_stream,
        )
    return launcher, workspace
