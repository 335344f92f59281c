"""Parity check: an ONNX model run by onnxruntime against its PyTorch reference, at several shapes.

Works on any ONNX file with the exported signature, including fused models whose custom-domain nodes carry
local function bodies (onnxruntime runs the bodies). The reference MODEL is found in the file's
`moetrt.source` metadata unless given. Execution goes through polygraphy: its onnxruntime runner and a
small CPU PyTorch runner, driven by `Comparator.run`; the comparison is `verify.compare` (the
relative norm error of `core.tolerances`, with the tolerance of the model's dtype).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moetrt.core.artifacts import (
    MANIFEST_NAME,
    META_DTYPE,
    META_EXAMPLE_SHAPE,
    META_LONG_SEQ,
    META_SOURCE,
    ONNX_NAME,
)
from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import load_onnx, metadata
from moetrt.core.tolerances import TOLERANCES
from moetrt.op.fused_node import check_fused_model
from moetrt.verify.compare import (
    Shape,
    VerifyReport,
    compare_outputs,
    default_shapes,
    past_of,
    quiet_logs,
    shape_text,
)

Progress = Callable[[str], None]


def verify(
    artifact: str | Path,
    reference: str | None = None,
    shapes: Sequence[Shape] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    dtype: str = "fp32",
    per_layer: bool = False,
    native_reference: bool = False,
) -> VerifyReport:
    """Run `artifact` (an .onnx file, or a MODEL spec exported first) and its PyTorch reference on the same
    random inputs at each shape; `dtype` only applies when `artifact` is a MODEL spec.

    A failing shape is diagnosed (`verify.diagnose`): tokens routed differently at near-ties are named and
    judged against the reference routed like the artifact; `per_layer` also compares every layer's output
    (at every shape) and names the first out of tolerance. An artifact with quantized experts is compared
    against the reference running the same dequantized experts (`verify.quantized`), or, with
    `native_reference`, against the model's own weights (the quantization's error)."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    artifact_str = str(artifact)
    with contextlib.ExitStack() as stack:
        if _looks_like_onnx(artifact_str):
            onnx_path = Path(artifact_str)
            if (
                onnx_path.is_dir()
            ):  # a `moetrt build` directory: its portable model, checked against the manifest
                from moetrt.runtime.loading import check_against_manifest, resolve_artifact

                onnx_path = resolve_artifact(onnx_path, "onnxruntime")
                check_against_manifest(onnx_path)
        else:
            from moetrt.export.onnx_export import export_onnx

            tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moetrt-verify-")))
            onnx_path = tmp_dir / ONNX_NAME
            say(f"{artifact_str} is a MODEL spec: exporting it to a temporary ONNX file first")
            export_onnx(artifact_str, onnx_path, dtype=dtype, progress=say)
            reference = reference or artifact_str
        widened = _widened_if_bf16(onnx_path, stack)
        report = _verify_onnx(
            widened or onnx_path, reference, shapes, seed, say, per_layer, native_reference, onnx_path
        )
        if widened is not None:
            report.findings.append(BF16_WIDENED_NOTE)
    report.artifact = artifact_str
    report.seconds = time.perf_counter() - start
    return report


BF16_WIDENED_NOTE = (
    "bf16: onnxruntime's CPU provider lacks bf16 kernels, so the graph ran as its exact float32 widening against "
    "the reference on the same bf16 weights in float32, at the bf16 tolerance: export, fusion and routing are "
    "checked; the bf16 rounding of activations is not"
)


def _widened_if_bf16(onnx_path: Path, stack: contextlib.ExitStack) -> Path | None:
    """A bf16 model's exact float32 widening, written to a temporary file; None for other dtypes."""
    if metadata(load_onnx(onnx_path, load_external_data=False)).get(META_DTYPE) != "bf16":
        return None
    from moetrt.core.onnx_io import write_widened

    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moetrt-widened-"))) / onnx_path.name
    write_widened(onnx_path, path)
    return path


def _looks_like_onnx(text: str) -> bool:
    return text.endswith(".onnx") or Path(text).is_file() or (Path(text) / MANIFEST_NAME).is_file()


