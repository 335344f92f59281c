"""`moetrt build`: MODEL or ONNX → OUTDIR/{model.onnx (fused, portable), model.plan (when built), manifest.json}.

Every step writes into a temporary directory beside OUTDIR; OUTDIR appears (or is replaced, with force) only
when all of them succeeded, so a failed build leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from moetrt.build_request import BuildOptions, BuildRequest, check_build_request
from moetrt.core.artifacts import (
    GENERATION_CONFIG_NAME,
    KERNELS_DIR,
    LOGITS,
    MANIFEST_NAME,
    META_LAST_LOGITS,
    META_SOURCE,
    META_STATE,
    ONNX_NAME,
    PLAN_NAME,
    TOKENIZER_FILE_NAMES,
)
from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import external_data_files, load_onnx, model_precision, save_onnx
from moetrt.core.progress import heartbeat, quiet_loggers
from moetrt.op import spec
from moetrt.op.fused_node import check_fused_model
from moetrt.runtime.manifest import build_manifest, parity_line, write_manifest
from moetrt.trt.profiles import make_profiles
from moetrt.trt.targets import Target
from moetrt.trt.trt_build import EngineBuild, onnx_input_dims, onnx_output_dims

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    outdir: Path
    manifest: dict[str, Any]
    engine_built: bool
    no_engine_reason: str | None

    def summary(self) -> str:
        """The build's one final line: what was written, whether an engine was built, what parity showed."""
        files = ", ".join([*self.manifest["files"], MANIFEST_NAME])
        engine = (
            f"engine {PLAN_NAME} ({self.manifest['engine']['backend']}, {self.manifest['target']['name']})"
            if self.engine_built
            else f"no engine built: {self.no_engine_reason}"
        )
        parity = self.manifest.get("parity")
        if parity is None:
            checked = "parity skipped (--no-parity)"
        elif not parity.get("checked"):
            checked = "parity not checked (see manifest.json)"
        else:
            checked = "ONNX parity PASS" if parity.get("passed") else "ONNX parity FAILED (see manifest.json)"
            if parity.get("scope") == UPCAST_SCOPE:
                checked += " (bf16 graph widened to fp32)"
            elif parity.get("scope") == BLOCKS_SCOPE:
                checked = checked.replace("ONNX parity", "block parity") + " (each MoE block vs its module)"
        fused = self.manifest["fused_ops"].get(f"{spec.DOMAIN}::{spec.OP_TYPE}", 0)
        return f"wrote {self.outdir}/{{{files}}} ({fused} moetrt::MoE); {engine}; {checked}"


def build(
    model: str, outdir: str | Path, options: BuildOptions | None = None, progress: Progress | None = None
) -> BuildResult:
    """Export (MODEL) or read (ONNX), fuse, compile kernels, build the engine, write the manifest."""
    # Every user input is checked before any heavy work starts.
    return build_checked(check_build_request(model, outdir, options or BuildOptions()), progress)


