"""The `moetrt` command line: each command is a thin wrapper over one public function.

Heavy imports (torch, onnx, transformers) happen inside the commands so `moetrt --help` is instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from moetrt import __version__
from moetrt.core.errors import MoetrtError
from moetrt.op.spec import ACTIVATIONS_OPTIONS

if TYPE_CHECKING:
    from moetrt.op.spec import MoEAttributes
    from moetrt.trt.targets import DimRange


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MoetrtError into one line on stderr and exit code 1 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moetrt.core.publish import Interrupted, interrupt_exit_code

        try:
            return fn(*args, **kwargs)
        except MoetrtError as err:
            click.echo(f"error: {err.one_line()}", err=True)
            sys.exit(1)
        except Interrupted as err:
            click.echo(f"error: interrupted ({err.signal_name}); nothing was written", err=True)
            sys.exit(interrupt_exit_code(err))
        except KeyboardInterrupt:
            click.echo("error: interrupted (SIGINT)", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moetrt")
def main() -> None:
    """moetrt: fuse Mixture-of-Experts blocks into one op and build TensorRT engines.

    MODEL is a built-in demo (`demo:qwen3_next`, `demo:mixtral:block`, ...), a local Hugging Face model
    directory (config.json + safetensors), or `module:path/to/file.py:factory`.
    """


# --- export / verify (Foundation) ---


def _progress(message: str) -> None:
    click.echo(f"[moetrt] {message}", err=True)


def _weights_options(what_follows: str) -> Callable[[Any], Any]:
    """--weights / --weight-block / --int4-zero-point, shared by fuse and build (checked by
    `build_request.check_weights_options`); `what_follows` says what the command does with quantized experts."""

    def add(command: Any) -> Any:
        command = click.option(
            "--activations",
            type=click.Choice(list(ACTIVATIONS_OPTIONS)),
            default="native",
            show_default=True,
            help="With --weights fp8: fp8 quantizes the routed experts' inputs too (e4m3, one scale per token "
            "and 128-wide block, amax / 448), so both expert GEMMs multiply fp8 x fp8 on the tensor cores of SM "
            "8.9 and later; the op's result then includes that rounding (parity compares with a reference that "
            "rounds alike). Measured on an H200: 1.1-1.7x bf16 at every token count, where weight-only fp8 is "
            "0.5-1.4x (slower at prefill).",
        )(command)
        command = click.option(
            "--int4-zero-point", is_flag=True, help="int4 with zero points (asymmetric groups)."
        )(command)
        command = click.option(
            "--weight-block",
            type=click.IntRange(min=1),
            default=None,
            help="Block side (fp8) or group size (int4) [default: 128, or the largest of 64, 32, 16 that "
            "divides the hidden and intermediate sizes].",
        )(command)
        return click.option(
            "--weights",
            type=click.Choice(["native", "fp8", "int4", "mxfp4"]),
            default="native",
            show_default=True,
            help="Store the routed experts quantized (round to nearest, one scale per block or group): fp8 "
            "e4m3 with 128x128 block scales, int4 with group scales, mxfp4 with e8m0 scales per 32; "
            + what_follows,
        )(command)

    return add


def _cache_options(command: Any) -> Any:
    """--no-cache / --last-logits, shared by export and build."""
    command = click.option(
        "--last-logits",
        is_flag=True,
        help="Cached decoders: logits of the last position only ([batch, 1, vocab]); prefill then does not "
        "compute [batch, seq, vocab].",
    )(command)
    return click.option(
        "--no-cache",
        is_flag=True,
        help="Export a causal LM as input_ids -> logits without its KV cache / linear-attention state "
        "(every step recomputes the whole prefix).",
    )(command)


@main.command("export")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output ONNX file (*.onnx). Weights over 2 GB go to OUTPUT.data beside it (numbered shards past 4 GiB).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Precision of the exported weights and activations.",
)
@click.option(
    "--opset", type=int, default=None, help="ONNX opset, 18-23 [default: 18; 22 for bf16, which needs it]."
)
@click.option(
    "--self-check",
    type=click.Choice(["error", "warn", "off"]),
    default="error",
    show_default=True,
    help="Run the written ONNX (onnxruntime) against PyTorch at the example inputs before reporting success: "
    "a mismatch fails the export (error), is reported with the file kept (warn), or is not checked (off).",
)
@_cache_options
@_user_errors
def export_cmd(
    model: str, output: str, dtype: str, opset: int | None, self_check: str, no_cache: bool, last_logits: bool
) -> None:
    """Export MODEL to ONNX with dynamic batch and sequence length.

    MODEL is demo:<family>[:block], a Hugging Face model directory (config.json + safetensors), or
    module:path/to/file.py:factory (factory() returns (module, example_inputs)). The file is written
    atomically; progress goes to stderr, the summary to stdout.

    A causal LM exports as a cached decoder: inputs input_ids [batch, seq], attention_mask [batch, past + seq],
    position_ids [batch, seq] and past_key_values.{i}.key/.value (attention layers) or .conv/.recurrent
    (linear-attention layers); outputs logits and present.{i}.*. One graph serves prefill and decode.
    --no-cache exports input_ids -> logits over the whole sequence instead.

    \b
    Examples:
      moetrt export demo:qwen3_next -o qwen3_next.onnx
      moetrt export demo:mixtral:block -o mixtral_block.onnx --dtype fp16
      moetrt export ./my-moe-model -o model.onnx
    """
    from moetrt.core.files import check_output_file

    check_output_file(output, ".onnx")  # before the (long) export, not after it
    from moetrt.export.onnx_export import export_onnx

    if last_logits and no_cache:
        raise MoetrtError(
            "--last-logits applies to cached decoders", "leave out --no-cache, or leave out --last-logits"
        )
    from moetrt.export.loaded import DecoderForm

    form = DecoderForm(cached=not no_cache, last_logits=last_logits)
    result = export_onnx(
        model, output, dtype=dtype, opset=opset, progress=_progress, self_check=self_check, form=form
    )
    click.echo(result.summary())
    if result.num_moe_blocks == 0:
        click.echo(
            f"warning: found 0 MoE blocks in {model}; the ONNX file is valid, but `moetrt fuse` will have "
            "nothing to fuse (a MoE block is a module with a router and stacked experts)",
            err=True,
        )


@main.command("verify")
@click.argument("model_or_onnx")
@click.option(
    "--reference",
    default=None,
    metavar="MODEL",
    help="PyTorch reference MODEL (default: the moetrt.source recorded in the ONNX file).",
)
@click.option(
    "--shapes",
    default=None,
    metavar="BxS,...",
    help="Input shapes as BATCHxSEQ, comma-separated; BATCHxSEQ+PAST for a cached decoder: SEQ new tokens "
    "after PAST earlier ones, whose state the reference computes (default: batch 1, a batch above the export "
    "example, a sequence longer than any internal chunk; for a decoder also 2x16+9, 1x1+7 and a decode "
    "step after a long past).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--engine",
    is_flag=True,
    help="Run MODEL_OR_ONNX (a `moetrt build` directory, .plan or .onnx) through moetrt.runtime.load: "
    "the TensorRT engine on a GPU, onnxruntime for an .onnx or a build without a plan.",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Export precision when MODEL_OR_ONNX is a MODEL spec (ignored for an .onnx file).",
)
@click.option(
    "--per-layer",
    is_flag=True,
    help="Also compare the output of every attention, linear-attention and MoE/MLP module of every layer "
    "and name the first out of tolerance (onnxruntime path only).",
)
@click.option(
    "--blocks",
    is_flag=True,
    help="Instead, check each fused MoE block against its PyTorch module, one block in memory at a time: "
    "works at any model size (a large checkpoint is read from disk).",
)
@click.option(
    "--native-reference",
    is_flag=True,
    help="Quantized experts: compare against the model's own (native) weights, which measures the "
    "quantization's error, instead of against the same dequantized experts (which checks the graph).",
)
@_user_errors
def verify_cmd(
    model_or_onnx: str,
    reference: str | None,
    shapes: str | None,
    seed: int,
    engine: bool,
    dtype: str,
    per_layer: bool,
    blocks: bool,
    native_reference: bool,
) -> None:
    """Compare an ONNX model run by onnxruntime with its PyTorch reference.

    Prints one row per shape (max abs error, relative norm error, pass/fail against the dtype's
    tolerance: fp32 1e-5, fp16 5e-3, bf16 1e-2) and exits 1 if any row fails. Given a MODEL spec
    instead of an .onnx file, exports it to a temporary file first.

    A failing shape is explained: tokens whose experts differ from the reference's are listed with their
    margin; where the margin is a near-tie that the artifact's rounding decides, the row is judged against
    the reference routed like the artifact. For fp16/bf16 it says whether PyTorch itself in that dtype
    misses the float32 reference as much. --per-layer names the first layer whose output leaves tolerance.
    An artifact with quantized experts (`moetrt fuse --weights`) is compared against the reference running the
    same dequantized experts; --native-reference measures the quantization's error instead. With fp8
    activations (`--activations fp8`) the reference quantizes its experts' inputs alike; --blocks then judges
    each block on the same inputs (the whole-model rows also carry the rounding of earlier layers across fp8
    rounding boundaries, as `moetrt build` says when it checks blocks for them).

    \b
    Examples:
      moetrt verify qwen3_next.onnx
      moetrt verify model.fused.onnx --reference demo:qwen3_next --shapes 1x8,4x16,2x130
      moetrt verify demo:gpt_oss:block
      moetrt verify out/qwen3_next --per-layer
      moetrt verify big/model.onnx --blocks
    """
    from moetrt.verify.model import verify

    parsed = parse_shapes(shapes) if shapes is not None else None
    if blocks:
        from moetrt.verify.blocks import verify_blocks

        if engine or per_layer or shapes is not None or native_reference:
            raise MoetrtError(
                "--blocks checks the fused blocks alone, at 1, 7 and 64 tokens",
                "leave out --engine, --per-layer, --shapes and --native-reference",
            )
        report = verify_blocks(Path(model_or_onnx), reference=reference, seed=seed, progress=_progress)
    elif engine:
        if native_reference:
            raise MoetrtError("--native-reference applies to the onnxruntime check", "leave out --engine")
        if per_layer:
            raise MoetrtError(
                "--per-layer looks inside the ONNX model, which --engine does not run",
                "leave out --engine (or --per-layer)",
            )
        from moetrt.verify.artifact import verify_loaded

        report = verify_loaded(
            model_or_onnx, reference=reference, shapes=parsed, seed=seed, progress=_progress
        )
    else:
        report = verify(
            model_or_onnx,
            reference=reference,
            shapes=parsed,
            seed=seed,
            progress=_progress,
            dtype=dtype,
            per_layer=per_layer,
            native_reference=native_reference,
        )
    click.echo(report.format_table())
    if not report.passed:
        sys.exit(1)


# --- fuse (graph_passes) ---
@main.command("fuse")
@click.argument("in_path", metavar="IN.onnx")
@click.option(
    "-o",
    "--output",
    "out_path",
    required=True,
    metavar="OUT.onnx",
    help="Where to write the fused model (.onnx).",
)
@click.option(
    "--explain", is_flag=True, help="List every MoE-looking candidate left unfused, with the rule and check."
)
@click.option(
    "--decompose", is_flag=True, help="Inline fused moetrt::MoE nodes of IN back to standard ops instead."
)
@_weights_options("the function body dequantizes them, so onnxruntime runs the result.")
@_user_errors
def fuse_command(
    in_path: str,
    out_path: str,
    explain: bool,
    decompose: bool,
    weights: str,
    weight_block: int | None,
    int4_zero_point: bool,
    activations: str,
) -> None:
    """Fuse each MoE block of IN.onnx into one moetrt::MoE node (with its standard-op function body).

    Prints the count and time of each pass (cleanup, fuse_moe, pack_weights). A block is fused only when
    the rule recognises it and (for blocks under 1 GiB of weights) the fused node gives the block's values
    on random inputs; anything MoE-looking left as standard ops is counted, and listed with the rule and
    the failed check under --explain. The output
    (IR 10, onnxruntime runs it as is) is written atomically; weights over 2 GB go to OUT.onnx.data (numbered
    shards past 4 GiB).

    \b
    Examples:
      moetrt fuse qwen3_next.onnx -o qwen3_next.fused.onnx --explain
      moetrt fuse qwen3_next.fused.onnx -o roundtrip.onnx --decompose
    """
    from moetrt.core.files import check_input_file, check_output_file

    check_input_file(in_path, "ONNX file", "pass the path of an .onnx file")
    check_output_file(out_path, ".onnx")
    if weights != "native" and decompose:
        raise MoetrtError("--weights quantizes fused experts; --decompose removes them", "pass one of them")
    from moetrt.build_request import check_weights_options

    check_weights_options(weights, weight_block, int4_zero_point, activations)
    from moetrt.passes import fuse_file
    from moetrt.passes.quantize_experts import ExpertQuantization

    quantize = ExpertQuantization.from_option(weights, weight_block, int4_zero_point, activations)
    result = fuse_file(
        in_path, out_path, explain=explain, decompose=decompose, progress=_progress, quantize=quantize
    )
    for line in result.summary_lines(explain=explain):
        click.echo(line)
    click.echo(f"wrote {out_path}")


# --- kernels: tune / aot ---
_PRESET_HELP = "A BENCH.md shape: qwen3_next, qwen3_30b, mixtral, deepseek_v3, gpt_oss_20b."
_ATTRS_HELP = 'MoE attributes as JSON, e.g. \'{"num_experts": 8, "top_k": 2, "hidden_size": 4096, ...}\'.'


class _PrecisionType(click.ParamType):
    """fp32 / fp16 / bf16; the kernel spellings (float32, float16, bfloat16) are accepted and normalised."""

    name = "[bf16|fp16|fp32]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from moetrt.core.dtypes import name_of

        try:
            return name_of(str(value))
        except MoetrtError as err:
            self.fail(err.one_line(), param, ctx)


_kernel_dtype_option = click.option(
    "--dtype",
    type=_PrecisionType(),
    default="bf16",
    show_default=True,
    metavar="[bf16|fp16|fp32]",
    help="Kernel precision.",
)


@main.command("aot")
@click.option("--preset", help=_PRESET_HELP)
@click.option("--attrs", "attrs_json", help=_ATTRS_HELP)
@_kernel_dtype_option
@click.option("--sm", type=int, required=True, help="Target SM: 80, 86, 87, 89, 90, 100 or 120.")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Kernel bundle file to write."
)
@click.option("-j", "--jobs", type=int, default=1, show_default=True, help="Parallel compiler processes.")
@_weights_options("the expert GEMMs dequantize them in their loops.")
@_user_errors
def aot_cmd(
    preset: str | None,
    attrs_json: str | None,
    dtype: str,
    sm: int,
    output: str,
    jobs: int,
    weights: str,
    weight_block: int | None,
    int4_zero_point: bool,
    activations: str,
) -> None:
    """Compile the MoE kernels ahead of time for one SM (no GPU needed) into a kernel bundle."""
    from moetrt.core.files import check_output_file, write_bytes_atomic

    attrs = with_weights(
        resolve_attrs(preset, attrs_json), weights, weight_block, int4_zero_point, activations
    )
    check_output_file(output)
    from moetrt.kernels.aot import compile_kernels

    bundle = compile_kernels(attrs, dtype, sm, workers=max(1, jobs))
    data = bundle.to_bytes()
    write_bytes_atomic(output, data)
    click.echo(
        f"wrote {output}: {len(bundle.kernels)} cubins for sm_{sm}, {len(data)} bytes "
        f"(triton {bundle.triton_version})"
    )


@main.command("tune")
@click.option("--preset", help=_PRESET_HELP)
@click.option("--attrs", "attrs_json", help=_ATTRS_HELP)
@_kernel_dtype_option
@click.option(
    "--tokens",
    default="1,16,64,512,4096",
    show_default=True,
    help="Token counts to time; a bucket (<=16, <=64, <=512, more) is scored by the sum over its counts.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Table to update, each bucket's entry as soon as it is tuned (a run stopped later keeps those); a "
    "file that does not exist yet is started empty. Write FOLDER/sm<SM>.json and set MOETRT_KERNEL_CONFIGS="
    "FOLDER for every step that compiles kernels (build, aot) to prefer its entries [default: the package's configs/sm<SM>.json].",
)
@click.option("-j", "--jobs", type=int, default=8, show_default=True, help="Parallel compiler processes.")
@click.option(
    "--rounds",
    help="Comma list of tuning rounds to run (tiles, tma, persist, router, topk, pdl) [default: all, from the default "
    "config]. A subset starts from the table's entry of each bucket, e.g. --rounds router,topk re-tunes only "
    "the routing launches of the shipped table (prefill buckets scored by those launches alone, decode buckets "
    "by the call).",
)
@click.option(
    "--draws",
    type=int,
    default=1,
    show_default=True,
    help="Random weight draws each candidate's call is timed on, scored by the mean. At decode a call's time "
    "moves with the draw (which experts the tokens pick: Qwen3-30B T = 8 took 125-133 us over four draws on "
    "an H200), so a close decision on one draw can follow its luck; GPU memory holds every draw's weights.",
)
@_weights_options(
    "the expert GEMM tiles are tuned for that format (the native entry of the shape keeps the others; tune "
    "it first)."
)
@_user_errors
def tune_cmd(
    preset: str | None,
    attrs_json: str | None,
    dtype: str,
    tokens: str,
    output: str | None,
    jobs: int,
    rounds: str | None,
    draws: int,
    weights: str,
    weight_block: int | None,
    int4_zero_point: bool,
    activations: str,
) -> None:
    """Tune the kernel-config table for the GPU of this machine (times every candidate on it)."""
    from moetrt.tune.tuner import rounds_to_run, tune_gpu

    try:
        counts = [int(t) for t in tokens.split(",")]
    except ValueError as err:
        raise MoetrtError(
            f"--tokens {tokens!r} is not a comma list of integers", "e.g. --tokens 1,64,4096"
        ) from err
    if any(t < 1 for t in counts):
        raise MoetrtError("--tokens must be positive", "e.g. --tokens 1,64,4096")
    if draws < 1:
        raise MoetrtError(f"--draws must be at least 1, got {draws}", "e.g. --draws 4")
    attrs = with_weights(
        resolve_attrs(preset, attrs_json), weights, weight_block, int4_zero_point, activations
    )
    picked = [r.strip() for r in rounds.split(",") if r.strip()] if rounds is not None else None
    rounds_to_run(attrs, picked)  # a bad --rounds fails here, before any GPU work
    best = tune_gpu(
        attrs, dtype, counts, output, workers=max(1, jobs), log=click.echo, rounds=picked, draws=draws
    )
    for key, entry in best.items():
        click.echo(f"{key}: {entry['us']} us at T={entry['tokens']}")


# --- build / run / inspect (TensorRT plugin and runtime) ---
@main.command("build")
@click.argument("model")
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--target",
    default=None,
    help="orin, thor, rtx40, rtx50, a100, h100, h200, b200 or sm_XX "
    "[default: h100; rtx40 with --engine-backend tensorrt-rtx].",
)
@click.option(
    "--precision",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default=None,
    help="Engine precision [default: an .onnx file's own; fp16 for a MODEL].",
)
@click.option(
    "--tokens",
    default="1:128:4096",
    show_default=True,
    help="MIN:OPT:MAX of the token (sequence) dimension in the engine's profile.",
)
@click.option("--batch", default="1:1:4", show_default=True, help="MIN:OPT:MAX of the batch dimension.")
@click.option(
    "--engine-backend",
    type=click.Choice(["tensorrt", "tensorrt-rtx"]),
    default="tensorrt",
    show_default=True,
    help="tensorrt: the MoE op as the moetrt plugin; tensorrt-rtx: as native layers, no plugin.",
)
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime-vs-PyTorch parity check.")
@click.option(
    "--allow-parity-failure",
    is_flag=True,
    help="Exit 0 even when the parity check fails (the manifest records the failure either way).",
)
@click.option("--force", is_flag=True, help="Replace OUTDIR if it holds an earlier build.")
@click.option("--verbose", is_flag=True, help="Print TensorRT's log.")
@click.option(
    "--plugin-library",
    type=click.Path(dir_okay=False),
    default=None,
    help="Build with the C++ plugin library (libmoetrt_plugin.so; docs/deploy.md says how to build it) instead "
    "of the Python plugin class: the kernels are compiled into each MoE node before TensorRT parses the "
    "model. Either way the engine holds the same fields and runs with either plugin. --engine-backend "
    "tensorrt only.",
)
@_cache_options
@click.option(
    "--max-context",
    type=click.IntRange(min=1),
    default=None,
    help="Longest context (past + new tokens) a cached decoder's engine accepts "
    "[default: twice --tokens' max, at least 4096, so a prefill can follow earlier tokens].",
)
@_weights_options(
    "parity then runs the reference with the same dequantized experts and the manifest records the "
    "quantization's error against the native weights. Either engine backend: the plugin's kernels dequantize "
    "in their GEMM loops, TensorRT-RTX runs the function body. A checkpoint whose experts are already stored "
    "quantized (FP8, MXFP4, GPTQ, AWQ) keeps its own codes: leave --weights out."
)
@_user_errors
def build_cmd(
    model: str,
    outdir: str,
    target: str | None,
    precision: str | None,
    tokens: str,
    batch: str,
    engine_backend: str,
    no_parity: bool,
    allow_parity_failure: bool,
    force: bool,
    verbose: bool,
    plugin_library: str | None,
    no_cache: bool,
    last_logits: bool,
    max_context: int | None,
    weights: str,
    weight_block: int | None,
    int4_zero_point: bool,
    activations: str,
) -> None:
    """Export MODEL (or take an .onnx), fuse MoE blocks, build an engine; write OUTDIR/{model.onnx,
    model.plan, manifest.json}.

    A causal LM builds as a cached decoder (see `moetrt export --help`) ready for `moetrt generate`: the
    engine gets a prefill profile (--tokens new tokens) and a decode profile (one token after up to
    --max-context - 1), and OUTDIR gets the model's tokenizer files and generation_config.json (a small
    tokenizer made locally for the demo models)."""
    from moetrt.build_request import BuildOptions, check_build_request

    options = BuildOptions(
        target=target,
        precision=precision,
        tokens=parse_dim_range(tokens, "--tokens"),
        batch=parse_dim_range(batch, "--batch"),
        engine_backend=engine_backend,
        parity=not no_parity,
        allow_parity_failure=allow_parity_failure,
        force=force,
        verbose=verbose,
        cache=not no_cache,
        last_logits=last_logits,
        max_context=max_context,
        weights=weights,
        weight_block=weight_block,
        int4_zero_point=int4_zero_point,
        activations=activations,
        plugin_library=Path(plugin_library) if plugin_library else None,
    )
    request = check_build_request(model, outdir, options)  # bad arguments answered before the heavy imports
    from moetrt.build import build_checked

    # Progress to stderr, the one summary line to stdout (scripts read that).
    result = build_checked(request, progress=lambda message: click.echo(message, err=True))
    click.echo(result.summary())


@main.command("run")
@click.argument("artifact", type=click.Path())
@click.option(
    "--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch of [batch, seq] inputs."
)
@click.option(
    "--seq",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Sequence length of [batch, seq] inputs.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Token count for [T, H] inputs (default: batch * seq).",
)
@click.option(
    "--past",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Cached decoders: earlier tokens in the random state (e.g. --seq 1 --past 1024 times a decode step).",
)
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime"]),
    default="auto",
    show_default=True,
    help="onnxruntime: run a build directory's model.onnx even when it has a plan.",
)
@click.option("--cuda-graph", is_flag=True, help="Engines: time replays of a captured CUDA graph.")
@_user_errors
def run_cmd(
    artifact: str,
    batch: int,
    seq: int,
    tokens: int | None,
    past: int,
    iters: int,
    seed: int,
    backend: str,
    cuda_graph: bool,
) -> None:
    """Load ARTIFACT (.plan, .onnx or build directory), run it on random inputs, print outputs and timing."""
    from moetrt.runtime import check_run_request, load, run_timed

    chosen = None if backend == "auto" else backend
    check_run_request(artifact, chosen, batch=batch, seq=seq, tokens=tokens, past=past)
    runner = load(artifact, backend=chosen)
    report = run_timed(
        runner, batch=batch, seq=seq, tokens=tokens, iters=iters, seed=seed, cuda_graph=cuda_graph, past=past
    )
    for line in report:
        click.echo(line)


@main.command("generate")
@click.argument("artifact", type=click.Path())
@click.option(
    "--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch of several prompts)."
)
@click.option(
    "--prompt-ids",
    "prompt_ids",
    multiple=True,
    metavar="1,2,3",
    help="Prompt as comma-separated token ids (repeat for several sequences).",
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Tokens to generate.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Repeat one prompt BATCH times.")
@click.option(
    "--temperature",
    type=float,
    default=0.0,
    show_default=True,
    help="0 is greedy (argmax); above 0 samples from softmax(logits / temperature).",
)
@click.option(
    "--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely (0: all)."
)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1: off).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option(
    "--stop-id",
    "stop_ids",
    type=int,
    multiple=True,
    help="Token id that ends a sequence (repeatable; generation_config.json's eos_token_id always does).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime"]),
    default="auto",
    show_default=True,
    help="onnxruntime: run a build directory's model.onnx even when it has a plan.",
)
@click.option(
    "--chat",
    is_flag=True,
    help="Render each --prompt as a user message with the model's chat template (and its generation prompt).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (ids, text, timings) at the end."
)
@_user_errors
def generate_cmd(
    artifact: str,
    prompts: tuple[str, ...],
    prompt_ids: tuple[str, ...],
    max_new_tokens: int,
    batch: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    stop_ids: tuple[int, ...],
    backend: str,
    chat: bool,
    as_json: bool,
) -> None:
    """Generate text with a cached decoder: a `moetrt build` directory (its engine, or its model.onnx with
    --backend onnxruntime) or a cached .onnx.

    Prefill runs the prompt once; each new token then runs one decode step with the KV cache and the
    linear-attention state kept on the device. Tokens print as they are produced (text when the artifact
    carries a tokenizer; one prompt), then prefill and decode tokens/s on stderr. Prompts of different
    lengths are left-padded into one batch.

    \b
    Examples:
      moetrt build demo:qwen3_next -o out/qwen3_next --target rtx40 --engine-backend tensorrt-rtx
      moetrt generate out/qwen3_next --prompt "hello" --backend onnxruntime
      moetrt generate out/qwen3_next --prompt-ids 1,2,3 --prompt-ids 4,5 --max-new-tokens 16 --json
    """
    from moetrt.runtime.generation import Sampling

    if max_new_tokens < 1:
        raise MoetrtError(f"--max-new-tokens is {max_new_tokens}", "ask for at least 1 new token")
    if prompts and prompt_ids:
        raise MoetrtError("both --prompt and --prompt-ids given", "pass one of them")
    if not prompts and not prompt_ids:
        raise MoetrtError("no prompt given", "pass --prompt TEXT or --prompt-ids 1,2,3")
    ids = [_parse_ids(text) for text in prompt_ids]
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    from moetrt.runtime.text_generation import (
        PromptRequest,
        decode_text,
        generation_json,
        open_generator,
        run_generation,
    )
    from moetrt.runtime.text_generation import (
        prompt_ids as to_ids,
    )

    request = PromptRequest(
        texts=prompts,
        chat=chat,
        ids=ids,
        batch=batch,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
    )
    generator = open_generator(artifact, None if backend == "auto" else backend)
    sequences = to_ids(generator, request)  # bad prompts answered before anything runs
    stream = not as_json and len(sequences) == 1
    produced: list[int] = []
    shown = [""]

    def on_step(_step: int, tokens: list[int | None]) -> None:
        token = tokens[0]
        if token is None:
            return
        produced.append(token)
        text = decode_text(generator, produced)
        if text is not None and text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
            return
        if text is None:
            click.echo(f"{token} ", nl=False)
        elif text.startswith(shown[0]):
            click.echo(text[len(shown[0]) :], nl=False)
            shown[0] = text

    result = run_generation(generator, request, on_step if stream else None)
    if as_json:
        click.echo(json.dumps(generation_json(generator, result)))
        return
    if stream:
        click.echo("")
    else:
        for index, new in enumerate(result.ids):
            text = decode_text(generator, new)
            click.echo(f"[{index}] {text if text is not None else ' '.join(map(str, new))}")
    click.echo(
        f"prefill: {sum(result.prompt_lengths)} tokens in {result.prefill_seconds * 1e3:.1f} ms "
        f"({result.prefill_tokens_per_s:.1f} tokens/s); decode: {result.decode_tokens} tokens in "
        f"{result.decode_seconds * 1e3:.1f} ms ({result.decode_tokens_per_s:.1f} tokens/s) on {generator.backend}",
        err=True,
    )


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise MoetrtError(
            f"--prompt-ids {text!r} is not a comma list of integers", "e.g. --prompt-ids 1,2,3"
        ) from None
    if not ids:
        raise MoetrtError(f"--prompt-ids {text!r} holds no ids", "e.g. --prompt-ids 1,2,3")
    return ids


@main.command("inspect")
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@_user_errors
def inspect_cmd(artifact: str, as_json: bool) -> None:
    """Describe a fused .onnx (MoE nodes, attributes), a build directory (manifest, file hashes) or a .plan
    (its sidecar checks), without TensorRT."""
    import json

    from moetrt.runtime.manifest import inspect_artifact, summary_lines

    report = inspect_artifact(artifact)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        for line in summary_lines(report):
            click.echo(line)
    if report.get("files_ok") is False:
        raise MoetrtError(
            f"{artifact} does not match its manifest: {report.get('files_error')}",
            "rebuild it with `moetrt build`",
        )


def with_weights(
    attrs: MoEAttributes,
    weights: str,
    weight_block: int | None,
    int4_zero_point: bool,
    activations: str = "native",
) -> MoEAttributes:
    """`attrs` with its routed experts in the `--weights` format (block chosen as `moetrt fuse` does) and their
    inputs in the `--activations` one."""
    import dataclasses

    from moetrt.build_request import check_weights_options
    from moetrt.passes.quantize_experts import ExpertQuantization, choose_block

    check_weights_options(weights, weight_block, int4_zero_point, activations)
    quantize = ExpertQuantization.from_option(weights, weight_block, int4_zero_point, activations)
    if quantize is None:
        return attrs
    if attrs.is_quantized:
        raise MoetrtError(
            f"the attributes already store {attrs.weight_format} experts and --weights {weights} was given",
            "pass one of them",
        )
    return dataclasses.replace(
        attrs,
        weight_format=quantize.weight_format,
        weight_block=choose_block(quantize.weight_format, attrs, quantize.block),
        has_weight_zero_point=quantize.zero_point,
        activation_format=quantize.activation_format,
    )


def resolve_attrs(preset: str | None, attrs_json: str | None) -> MoEAttributes:
    """MoE attributes from a preset name or a JSON object of MoEAttributes fields (exactly one of them)."""
    import json

    from moetrt.op.presets import PRESETS
    from moetrt.op.spec import MoEAttributes

    if bool(preset) == bool(attrs_json):
        raise MoetrtError(
            "give exactly one of --preset and --attrs",
            f"e.g. --preset qwen3_next (one of {', '.join(PRESETS)}) or --attrs '{{\"num_experts\": 8, ...}}'",
        )
    if preset:
        if preset not in PRESETS:
            raise MoetrtError(
                f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)} or --attrs JSON"
            )
        return PRESETS[preset]
    try:
        fields = json.loads(attrs_json or "")
        return MoEAttributes.from_onnx_attributes(fields)
    except (ValueError, TypeError) as err:
        raise MoetrtError(
            f"--attrs is not a valid MoE attribute object ({err})",
            "pass JSON with num_experts, top_k, hidden_size, intermediate_size, ... (spec.py)",
        ) from err


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """`1x8,3x16,2x1+80` -> [(1, 8), (3, 16), (2, 1, 80)] (`+PAST`: new tokens after PAST earlier ones)."""
    hint = "write shapes as BATCHxSEQ or BATCHxSEQ+PAST, e.g. 1x8,3x16,2x1+80"
    shapes: list[tuple[int, ...]] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        head, plus, past = item.lower().partition("+")
        parts = head.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise MoetrtError(f"cannot parse shape {item!r}", hint)
        if plus and not past.isdigit():
            raise MoetrtError(f"cannot parse the past of shape {item!r}", hint)
        shape = (int(parts[0]), int(parts[1]))
        shapes.append((*shape, int(past)) if plus else shape)
    if not shapes:
        raise MoetrtError("no shapes given", hint)
    return shapes


def parse_dim_range(text: str, flag: str) -> DimRange:
    """`1:128:4096` (or one number for all three) -> DimRange (which checks the range); errors name the flag."""
    from moetrt.trt.targets import MAX_DIM, DimRange

    try:
        values = [int(p) for p in text.split(":")]
        return DimRange(*(values * 3 if len(values) == 1 else values))
    except (ValueError, TypeError, MoetrtError):
        raise MoetrtError(
            f"{flag} {text!r} is not MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX <= {MAX_DIM}",
            f"write e.g. {flag} 1:128:4096",
        ) from None


if __name__ == "__main__":
    main()