def _verify_onnx(
    onnx_path: Path,
    reference: str | None,
    shapes: Sequence[Shape] | None,
    seed: int,
    say: Progress,
    per_layer: bool = False,
    native_reference: bool = False,
    original: Path | None = None,
) -> VerifyReport:
    meta, onnx_inputs, onnx_outputs = _read_onnx_header(onnx_path)
    reference = reference or meta.get(META_SOURCE)
    if not reference:
        raise MoetrtError(
            f"{onnx_path} does not name its source model (no {META_SOURCE} metadata)",
            "pass --reference MODEL",
        )
    dtype = meta.get(META_DTYPE, "fp32")
    if dtype not in TOLERANCES:
        raise MoetrtError(f"{onnx_path} has unknown dtype {dtype!r} in its metadata", "re-export it")
    tolerance = TOLERANCES[dtype]

    # onnxruntime first: a file it cannot run fails fast, before the reference model is built.
    say(f"starting onnxruntime on {onnx_path}")
    with quiet_logs():
        ort_runner = _onnxruntime_runner(onnx_path, dtype)

    say(f"loading the reference {reference} ({dtype})")
    from moetrt.export.model_source import load_model

    loaded = load_model(reference, dtype)
    with contextlib.ExitStack() as stack:
        return _compare(
            onnx_path,
            reference,
            loaded,
            shapes,
            seed,
            say,
            per_layer,
            meta,
            onnx_inputs,
            onnx_outputs,
            dtype,
            tolerance,
            stack,
            native_reference,
            original or onnx_path,
            ort_runner,
        )


def _compare(
    onnx_path: Path,
    reference: str,
    loaded: Any,
    shapes: Sequence[Shape] | None,
    seed: int,
    say: Progress,
    per_layer: bool,
    meta: dict[str, str],
    onnx_inputs: list[str],
    onnx_outputs: list[str],
    dtype: str,
    tolerance: float,
    stack: contextlib.ExitStack,
    native_reference: bool,
    original: Path,
    ort_runner: Any,
) -> VerifyReport:
    from moetrt.verify.quantized import dequantized_experts, describe_formats, quantized_nodes

    quantized = quantized_nodes(original)  # the file as written (a bf16 one runs as its float32 widening)
    if quantized and not native_reference:
        stack.enter_context(dequantized_experts(loaded.module, original))
        say(
            f"experts stored as {describe_formats(quantized)}: the reference runs with the same dequantized experts"
        )
    if list(loaded.input_names) != onnx_inputs:
        raise MoetrtError(
            f"{onnx_path} takes inputs {onnx_inputs} but the reference {reference} takes {loaded.input_names}",
            "pass the --reference MODEL this file was exported from",
        )
    output_names = onnx_outputs[: len(loaded.output_names)]
    if shapes is None:
        example = _parse_example_shape(meta.get(META_EXAMPLE_SHAPE), loaded)
        long_seq = int(meta.get(META_LONG_SEQ, loaded.long_seq))
        shapes = default_shapes(example, long_seq, decoder=loaded.state is not None)

    feeds = [
        OrderedDict(
            (name, _to_numpy(tensor))
            for name, tensor in zip(
                loaded.input_names, loaded.prefixed_inputs(shape[0], shape[1], seed + i, past_of(shape))
            )
        )
        for i, shape in enumerate(shapes)
    ]
    torch_runner = _torch_runner(loaded.module, feeds[0], output_names)
    say(f"running onnxruntime and PyTorch at shapes {', '.join(map(shape_text, shapes))}")
    results = _run_comparator([ort_runner, torch_runner], feeds)

    report = VerifyReport(artifact=str(onnx_path), reference=reference, dtype=dtype)
    if quantized:
        report.findings.append(_quantized_finding(describe_formats(quantized), native_reference))
        if not native_reference and any(a.has_fp8_activations for _, a in quantized):
            report.findings.append(FP8_ACTIVATIONS_NOTE)
    ort_results, torch_results = results[0][1], results[1][1]
    for shape, ort_out, ref_out in zip(shapes, ort_results, torch_results):
        for name in output_names:
            report.rows.append(compare_outputs(ort_out[name], ref_out[name], shape, name, tolerance))

    failing = {row.shape for row in report.rows if not row.passed}
    cases = [(shape, feed) for shape, feed in zip(shapes, feeds) if per_layer or shape in failing]
    if cases:
        from moetrt.verify.diagnose import apply_diagnoses, diagnose

        what = "every layer's output and the routing" if per_layer else "the routing and the dtype"
        say(f"diagnosing {', '.join(shape_text(shape) for shape, _ in cases)}: {what}")
        with quiet_logs():
            diagnoses = diagnose(
                onnx_path,
                loaded.module,
                loaded.input_names,
                output_names,
                cases,
                dtype,
                tolerance,
                per_layer,
                failing,
            )
        apply_diagnoses(report, diagnoses)
    return report


