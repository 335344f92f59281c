"""Ahead-of-time compilation of the MoE kernels into cubins, on any machine (no GPU needed).

`compile_kernels(attrs, dtype, sm)` compiles every kernel variant of every token bucket for one SM and packs
cubins, entry names and launch metadata into a `KernelBundle`; `KernelBundle.to_bytes()` is what a TensorRT
engine carries in its plugin fields, and `from_bytes` restores it without Triton.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moetrt.core import dtypes
from moetrt.core.devices import FP8_TENSOR_CORE_MIN_SM, has_fp8_conversion, has_fp8_tensor_cores
from moetrt.core.dtypes import kernel_name_of
from moetrt.core.errors import MoetrtError
from moetrt.kernels import plan
from moetrt.op.spec import MoEAttributes, stored_dtype_name

SUPPORTED_SMS = (80, 86, 87, 89, 90, 100, 120)
#: Most dynamic shared memory one block may use on each SM (CUDA programming guide, compute capabilities).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
BUNDLE_MAGIC = b"MOETRTKB"
# 3: parameter sources and the op's I/O in the header; 4: split gate_up (gu_part, gu_tickets); 5: the routed
# path (routed_experts, the units counters); 6: fp8 activations quantized once (xq, xs, actq, acts; the router
# kernel's quantizing columns); 7: grouped row blocks (gate_up / down GM: grids and block tables of whole
# groups, which a planner that predates them would launch short); 8: TMA grouped GEMMs (gate_up / down_rows
# TMA: a launch argument past the kernel's parameters for Triton's global scratch, the tma_scratch region); 9:
# persistent grouped GEMMs (gate_up / down PERSIST: grids of at most PERSIST programs, and their descriptors,
# one more over the shared expert's weight, in tma_scratch); 10: the fused decode experts kernel casts its sum
# (out and tickets among its parameters; no finalize kernel); 11: the router kernel that routes (router_topk:
# a 'state' parameter, memory the launcher keeps per stream; decode buckets without a top-k stage); 12: 4-bit
# codes read in runs of 8 (op version 2, op.quant: a version-11 kernel would read other k from the same bytes); 13:
# the router's shared gate in a column of programs of its own where the config asks (`GATE_COL`: a version-12
# launcher would launch that column short)
BUNDLE_VERSION = 13


@dataclass(frozen=True)
class CompiledKernel:
    """One cubin and what a launcher needs besides it."""

    key: str
    kernel: str  # the Triton kernel (plan.KERNEL_PARAMS key) this variant compiles
    name: str  # entry point in the cubin
    cubin: bytes
    num_warps: int
    shared: int  # bytes of dynamic shared memory
    param_types: tuple[str, ...]  # runtime params, in order (the two scratch pointers come after)
    scratch_params: int  # trailing pointer params the Triton ABI adds (global + profile scratch)


@dataclass
class KernelBundle:
    """Cubins for one (attributes, dtype, SM) and the per-bucket launch configuration."""

    attrs: dict[str, Any]
    dtype: str
    sm: int
    triton_version: str
    kernels: dict[str, CompiledKernel] = field(default_factory=dict)
    # bucket name -> {"bound": int | None, "config": block sizes, "variants": stage -> kernel key,
    #                 "constexprs": kernel key -> constexpr dict}
    buckets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def moe_attributes(self) -> MoEAttributes:
        return MoEAttributes.from_onnx_attributes(self.attrs)

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []
        kernels = []
        offset = 0
        for kernel in self.kernels.values():
            kernels.append(
                {
                    "key": kernel.key,
                    "kernel": kernel.kernel,
                    "param_sources": [list(src) for src in plan.param_sources(kernel.kernel)],
                    "name": kernel.name,
                    "num_warps": kernel.num_warps,
                    "shared": kernel.shared,
                    "param_types": list(kernel.param_types),
                    "scratch_params": kernel.scratch_params,
                    "offset": offset,
                    "size": len(kernel.cubin),
                }
            )
            blobs.append(kernel.cubin)
            offset += len(kernel.cubin)
        header = json.dumps(
            {
                "version": BUNDLE_VERSION,
                "attrs": self.attrs,
                "dtype": self.dtype,
                "sm": self.sm,
                "triton_version": self.triton_version,
                "kernels": kernels,
                "buckets": self.buckets,
                # the launcher's per-stream state: its size and each region's [byte offset, bytes]
                "state": {
                    "bytes": plan.STATE_BYTES,
                    "regions": {name: list(region) for name, region in plan.STATE_REGIONS.items()},
                },
                **_io_header(self.moe_attributes(), self.dtype),
            },
            sort_keys=True,
        ).encode()
        return BUNDLE_MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> KernelBundle:
        hint = "rebuild the engine / recompile the kernels with this moetrt version (`moetrt aot`)"
        if len(data) < len(BUNDLE_MAGIC) + 4 or not data.startswith(BUNDLE_MAGIC):
            raise MoetrtError("kernel bundle has no moetrt header (wrong or truncated data)", hint)
        start = len(BUNDLE_MAGIC) + 4
        (header_len,) = struct.unpack("<I", data[len(BUNDLE_MAGIC) : start])
        try:
            header = json.loads(data[start : start + header_len])
        except ValueError as err:
            raise MoetrtError(f"kernel bundle header is corrupt ({err})", hint) from err
        if header.get("version") != BUNDLE_VERSION:
            raise MoetrtError(f"kernel bundle version {header.get('version')} is not {BUNDLE_VERSION}", hint)
        blob_start = start + header_len
        kernels = {}
        for k in header["kernels"]:
            lo, hi = blob_start + k["offset"], blob_start + k["offset"] + k["size"]
            if hi > len(data):
                raise MoetrtError("kernel bundle is truncated (a cubin runs past its end)", hint)
            kernels[k["key"]] = CompiledKernel(
                k["key"],
                k["kernel"],
                k["name"],
                bytes(data[lo:hi]),
                k["num_warps"],
                k["shared"],
                tuple(k["param_types"]),
                k["scratch_params"],
            )
        return cls(
            header["attrs"],
            header["dtype"],
            header["sm"],
            header["triton_version"],
            kernels,
            header["buckets"],
        )


def _io_header(attrs: MoEAttributes, dtype: str) -> dict[str, Any]:
    """The op's inputs and outputs as a launcher or plugin in another language needs them: names in node order,
    the activations' dtype name (fp32 / fp16 / bf16), the dtype name of each input stored in another type
    (None: the activations'), and
    each input's shape (None: the token count)."""
    return {
        "io_dtype": dtypes.name_of(dtype),
        "inputs": list(attrs.present_inputs()),
        "outputs": list(attrs.present_outputs()),
        "input_dtypes": {name: stored_dtype_name(name, attrs) for name in attrs.present_inputs()},
        "input_shapes": {
            name: [None if dim == "T" else dim for dim in shape]
            for name, shape in attrs.input_shapes("T").items()
        },
    }


def _signature(kernel_fn: Any, kernel: str, dtype: str, constexprs: dict[str, Any]) -> tuple[dict, dict]:
    types = plan.param_types(kernel, dtype, plan.variant_weight_format(constexprs))
    runtime = dict(zip([name for name, _ in plan.KERNEL_PARAMS[kernel]], types, strict=True))
    signature = {}
    for name in kernel_fn.arg_names:
        if name in runtime:
            signature[name] = runtime[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            raise MoetrtError(
                f"kernel {kernel} parameter {name} has neither a type nor a value",
                "update kernels/plan.py KERNEL_PARAMS to match the kernel",
            )
    # Every pointer is 16-byte aligned (the launcher checks): lets the compiler emit 16-byte loads.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel_fn.arg_names)
        if signature[name].startswith("*")
    }
    return signature, attrs


def compile_variant(variant: plan.Variant, dtype: str, sm: int) -> CompiledKernel:
    """Compile one kernel variant for `sm` with Triton's backend (a CPU is enough)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from moetrt.kernels.triton_moe import KERNELS

    fn = KERNELS[variant.kernel]
    constexprs = dict(variant.constexprs)
    if constexprs.get("TMA") and sm < 90:  # Triton would lower the descriptors to pointer loads, no scratch
        raise MoetrtError(
            f"kernel {variant.key} loads its tiles by TMA, which sm_{sm} does not have",
            f"remove gate_up.TMA and down.TMA from the sm{sm} config table (SM 9.0 and later only)",
        )
    signature, attrs = _signature(fn, variant.kernel, dtype, constexprs)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", sm, 32)
    backend = triton.compiler.make_backend(target)
    # A config tuned for one weight format or SM may pipeline more stages than this SM's shared memory holds
    # (a quantized gate_up runs two K loops: the shared expert's and the routed experts'): fewer stages then.
    stages = variant.num_stages
    while True:
        options = backend.parse_options({"num_warps": variant.num_warps, "num_stages": stages})
        compiled = triton.compile(source, target=target, options=options.__dict__)
        meta = compiled.metadata
        if meta.shared <= MAX_SHARED_BYTES[sm] or stages == 1:
            break
        stages -= 1
    if meta.shared > MAX_SHARED_BYTES[sm]:
        raise MoetrtError(
            f"kernel {variant.key} needs {meta.shared} bytes of shared memory, sm_{sm} has {MAX_SHARED_BYTES[sm]}",
            "pick smaller tiles for it in the config table",
        )
    # Global scratch holds the descriptors a TMA grouped GEMM builds on the device, and the planners size the
    # tma_scratch region for exactly that (plan.tma_scratch_bytes); any other scratch has no region.
    planned = (
        plan.tma_descriptors(variant.kernel, constexprs) * plan.TMA_DESCRIPTOR_BYTES
        if constexprs.get("TMA") and variant.kernel in plan.TMA_DESCRIPTORS
        else 0
    )
    if getattr(meta, "global_scratch_size", 0) != planned or getattr(meta, "profile_scratch_size", 0):
        raise MoetrtError(
            f"kernel {variant.key} needs {getattr(meta, 'global_scratch_size', 0)} bytes of Triton scratch memory "
            f"a program, the launcher provides {planned}",
            "pick other block sizes for it in the config table",
        )
    if getattr(meta, "num_ctas", 1) != 1:
        raise MoetrtError(f"kernel {variant.key} uses thread-block clusters", "compile it with num_ctas=1")
    types = tuple(plan.param_types(variant.kernel, dtype, plan.variant_weight_format(constexprs)))
    ptx_params = ptx_entry_params(compiled.asm["ptx"])
    # The entry must take our runtime params in order (pointers .u64, i32 .u32/.b32), then only
    # the scratch pointers this Triton version appends; anything else means the packing would be wrong.
    expected = ["u64" if t.startswith("*") else "b32" for t in types]
    got = ["u64" if p == "u64" else "b32" for p in ptx_params[: len(types)]]
    extra = ptx_params[len(types) :]
    if got != expected or any(p != "u64" for p in extra):
        raise MoetrtError(
            f"kernel {variant.key}: compiled entry takes {ptx_params}, expected {expected} + pointers",
            f"this Triton version ({triton.__version__}) specialises arguments differently; "
            "pin the version in docs/kernels.md",
        )
    return CompiledKernel(
        variant.key,
        variant.kernel,
        meta.name,
        compiled.asm["cubin"],
        meta.num_warps,
        meta.shared,
        types,
        len(extra),
    )


def ptx_entry_params(ptx: str) -> list[str]:
    """Parameter types ('u64', 'u32', 'b32', ...) of the single .entry in a PTX module."""
    start = ptx.index(".entry")
    decl = ptx[start : ptx.index(")", start)]
    return re.findall(r"\.param\s+\.(\w+)", decl)


def compile_variants(
    variants: Iterable[plan.Variant], dtype: str, sm: int, workers: int = 1
) -> tuple[dict[str, CompiledKernel], dict[str, Exception]]:
    """Compile each variant once (by key): (compiled kernels, the exception of each variant that did not
    compile), by key. workers > 1 compiles in that many forked processes (Triton's compiler is
    single-threaded)."""
    todo = {v.key: v for v in variants}
    compiled: dict[str, CompiledKernel] = {}
    failed: dict[str, Exception] = {}
    if workers > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=multiprocessing.get_context("fork")
        ) as pool:
            futures = {key: pool.submit(compile_variant, v, dtype, sm) for key, v in todo.items()}
            for key, fut in futures.items():
                try:
                    compiled[key] = fut.result()
                except Exception as err:
                    failed[key] = err
    else:
        for key, v in todo.items():
            try:
                compiled[key] = compile_variant(v, dtype, sm)
            except Exception as err:
                failed[key] = err
    return compiled, failed


def compile_kernels(
    attrs: MoEAttributes,
    dtype: str,
    sm: int,
    buckets: tuple[int | None, ...] = plan.BUCKETS,
    workers: int = 1,
    configs: Mapping[int | None, dict[str, Any]] | None = None,
    cache: dict[str, CompiledKernel] | None = None,
) -> KernelBundle:
    """Cubins of every kernel variant of every token bucket for `sm` (default: all buckets).

    workers > 1 compiles variants in that many forked processes (Triton's compiler is single-threaded).
    `configs` overrides the config table for some buckets (used when tuning). A bundle without the
    unbounded bucket (None) serves only token counts up to its largest bound. `cache` (variant key ->
    compiled kernel) is read and filled, so candidates that share variants compile them once.
    """
    import triton

    from moetrt.kernels import configs as config_table

    if sm not in SUPPORTED_SMS:
        raise MoetrtError(f"SM {sm} is not supported", f"pick one of {', '.join(map(str, SUPPORTED_SMS))}")
    if attrs.has_fp8_activations and not has_fp8_tensor_cores(sm):
        raise MoetrtError(
            f"fp8 activations run on fp8 tensor cores, which sm_{sm} lacks (SM {FP8_TENSOR_CORE_MIN_SM} and later)",
            "build this target with --activations native (fp8 weights, activations in the op's dtype)",
        )
    dtype = kernel_name_of(dtype)  # any spelling of fp32 / fp16 / bf16; bundles store the kernel name
    if attrs.has_fp8_activations and dtype == "float32":
        raise MoetrtError(
            "fp8 activations are for fp16 and bf16 ops (in fp32, the order of a sum alone can move an fp8 code)",
            "build at fp16 or bf16, or leave out --activations",
        )
    if not buckets or any(b not in plan.BUCKETS for b in buckets):
        raise MoetrtError(
            f"token buckets {buckets} are not a non-empty subset of {plan.BUCKETS}",
            "pass a subset of plan.BUCKETS (None: the unbounded one)",
        )
    bundle = KernelBundle(attrs.to_onnx_attributes(), dtype, sm, triton.__version__)
    per_bucket = {}
    todo: dict[str, plan.Variant] = {}
    for bound in buckets:
        cfg = (
            configs[bound]
            if configs and bound in configs
            else config_table.select_config(attrs, dtype, sm, bound)
        )
        if plan.uses_pdl(cfg) and sm < 90:
            raise MoetrtError(
                f"the config for bucket {plan.bucket_name(bound)} asks for programmatic dependent "
                f"launch, which sm_{sm} lacks",
                "disable 'pdl' in that config (SM90+ only)",
            )
        if plan.uses_fp8_conversion(cfg) and not has_fp8_conversion(sm):
            raise MoetrtError(
                f"the config for bucket {plan.bucket_name(bound)} converts fp8 weights in hardware, which "
                f"sm_{sm} lacks",
                "set 'dequant': {'fp8_cvt': 0} in that config (SM90+ only)",
            )
        try:
            variants = plan.bucket_variants(attrs, dtype, bound, cfg)
        except ValueError as err:  # the plan's refusal of a config, one line for the table entry it names
            raise MoetrtError(
                f"the config for bucket {plan.bucket_name(bound)} ({config_table.entry_key(attrs, dtype, bound)}) "
                f"is refused: {err}",
                "fix that entry (the tables in use are the package's and $MOETRT_KERNEL_CONFIGS's) or re-tune "
                "it with `moetrt tune`",
            ) from err
        per_bucket[bound] = (cfg, variants)
        todo.update({v.key: v for v in variants.values()})
    cache = {} if cache is None else cache
    compiled, failed = compile_variants(
        (variant for variant in todo.values() if variant.key not in cache), dtype, sm, workers
    )
    if failed:
        raise next(iter(failed.values()))
    cache.update(compiled)
    bundle.kernels = {key: cache[key] for key in todo}
    for bound, (cfg, variants) in per_bucket.items():
        bundle.buckets[plan.bucket_name(bound)] = {
            "bound": bound,
            "config": cfg,
            "variants": {stage: v.key for stage, v in variants.items()},
            "constexprs": {v.key: dict(v.constexprs) for v in variants.values()},
        }
    return bundle
