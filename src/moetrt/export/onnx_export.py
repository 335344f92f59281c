"""Export a `LoadedModel` to ONNX with the dynamo exporter: dynamic batch and sequence, IR <= 10,
the model spec in metadata, external data above 2 GB, atomic writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrt.core.artifacts import (
    META_DTYPE,
    META_EXAMPLE_SHAPE,
    META_LAST_LOGITS,
    META_LONG_SEQ,
    META_NUM_MOE_BLOCKS,
    META_SOURCE,
    META_STATE,
    WRAPPED_PREFIX,
)
from moetrt.core.dtypes import name_of, precision
from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import (
    MAX_IR_VERSION,
    external_data_files,
    needs_external_data,
    staged_onnx_path,
    weight_bytes,
    write_onnx,
)
from moetrt.core.progress import heartbeat, quiet_loggers
from moetrt.export.loaded import CACHED, DecoderForm, LoadedModel
from moetrt.export.model_source import load_model, loads_from_disk
from moetrt.export.offloaded import STREAM_MIN_BYTES, attach_weights, fold_weight_transposes

DEFAULT_OPSET = 18
#: bf16 exports need opset 22: earlier opsets do not allow bfloat16 for Conv (Qwen3-Next's short convolution)
#: and other ops, so an opset-18 bf16 file fails ONNX type checking.
MIN_BF16_OPSET = 22
#: Opsets the dynamo exporter and onnxruntime both handle.
SUPPORTED_OPSETS = range(18, 24)

Progress = Callable[[str], None]
#: error: a mismatch fails the export; warn: it is reported and the file kept; off: no check.
SELF_CHECK_MODES = ("error", "warn", "off")
#: The whole-model self-check holds the graph in onnxruntime and a float32 copy of the module: bounded.
SELF_CHECK_MAX_BYTES = STREAM_MIN_BYTES  # above it the model is exported from disk, never held whole


@dataclass(frozen=True)
class ExportResult:
    path: Path
    num_moe_blocks: int
    num_nodes: int
    seconds: float
    spec: str
    dtype: str
    opset: int
    ir_version: int
    external_data: Path | None  # the first external-data file (of several when the weights are sharded)
    weight_bytes: int
    data_files: int = 0

    def summary(self) -> str:
        data = ""
        if self.external_data is not None:
            more = f" and {self.data_files - 1} more shard(s)" if self.data_files > 1 else ""
            data = f", weights in {self.external_data.name}{more}"
        return (
            f"wrote {self.path} ({self.num_nodes} nodes, {self.num_moe_blocks} MoE blocks found, "
            f"{self.dtype}, opset {self.opset}, IR {self.ir_version}{data}) in {self.seconds:.1f} s"
        )


def export_onnx(
    spec_or_loaded: str | LoadedModel,
    out_path: str | os.PathLike[str],
    dtype: str = "fp32",
    opset: int | None = None,
    progress: Progress | None = None,
    self_check: str = "error",
    stream: bool | None = None,
    form: DecoderForm = CACHED,
    rewrite: Callable[[Any, LoadedModel], None] | None = None,
) -> ExportResult:
    """Export a MODEL spec (or an already loaded model) to `out_path`.

    `opset` defaults to 18, or 22 for bf16. The file (and `<out>.data` when the weights exceed 2 GB)
    appears only when the export succeeded and, unless `self_check` is "warn" or "off", the written model
    matches PyTorch at the example inputs (`self_check.check_export`).

    `form` (causal LMs): a cached decoder with the state of every layer as inputs and outputs (the default,
    `export.cached`) or `input_ids -> logits`; logits of every position or of the last only.

    `stream` (default: for Hugging Face checkpoints over `STREAM_MIN_BYTES`) exports from disk: the model is
    traced on the meta device and each weight is read when it is written (`export.offloaded`), so memory
    holds about one layer's weights; converted weights take disk space beside the output meanwhile.

    `rewrite(model, loaded)` changes the exported graph (onnx_ir) in place before it is written. A checkpoint
    whose experts are stored quantized needs one that puts them in fused nodes (the build's): written as
    exported, its experts would be float.
    """
    if self_check not in SELF_CHECK_MODES:
        raise MoetrtError(
            f"unknown self-check mode {self_check!r}", f"use one of {', '.join(SELF_CHECK_MODES)}"
        )
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise MoetrtError(f"output {str(out_path)!r} does not end in .onnx", "name the output file *.onnx")
    if out_path.is_dir():
        raise MoetrtError(f"output {str(out_path)!r} is a directory", "give a file name ending in .onnx")
    torch_dtype = precision(dtype).torch
    opset = default_opset(torch_dtype) if opset is None else opset
    if opset not in SUPPORTED_OPSETS:
        raise MoetrtError(
            f"opset {opset} is not supported",
            f"use an opset from {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}",
        )
    if torch_dtype == torch.bfloat16 and opset < MIN_BF16_OPSET:
        raise MoetrtError(
            f"bf16 needs opset {MIN_BF16_OPSET} or later (opset {opset} does not allow bfloat16 for Conv "
            "and other ops)",
            f"pass --opset {MIN_BF16_OPSET} or leave --opset out",
        )

    if stream is None:
        stream = not isinstance(spec_or_loaded, LoadedModel) and loads_from_disk(spec_or_loaded)
    if stream and isinstance(spec_or_loaded, LoadedModel):
        raise MoetrtError("a loaded model cannot be exported from disk", "pass the MODEL spec instead")

    with staged_onnx_path(out_path) as staged:
        if isinstance(spec_or_loaded, LoadedModel):
            loaded = spec_or_loaded
            if loaded.dtype != torch_dtype:
                raise MoetrtError(
                    f"the loaded model is {name_of(loaded.dtype)} but dtype {dtype} was requested",
                    "load it with the same dtype or pass the MODEL spec instead",
                )
        elif stream:
            # Converted weights go to a folder in the staging directory: removed with it, whatever happens.
            say(
                f"loading {spec_or_loaded} ({name_of(torch_dtype)}) from disk: weights stay there until written"
            )
            with heartbeat(say, "converting the checkpoint"), quiet_loggers("transformers", "accelerate"):
                loaded = load_model(spec_or_loaded, torch_dtype, staged.parent / "offload", form)
        else:
            say(f"loading {spec_or_loaded} ({name_of(torch_dtype)})")
            loaded = load_model(spec_or_loaded, torch_dtype, form=form)
        say(f"found {loaded.num_moe_blocks} MoE block(s) in {loaded.spec}")
        if loaded.stored is not None and rewrite is None:
            raise MoetrtError(
                f"{loaded.spec} stores its experts quantized ({loaded.stored.quant.method}); exported alone they "
                "would be written in float",
                "build it instead (`moetrt build MODEL -o OUT --engine-backend tensorrt-rtx`): the build keeps the "
                "stored experts in the fused nodes",
            )

        say(
            f"exporting with torch.onnx.export (dynamo, opset {opset}); this can take a while for large models"
        )
        with heartbeat(say, "exporting"):
            program = _torch_export(loaded, opset)
        model = program.model
        say("exported; finalising the graph")
        if rewrite is not None:
            rewrite(model, loaded)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        model.metadata_props.update(
            {
                META_SOURCE: loaded.spec,
                META_DTYPE: name_of(loaded.dtype),
                META_NUM_MOE_BLOCKS: str(loaded.num_moe_blocks),
                META_LONG_SEQ: str(loaded.long_seq),
                META_EXAMPLE_SHAPE: "x".join(str(d) for d in loaded.example_inputs[0].shape[:2]),
            }
        )
        if loaded.state is not None:
            model.metadata_props[META_STATE] = json.dumps([t.to_json() for t in loaded.state.tensors()])
            model.metadata_props[META_LAST_LOGITS] = str(int(loaded.last_logits))
        model.producer_name = "moetrt"
        weights = weight_bytes(model)
        external = needs_external_data(model)
        num_nodes = sum(1 for _ in model.graph.all_nodes())
        ir_version = model.ir_version

        say(f"writing {out_path} ({weights / 1e6:.1f} MB of weights{', external data' if external else ''})")
        with heartbeat(say, "writing"):
            write_onnx(model, staged, external=external)
        del program, model  # the check loads the file: do not hold two copies of the weights
        if self_check != "off" and (stream or loaded.offloaded is not None):
            say(
                "self-check skipped: the model was exported from disk and is never held whole in memory; "
                "check it with `moetrt verify` on a machine that holds it"
            )
        elif self_check != "off" and weights > SELF_CHECK_MAX_BYTES:
            say(
                f"self-check skipped: {weights / 1e9:.1f} GB of weights are over the whole-model check's "
                f"{SELF_CHECK_MAX_BYTES / 1e9:.0f} GB bound (it holds an onnxruntime session and a float32 "
                "PyTorch copy); check blocks with `moetrt verify`"
            )
        elif self_check != "off":
            _check_written(staged, out_path, loaded, self_check, say)
    data_files = external_data_files(out_path)
    return ExportResult(
        path=out_path,
        num_moe_blocks=loaded.num_moe_blocks,
        num_nodes=num_nodes,
        seconds=time.perf_counter() - start,
        spec=loaded.spec,
        dtype=name_of(loaded.dtype),
        opset=opset,
        ir_version=MAX_IR_VERSION if ir_version > MAX_IR_VERSION else ir_version,
        external_data=data_files[0] if data_files else None,
        weight_bytes=weights,
        data_files=len(data_files),
    )


def default_opset(dtype: torch.dtype) -> int:
    return MIN_BF16_OPSET if dtype == torch.bfloat16 else DEFAULT_OPSET


def _torch_export(loaded: LoadedModel, opset: int) -> torch.onnx.ONNXProgram:
    # The exporter prints its own step log on stdout; keep it for the error message only.
    from moetrt.export.export_friendly import export_friendly

    log = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(log),
            quiet_loggers("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers"),
            export_friendly(loaded.module),
        ):
            warnings.simplefilter("ignore")
            offloaded = loaded.offloaded
            examples = loaded.example_inputs
            # A meta-device module traces on meta inputs and is optimised once its weights are attached.
            if offloaded is not None:
                examples = tuple(t.to("meta") for t in examples)
            program = torch.onnx.export(
                loaded.module,
                examples,
                dynamo=True,
                input_names=loaded.input_names,
                output_names=loaded.output_names,
                dynamic_shapes=loaded.dynamic_shapes,
                opset_version=opset,
                optimize=offloaded is None,
                verbose=False,
                report=False,
            )
            if offloaded is not None and program is not None:
                attach_weights(program.model, offloaded, prefix=WRAPPED_PREFIX)
                fold_weight_transposes(program.model)  # else the optimiser folds them, holding every weight
                program.optimize()
    except Exception as err:
        # The exporter wraps the real failure in a generic "step 1/3 failed" error: report the innermost cause.
        cause: BaseException = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise MoetrtError(
            f"torch.onnx.export failed for {loaded.spec}: {type(cause).__name__}: {_first_line(cause)}",
            "make the model traceable by torch.export (no data-dependent Python control flow)",
        ) from None
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise MoetrtError(f"torch.onnx.export returned nothing for {loaded.spec}", "report this as a bug")
    return program


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_written(staged: Path, out_path: Path, loaded: LoadedModel, mode: str, say: Progress) -> None:
    from moetrt.export.self_check import check_export

    say("checking the written ONNX against PyTorch at the example inputs (onnxruntime CPU)")
    with heartbeat(say, "checking"):
        checks = check_export(staged, loaded)
    failed = [c for c in checks if not c.passed]
    if not failed:
        say("self-check PASS: " + "; ".join(map(str, checks)))
        return
    line = f"the exported ONNX does not match PyTorch at the example inputs: {'; '.join(map(str, failed))}"
    if mode == "warn":
        say(f"warning: {line} (kept: --self-check warn)")
        return
    raise MoetrtError(
        f"{line}; {out_path} was not written",
        "report the model family; `moetrt export --self-check warn` keeps the file for inspection",
    )