FP8_ACTIVATIONS_NOTE = (
    "fp8 activations: the reference quantizes its experts' inputs alike, but the rounding of the layers before "
    "each block (the artifact's dtype against float32) moves values across fp8 rounding boundaries, so these "
    "rows can leave the dtype's bound; `moetrt verify --blocks` judges each block on the same inputs"
)


def _quantized_finding(formats: str, native_reference: bool) -> str:
    if native_reference:
        return (
            f"experts stored as {formats}: compared against the model's native weights, so the errors are the "
            "quantization's own"
        )
    return (
        f"experts stored as {formats}: compared against the reference with the same dequantized experts (checks "
        "the quantized graph); the quantization's own error is not in these rows"
    )


def _read_onnx_header(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Metadata, input and output names (fused nodes checked), without loading external weights."""
    model = load_onnx(path, load_external_data=False)
    check_fused_model(model)
    initializer_names = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializer_names]
    outputs = [o.name for o in model.graph.output]
    return metadata(model), inputs, outputs


def _parse_example_shape(text: str | None, loaded: Any) -> Shape:
    if text:
        with contextlib.suppress(ValueError):
            batch, seq = (int(v) for v in text.split("x"))
            return batch, seq
    shape = loaded.example_inputs[0].shape
    return int(shape[0]), int(shape[1]) if len(shape) > 1 else 1


def _onnxruntime_runner(path: Path, dtype: str) -> Any:
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    # The session is built here rather than lazily in the runner, so a load failure becomes a clear error.
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        text = str(err)
        if "tensor(bfloat16)" in text and "Type Error" in text:
            # Written by an older export at an opset that does not allow bfloat16 for some op.
            bad_op = re.search(r"of operator \((\w+)\)", text)
            raise MoetrtError(
                f"{path} uses bfloat16 where its opset does not allow it"
                f" ({bad_op.group(1) if bad_op else 'some op'}), so onnxruntime rejects the file",
                "re-export it with `moetrt export --dtype bf16` (which writes opset 22)",
            ) from None
        if dtype == "bf16" and ("NOT_IMPLEMENTED" in text or "implementation" in text):
            missing = re.search(r"implementation for (\w+)\(", text)
            op = missing.group(1) if missing else "some op"
            raise MoetrtError(
                f"onnxruntime's CPU provider has no bf16 kernel for {op}, so this bf16 model cannot be "
                "verified on CPU",
                "verify an fp32 or fp16 export, or run the bf16 model on a GPU runtime",
            ) from None
        raise MoetrtError(
            f"onnxruntime cannot load {path}: {text.strip().splitlines()[0] if text.strip() else type(err)}",
            "re-export it with `moetrt export`, or check that custom ops have function bodies",
        ) from None
    return OnnxrtRunner(session, name="onnxruntime")


def _run_comparator(runners: list[Any], feeds: list[OrderedDict[str, np.ndarray]]) -> Any:
    from polygraphy.comparator import Comparator

    with quiet_logs():
        try:
            return Comparator.run(runners, data_loader=feeds, warm_up=0)
        except MoetrtError:
            raise
        except Exception as err:
            text = str(err).strip()
            raise MoetrtError(
                f"running the models failed: {text.splitlines()[0] if text else type(err).__name__}",
                "check that the ONNX file matches the reference model",
            ) from None


def _to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # a bf16 model runs widened to float32 (`_widened_if_bf16`): exact
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _torch_runner(module: Any, example_feed: dict[str, np.ndarray], output_names: list[str]) -> Any:
    """A polygraphy runner for a PyTorch module on CPU (polygraphy's own PytRunner needs CUDA).

    The reference runs in float32 from the model's own weights (already rounded to the export dtype),
    so the tolerance measures only the ONNX side's rounding.
    """
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    input_names = list(example_feed)

    class _Runner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name="pytorch")
            self.module = module
            self._output_names = list(output_names)

        def activate_impl(self) -> None:
            self.reference = self.module.float().eval()

        def get_input_metadata_impl(self) -> TensorMetadata:
            meta = TensorMetadata()
            for name, array in example_feed.items():  # every dim dynamic: decoders' state dims differ
                meta.add(name, array.dtype, [f"{name}_{axis}" for axis in range(array.ndim)])
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            tensors = []
            for name in input_names:
                tensor = torch.from_numpy(np.ascontiguousarray(feed_dict[name]))
                tensors.append(tensor.float() if tensor.is_floating_point() else tensor)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.reference(*tensors)
            self.inference_time = time.perf_counter() - start
            outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            return OrderedDict(
                (name, t.float().numpy()) for name, t in zip(self._output_names, outs, strict=False)
            )

        def deactivate_impl(self) -> None:
            del self.reference

    return _Runner()