def build_checked(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """`build` of a request `check_build_request` already accepted (the CLI checks before importing this)."""
    say = _timed(progress or (lambda _msg: None))
    model, outdir = request.model, request.output.outdir
    precision, target, output = request.precision, request.target, request.output
    options = dataclasses.replace(request.options, precision=precision)
    if options.engine_backend == "tensorrt" and _importable("tensorrt"):
        from moetrt.trt.trt_build import check_build_device

        check_build_device(target)  # TensorRT builds for the GPU it runs on: refuse before exporting
    tokens, batch = options.tokens, options.batch

    timings: dict[str, float] = {}
    with output.writing() as staging:
        say = _unstaging(say, output.unstaged)
        fused_path = staging / ONNX_NAME
        start = time.perf_counter()
        fused, fused_count = _fused_model(model, precision, staging, say, options)
        timings["export_and_fuse"] = time.perf_counter() - start
        quantization = _quantization(options)
        stored = sorted({a.weight_format for a in check_fused_model(fused) if a.is_quantized})
        if quantization is not None and stored:
            raise MoetrtError(
                f"the model's experts are already stored as {', '.join(stored)}: --weights would quantize them again",
                "leave out --weights (the checkpoint's own quantization is kept)",
            )
        if quantization is not None:
            fused = _quantize_experts(fused_path, quantization, say, timings)
        counts = _op_counts(fused)
        say(f"fused model: {fused_count} moetrt::MoE node(s), {counts['total_nodes']} nodes → {ONNX_NAME}")
        profiles = make_profiles(onnx_input_dims(fused), tokens, batch, options.context_limit())
        decoder = _decoder_entry(fused, model, staging, options.context_limit(), say)

        engine, reason, kernels = _build_engine(
            fused, fused_path, staging / PLAN_NAME, target, options, profiles, say, timings
        )

        start = time.perf_counter()
        parity = _parity(fused_path, precision, say) if options.parity else None
        if parity is not None:
            timings["parity"] = time.perf_counter() - start
        if quantization is not None:
            blocks = sorted({attrs.weight_block for attrs in check_fused_model(fused)})
            measured = _quantization_error(fused_path, options.parity, say)
            quantization_entry = quantization.describe() | {"block": blocks} | measured
        elif stored:
            nodes = check_fused_model(fused)
            quantization_entry = {
                "format": stored[0] if len(stored) == 1 else stored,
                "block": sorted({a.weight_block for a in nodes if a.is_quantized}),
                "zero_point": any(a.has_weight_zero_point for a in nodes),
                "method": "stored by the checkpoint, its codes and scales kept as they are",
            }
        files: dict[str, str | Path] = {ONNX_NAME: fused_path}
        files.update({p.name: p for p in external_data_files(fused_path)})
        if engine is not None:
            files[PLAN_NAME] = engine.plan_path
        files.update({name: staging / name for name in (kernels or {}).get("files", [])})
        files.update({name: staging / name for name in (decoder or {}).get("files", [])})
        manifest = build_manifest(
            source=model,
            target={"name": target.name, "sm": target.sm, "description": target.description},
            precision=precision,
            engine=_engine_entry(engine, options.engine_backend, reason, kernels),
            profiles=profiles,
            fused_ops=dict(counts),
            files=files,
            io=_io_entry(fused),
            parity=parity,
            build_seconds={k: round(v, 3) for k, v in timings.items()},
            decoder=decoder,
            quantization=quantization_entry if quantization is not None or stored else None,
        )
        write_manifest(staging / MANIFEST_NAME, manifest)
        output.publish()
    say(f"wrote {outdir}")
    if (
        parity is not None
        and parity.get("checked")
        and not parity.get("passed")
        and not options.allow_parity_failure
    ):
        raise MoetrtError(
            f"parity FAILED: {parity_line(parity)}; the build is in {outdir} with the failure recorded in "
            f"{MANIFEST_NAME}",
            "investigate with `moetrt verify`, or pass --allow-parity-failure to accept it",
        )
    return BuildResult(outdir, manifest, engine is not None, reason)


def _unstaging(say: Progress, unstaged: Callable[[str], str]) -> Progress:
    """Progress that names OUTDIR where a step names the hidden staging directory."""
    return lambda message: say(unstaged(message))


def _timed(progress: Progress) -> Progress:
    start = time.perf_counter()

    def say(message: str) -> None:
        progress(f"[{time.perf_counter() - start:6.1f}s] {message}")

    return say


def _fused_model(
    model: str, precision: str, staging: Path, say: Progress, options: BuildOptions
) -> tuple[onnx.ModelProto, int]:
    """Write the fused model to staging/model.onnx, weights streamed from the export or the given .onnx; return
    its graph (weights not loaded) and its number of moetrt::MoE nodes."""
    fused_path = staging / ONNX_NAME
    if model.endswith(".onnx"):
        source = Path(model)
        say(f"reading {source}")
        header = load_onnx(source, load_external_data=False)
        found = model_precision(header)
        if found is not None and found != precision:
            raise MoetrtError(
                f"{source} is {found} but --precision is {precision}",
                f"pass --precision {found}, or export again with `moetrt export --dtype {precision}`",
            )
    else:
        from moetrt.export.loaded import DecoderForm
        from moetrt.export.onnx_export import export_onnx

        source = staging / "exported.onnx"
        form = DecoderForm(cached=options.cache, last_logits=options.last_logits)
        export_onnx(model, source, dtype=precision, progress=say, form=form, rewrite=_stored_experts_fused)
        header = load_onnx(source, load_external_data=False)
    already = len(check_fused_model(header))
    if already:
        say(f"the model is already fused ({already} moetrt::MoE node(s))")
        save_onnx(_fill_output_types(load_onnx(source)), fused_path)
        count = already
    else:
        from moetrt.passes import fuse_file

        result = fuse_file(source, fused_path, progress=say)
        count = int(result.num_fused)
        if count == 0:
            say("warning: no MoE block was fused; the engine will run the standard-op graph")
    exported = staging / "exported.onnx"
    for leftover in [*external_data_files(exported), exported]:  # its .data file or numbered shards
        leftover.unlink(missing_ok=True)
    return load_onnx(fused_path, load_external_data=False), count


def _stored_experts_fused(model: Any, loaded: Any) -> None:
    """For a checkpoint whose experts are stored quantized: fuse in memory and put the stored codes in the fused
    nodes before anything is written (`passes.stored_experts`). Other models are written as exported."""
    stored = loaded.stored
    if stored is None:
        return
    from moetrt.core.artifacts import META_EXPERT_WEIGHTS
    from moetrt.passes.pipeline import fuse_ir
    from moetrt.passes.stored_experts import StoredExpertsPass

    fuse_ir(model)
    layers = [functools.partial(stored.tables, layer) for layer in stored.layers_in_order()]
    quant = stored.quant
    StoredExpertsPass(quant.weight_format, quant.block, quant.zero_point, layers)(model)
    model.metadata_props[META_EXPERT_WEIGHTS] = quant.weight_format


def _fill_output_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give graph outputs that lost their element type (a rewrite feeding them directly) the inferred one:
    TensorRT's parser refuses an untyped graph output."""
    untyped = [out for out in model.graph.output if not out.type.tensor_type.elem_type]
    if not untyped:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort (e.g. > 2 GB protos): the parser then names the output
        return model
    types = {out.name: out.type.tensor_type for out in inferred.graph.output}
    for out in untyped:
        found = types.get(out.name)
        if found is None or not found.elem_type:
            continue
        out.type.tensor_type.elem_type = found.elem_type
        if not out.type.tensor_type.HasField("shape") and found.HasField("shape"):
            out.type.tensor_type.shape.CopyFrom(found.shape)
    return model


def _quantization(options: BuildOptions) -> Any:
    from moetrt.passes.quantize_experts import ExpertQuantization

    return ExpertQuantization.from_option(
        options.weights, options.weight_block, options.int4_zero_point, options.activations
    )


def _quantize_experts(fused_path: Path, quantization: Any, say: Progress, timings: dict[str, float]) -> Any:
    """Replace staging's fused model by the same model with its experts quantized; its header back."""
    from moetrt.passes.pipeline import quantize_file

    native_dir = fused_path.parent / "native"
    native_dir.mkdir()
    for path in [fused_path, *external_data_files(fused_path)]:  # the data files keep their names
        path.rename(native_dir / path.name)
    say(f"quantizing the experts to {quantization.weight_format} (round to nearest)")
    start = time.perf_counter()
    stat = quantize_file(native_dir / fused_path.name, fused_path, quantization)
    timings["quantize"] = time.perf_counter() - start
    for path in native_dir.iterdir():
        path.unlink()
    native_dir.rmdir()
    say(f"quantized the experts of {stat.count} moetrt::MoE node(s) in {stat.seconds:.1f}s")
    return load_onnx(fused_path, load_external_data=False)


def _quantization_error(fused_path: Path, measure: bool, say: Progress) -> dict[str, Any]:
    """The quantized model against the model's native weights: the quantization's own error, per output."""
    weight_bytes = sum(p.stat().st_size for p in [fused_path, *external_data_files(fused_path)])
    if not measure or weight_bytes > PARITY_MAX_BYTES:
        why = "--no-parity" if not measure else "over the whole-model check's bound"
        return {"error_vs_native": None, "error_vs_native_reason": f"not measured ({why})"}
    from moetrt.verify.model import verify

    say("measuring the quantization's error against the native weights (onnxruntime CPU)")
    try:
        with quiet_loggers("transformers"):
            report = verify(str(fused_path), native_reference=True)
    except MoetrtError as err:
        return {"error_vs_native": None, "error_vs_native_reason": err.one_line()}
    worst: dict[str, float] = {}
    for row in report.rows:
        worst[row.output] = max(worst.get(row.output, 0.0), row.rel_err)
    say(
        "quantization error vs native weights (max rel err): "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    )
    return {
        "error_vs_native": worst,
        "error_vs_native_metric": "max relative norm error over the parity shapes",
    }


def _decoder_entry(
    fused: onnx.ModelProto, model: str, staging: Path, max_context: int, say: Progress
) -> dict[str, Any] | None:
    """A cached decoder's manifest entry: its state tensors, logits form, context limit, and the tokenizer files
    packaged beside it (from its source model); None for any other model."""
    from moetrt.export.tokenizer_files import package_tokenizer

    meta = {p.key: p.value for p in fused.metadata_props}
    if META_STATE not in meta:
        return None
    source = meta.get(META_SOURCE, model) if model.endswith(".onnx") else model
    vocab = next((d for d in onnx_output_dims(fused, LOGITS)[-1:] if isinstance(d, int)), None)
    files = package_tokenizer(source, staging, vocab)
    say(f"packaged {', '.join(files)}" if files else f"no tokenizer files found for {source}")
    return {
        "state": json.loads(meta[META_STATE]),
        "last_logits": meta.get(META_LAST_LOGITS) == "1",
        "max_context": max_context,
        "files": files,
        "tokenizer": any(name in TOKENIZER_FILE_NAMES for name in files),
        "generation_config": GENERATION_CONFIG_NAME if GENERATION_CONFIG_NAME in files else None,
    }


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Fused-op counts by domain::op (the MoE count always present, 0 included) and the total node count."""
    counts = Counter(
        f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain == spec.DOMAIN
    )
    return {f"{spec.DOMAIN}::{spec.OP_TYPE}": 0, **counts, "total_nodes": len(model.graph.node)}


def _build_engine(
    fused: onnx.ModelProto,
    fused_path: Path,
    plan_path: Path,
    target: Target,
    options: BuildOptions,
    profiles: list[dict[str, Any]],
    say: Progress,
    timings: dict[str, float],
) -> tuple[EngineBuild | None, str | None, dict[str, Any] | None]:
    if options.engine_backend == "tensorrt-rtx":
        from moetrt.trt.rtx_build import build_rtx_engine

        engine = build_rtx_engine(fused_path, plan_path, target, profiles, say, options.verbose)
        timings["engine"] = engine.seconds
        say(f"built {PLAN_NAME} with TensorRT-RTX {engine.library_version} in {engine.seconds:.1f}s")
        return engine, None, None

    if not _importable("tensorrt"):
        reason = (
            "the `tensorrt` module (TensorRT 10.8+, for the plugin engine) is not installed: install it "
            "on a GPU of the target, or pass --engine-backend tensorrt-rtx for a plugin-free engine"
        )
        if not _importable("triton"):
            return None, reason, None
        # The kernels do not need TensorRT: compile them anyway, so a CPU build proves the target's cubins
        # compile and leaves the bundles the launcher (and an app embedding it) loads directly.
        kernels, cache = _compile_kernels(fused, target, options.precision, say, timings)
        kernels["files"] = _write_kernel_bundles(cache, plan_path.parent)
        return None, reason, kernels
    from moetrt.trt.plugin import compile_kernel_bytes
    from moetrt.trt.trt_build import build_tensorrt_engine, check_build_device

    check_build_device(target)
    kernels, cache = _compile_kernels(fused, target, options.precision, say, timings)
    kernels["files"] = _write_kernel_bundles(cache, plan_path.parent)

    def kernel_source(attrs: spec.MoEAttributes, dtype: str, sm: int) -> bytes:
        key = (attrs, dtype, sm)
        if key not in cache:  # a variant the pre-pass did not see (should not happen): compile it now
            cache[key] = compile_kernel_bytes(attrs, dtype, sm)
        return cache[key]

    engine = build_tensorrt_engine(
        fused_path,
        plan_path,
        target,
        profiles,
        say,
        options.verbose,
        kernel_source=kernel_source,
        plugin_library=options.plugin_library,
        dtype=options.precision,
    )
    timings["engine"] = engine.seconds
    return engine, None, kernels


def _write_kernel_bundles(cache: dict[tuple[Any, str, int], bytes], staging: Path) -> list[str]:
    """One `KernelBundle` file per MoE variant under staging/kernels/; returns their names relative to it."""
    directory = staging / KERNELS_DIR
    directory.mkdir()
    names = []
    for (attrs, precision, sm), data in sorted(cache.items(), key=lambda item: repr(item[0])):
        digest = hashlib.sha256(repr(attrs).encode()).hexdigest()[:12]
        name = f"{KERNELS_DIR}/moe_sm{sm}_{precision}_{digest}.bin"
        (staging / name).write_bytes(data)
        names.append(name)
    return names


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _compile_kernels(
    fused: onnx.ModelProto, target: Target, precision: str, say: Progress, timings: dict[str, float]
) -> tuple[dict[str, Any], dict[tuple[Any, str, int], bytes]]:
    """AOT cubins for every distinct MoE variant of the model, for the target SM (reused by the plugin)."""
    from moetrt.trt.plugin import compile_kernel_bytes

    variants = {
        _node_attributes(node)
        for node in fused.graph.node
        if node.domain == spec.DOMAIN and node.op_type == spec.OP_TYPE
    }
    from moetrt.kernels.configs import KERNEL_CONFIGS_ENV, table_sources

    start = time.perf_counter()
    sources = table_sources(target.sm)
    if os.environ.get(KERNEL_CONFIGS_ENV):
        say(f"kernel configs for sm_{target.sm}: {' over '.join(reversed(sources)) or 'the defaults'}")
    cache: dict[tuple[Any, str, int], bytes] = {}
    for attrs in variants:
        say(
            f"compiling MoE kernels for sm_{target.sm} {precision}: E={attrs.num_experts} k={attrs.top_k} "
            f"H={attrs.hidden_size} I={attrs.intermediate_size}"
        )
        cache[(attrs, precision, target.sm)] = compile_kernel_bytes(
            attrs, precision, target.sm, workers=os.cpu_count() or 1
        )
    timings["kernels"] = time.perf_counter() - start
    summary = {
        "sm": target.sm,
        "variants": len(cache),
        "bytes": sum(len(b) for b in cache.values()),
        "config_tables": sources,
    }
    return summary, cache


def _node_attributes(node: onnx.NodeProto) -> spec.MoEAttributes:
    return spec.MoEAttributes.from_onnx_attributes(
        {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    )


def _engine_entry(
    engine: EngineBuild | None, backend: str, reason: str | None, kernels: dict[str, Any] | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"backend": backend, "built": engine is not None, "kernels": kernels}
    if engine is None:
        entry["reason"] = reason
        return entry
    return entry | {
        "library_version": engine.library_version,
        "plan_magic": engine.plan_magic,
        "plugin": engine.plugin,
        "runs_on_sms": engine.runs_on_sms,
        "moe_as": "plugin" if engine.plugin else "native layers (inlined function body)",
    }


def _io_entry(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    initializers = {init.name for init in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            if tensor.elem_type != onnx.TensorProto.BFLOAT16
            else "bfloat16",
            "shape": dims,
        }

    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in model.graph.output],
    }


PARITY_SCOPE = (
    "model.onnx (the fused graph, at the build precision) run by onnxruntime's CPU provider against the "
    "PyTorch source model (float32 compute on the same rounded weights); the engine is not run at build time"
)
#: The whole-model parity check holds the graph in onnxruntime and a float32 PyTorch copy: bounded. Above it
#: each fused block is checked against its PyTorch module (`verify.blocks`), one block in memory at a time.
PARITY_MAX_BYTES = 2 * 1024**3
BLOCKS_SCOPE = (
    "each fused MoE block of model.onnx: the op's float32 oracle on the fused model's own weights against the "
    "block's PyTorch module in float32 on the source weights, at 1, 7 and 64 tokens (the fusion check's "
    "tolerance); the layers between blocks and the dtype's rounding of activations are not covered; the "
    "engine is not run at build time"
)
UPCAST_SCOPE = (
    "model.onnx's fused graph with its bf16 weights, constants and casts widened to fp32 (exact), run by "
    "onnxruntime's CPU provider against the PyTorch source model on the same bf16 weights in float32, at the "
    "bf16 tolerance: checks the graph (export, fusion, routing); what remains is the graph's own bf16 "
    "constants (e.g. an activation's scale rounded to bf16); bf16 rounding of activations is not covered; the "
    "engine is not run at build time"
)


def _parity(fused_path: Path, precision: str, say: Progress) -> dict[str, Any]:
    """Parity of the fused ONNX (onnxruntime) with the PyTorch model, via `moetrt.verify.model`; above
    PARITY_MAX_BYTES, of each fused block with its PyTorch module (`moetrt.verify.blocks`, BLOCKS_SCOPE).

    onnxruntime's CPU provider has no bf16 kernels for several ops: a bf16 graph it cannot run is checked as
    its exact fp32 widening instead (UPCAST_SCOPE), and the manifest says so. A model that still cannot be
    checked (e.g. it names no source model) is recorded as not checked, with the reason: never as a pass.
    """
    weight_bytes = sum(p.stat().st_size for p in [fused_path, *external_data_files(fused_path)])
    fp8_activations = _has_fp8_activations(fused_path)
    if weight_bytes > PARITY_MAX_BYTES or fp8_activations:
        if fp8_activations:
            say(
                "fp8 activations: checking each fused block against its PyTorch module on the same inputs, "
                "both quantizing the experts' inputs alike (a whole-model comparison would carry the "
                f"{precision} rounding of the layers before each block across fp8 rounding boundaries)"
            )
        else:
            say(
                f"{weight_bytes / 1e9:.1f} GB of weights are over the whole-model parity check's "
                f"{PARITY_MAX_BYTES / 1e9:.0f} GB bound (an onnxruntime session and a float32 PyTorch copy): "
                "checking each fused block against its PyTorch module instead, one block in memory at a time"
            )
        from moetrt.verify.blocks import verify_blocks

        try:
            with quiet_loggers("transformers", "accelerate"), heartbeat(say, "checking blocks"):
                report = verify_blocks(fused_path, progress=say)
        except MoetrtError as err:
            say(f"parity not checked: {err.message}")
            return {"checked": False, "scope": BLOCKS_SCOPE, "precision": precision, "reason": err.one_line()}
        scope, backend = BLOCKS_SCOPE, "the op's float32 oracle on the fused model's weights"
    else:
        report, scope, backend = _whole_model_parity(fused_path, precision, say)
        if isinstance(report, dict):
            return report
    return _parity_summary(report, scope, backend, precision, say)


def _has_fp8_activations(fused_path: Path) -> bool:
    from moetrt.core.onnx_io import load_onnx
    from moetrt.op.fused_node import check_fused_model

    return any(
        a.has_fp8_activations for a in check_fused_model(load_onnx(fused_path, load_external_data=False))
    )


def _whole_model_parity(fused_path: Path, precision: str, say: Progress) -> tuple[Any, str, str]:
    from moetrt.verify.model import BF16_WIDENED_NOTE, verify

    say("checking parity of the fused ONNX against PyTorch (onnxruntime CPU)")
    try:
        with quiet_loggers("transformers"):
            report = verify(str(fused_path), progress=None)
    except MoetrtError as err:
        say(f"parity not checked: {err.message}")
        scope = UPCAST_SCOPE if precision == "bf16" else PARITY_SCOPE
        not_checked = {"checked": False, "scope": scope, "precision": precision}
        return {**not_checked, "reason": err.one_line()}, "", ""
    if BF16_WIDENED_NOTE in report.findings:  # onnxruntime's CPU provider ran the bf16 graph's exact widening
        return report, UPCAST_SCOPE, "onnxruntime CPUExecutionProvider (graph widened to fp32)"
    return report, PARITY_SCOPE, "onnxruntime CPUExecutionProvider"


def _parity_summary(report: Any, scope: str, backend: str, precision: str, say: Progress) -> dict[str, Any]:
    rows = [dataclasses.asdict(row) for row in report.rows]
    worst = max((row["rel_err"] / row["tolerance"] for row in rows), default=0.0)
    summary = {
        "checked": True,
        "passed": report.passed,
        "scope": scope,
        "precision": precision,
        "backend": backend,
        "reference": report.reference,
        "dtype": report.dtype,
        "metric": "relative norm error |out - ref| / |ref| per output and shape",
        "max_rel_err": max((row["rel_err"] for row in rows), default=None),
        "worst_err_over_tolerance": worst,
        "rows": rows,
        "findings": list(report.findings),  # e.g. what a quantized model was compared against
        "seconds": round(report.seconds, 3),
    }
    verdict = "PASS" if report.passed else "FAILED"
    line = (
        f"parity {verdict}: {sum(r['passed'] for r in rows)}/{len(rows)} checks within tolerance, "
        f"max rel err {summary['max_rel_err']:.2e} ({report.dtype} ONNX on {backend} vs {report.reference})"
    )
    say(line if report.passed else "warning: " + line)
    return summary
