"""What `moetrt build` is asked to do, checked before any heavy import or work.

Kept apart from build.py (which imports onnx, torch and the passes) so every bad argument is answered in a
fraction of a second, by the same checks the library runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moetrt.core.devices import FP8_TENSOR_CORE_MIN_SM, has_fp8_tensor_cores
from moetrt.core.errors import MoetrtError
from moetrt.core.files import check_input_file
from moetrt.core.publish import OutputDir
from moetrt.op.spec import ACTIVATIONS_OPTIONS, FP8_BLOCK, NATIVE, WEIGHTS_OPTIONS
from moetrt.runtime.manifest import owned_entries
from moetrt.trt.profiles import DEFAULT_MAX_CONTEXT
from moetrt.trt.targets import ENGINE_BACKENDS, DimRange, Target, resolve_target

DEFAULT_PRECISION = "fp16"
DEFAULT_TOKENS = DimRange(1, 128, 4096)
DEFAULT_BATCH = DimRange(1, 1, 4)


@dataclass(frozen=True)
class BuildOptions:
    target: str | None = None
    precision: str | None = None  # None: an .onnx file's own precision, fp16 for a MODEL
    tokens: DimRange = DEFAULT_TOKENS
    batch: DimRange = DEFAULT_BATCH
    engine_backend: str = "tensorrt"
    parity: bool = True
    allow_parity_failure: bool = False  # succeed although parity failed (the manifest records it either way)
    force: bool = False
    verbose: bool = False
    #: a causal LM exports as a cached decoder (`export.cached`) unless `cache` is False
    cache: bool = True
    last_logits: bool = False
    #: longest context (past + new tokens) a cached decoder's engine accepts; None: the larger of
    #: `profiles.DEFAULT_MAX_CONTEXT` and twice --tokens' max
    max_context: int | None = None

    #: the routed experts' storage: native, or quantized (fp8, int4, mxfp4; `passes.quantize_experts`)
    #: build with the C++ plugin library (libmoetrt_plugin.so) instead of the Python plugin class
    plugin_library: Path | None = None
    weights: str = "native"
    weight_block: int | None = None
    int4_zero_point: bool = False
    #: the routed experts' inputs: native, or fp8 (quantized per token and block; fp8 weights, SM 8.9+)
    activations: str = "native"

    def context_limit(self) -> int:
        if self.max_context is not None:
            return self.max_context
        return max(DEFAULT_MAX_CONTEXT, 2 * self.tokens.max)  # room for a whole prefill after earlier tokens


@dataclass(frozen=True)
class BuildRequest:
    """A checked request: the resolved precision and target, and the output directory to write."""

    model: str
    precision: str
    target: Target
    output: OutputDir
    options: BuildOptions


def check_weights_options(
    weights: str, weight_block: int | None, int4_zero_point: bool, activations: str = "native"
) -> None:
    """`--weights`, `--weight-block`, `--int4-zero-point` and `--activations` together (fuse, build, aot and
    tune take them alike)."""
    if weights not in WEIGHTS_OPTIONS:
        raise MoetrtError(f"unknown --weights {weights!r}", f"use one of {', '.join(WEIGHTS_OPTIONS)}")
    if activations not in ACTIVATIONS_OPTIONS:
        raise MoetrtError(
            f"unknown --activations {activations!r}", f"use one of {', '.join(ACTIVATIONS_OPTIONS)}"
        )
    if ACTIVATIONS_OPTIONS[activations] != NATIVE and WEIGHTS_OPTIONS[weights] != FP8_BLOCK:
        raise MoetrtError(
            f"--activations {activations} multiplies fp8 codes on fp8 tensor cores: it needs --weights fp8",
            "add --weights fp8, or leave out --activations",
        )
    if int4_zero_point and weights != "int4":
        raise MoetrtError("--int4-zero-point applies to --weights int4", "add --weights int4 or drop it")
    if weight_block is not None and weights == "native":
        raise MoetrtError("--weight-block applies to quantized weights", "add --weights fp8|int4|mxfp4")


def check_build_request(model: str, outdir: str | Path, options: BuildOptions) -> BuildRequest:
    """Every user input of a build, checked (one MoetrtError for the first problem) before heavy work."""
    if options.engine_backend not in ENGINE_BACKENDS:
        raise MoetrtError(
            f"unknown engine backend {options.engine_backend!r}", f"use one of {', '.join(ENGINE_BACKENDS)}"
        )
    if model.endswith(".onnx"):
        check_input_file(model, "ONNX file", "pass an existing .onnx file or a MODEL spec")
    if options.max_context is not None and options.max_context < options.tokens.max:
        raise MoetrtError(
            f"--max-context {options.max_context} is below the longest prefill (--tokens max {options.tokens.max})",
            f"pass --max-context {options.tokens.max} or more, or a smaller --tokens",
        )
    check_weights_options(options.weights, options.weight_block, options.int4_zero_point, options.activations)
    if options.last_logits and not options.cache:
        raise MoetrtError(
            "--last-logits applies to cached decoders", "leave out --no-cache, or leave out --last-logits"
        )
    precision = options.precision or _default_precision(model)
    target = resolve_target(options.target, options.engine_backend)
    target.check_precision(precision)
    target.check_backend(options.engine_backend)
    if options.engine_backend == "tensorrt":
        _check_kernel_sm(target)
        _check_activations_sm(options.activations, target)
        if ACTIVATIONS_OPTIONS[options.activations] != NATIVE and precision == "fp32":
            raise MoetrtError(
                f"--activations {options.activations} is for fp16 and bf16 engines (the MoE kernels refuse it in fp32)",
                "pass --precision fp16 or bf16, or leave out --activations",
            )
    if options.plugin_library is not None:
        if options.engine_backend != "tensorrt":
            raise MoetrtError(
                "--plugin-library is for --engine-backend tensorrt (TensorRT-RTX engines hold no plugin)",
                "leave out --plugin-library, or use --engine-backend tensorrt",
            )
        check_input_file(
            options.plugin_library, "plugin library", "build libmoetrt_plugin.so (docs/deploy.md)"
        )
    output = OutputDir(outdir, options.force, owned_entries, "a `moetrt build` directory")
    output.check()
    return BuildRequest(model, precision, target, output, options)


def _default_precision(model: str) -> str:
    """An .onnx file builds at its own precision (export and build defaults then agree); a MODEL at fp16."""
    if model.endswith(".onnx"):
        from moetrt.core.onnx_io import load_onnx, model_precision

        return model_precision(load_onnx(model, load_external_data=False)) or DEFAULT_PRECISION
    return DEFAULT_PRECISION


def _check_activations_sm(activations: str, target: Target) -> None:
    """fp8 activations: the plugin's kernels multiply e4m3 operands, which the target's tensor cores must do."""
    if ACTIVATIONS_OPTIONS[activations] != NATIVE and not has_fp8_tensor_cores(target.sm):
        raise MoetrtError(
            f"--activations {activations} runs on fp8 tensor cores, which target {target.name} (SM {target.sm}) "
            f"lacks (SM {FP8_TENSOR_CORE_MIN_SM} and later have them)",
            "leave out --activations for this target (fp8 weights, activations in the model's dtype), or use "
            "--engine-backend tensorrt-rtx (it runs the function body)",
        )


def _check_kernel_sm(target: Target) -> None:
    from moetrt.kernels.aot import SUPPORTED_SMS

    if target.sm not in SUPPORTED_SMS:
        raise MoetrtError(
            f"the MoE kernels are not compiled for target {target.name} (SM {target.sm}) yet",
            f"use a target with SM in {', '.join(map(str, SUPPORTED_SMS))}, or --engine-backend tensorrt-rtx",
        )
