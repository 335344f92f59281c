"""Parity of what `runtime.load` runs (a TensorRT engine, or an onnxruntime session) with the PyTorch model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from moetrt.core.artifacts import (
    MANIFEST_NAME,
    META_DTYPE,
    META_EXAMPLE_SHAPE,
    META_LONG_SEQ,
    META_SOURCE,
    ONNX_NAME,
)
from moetrt.core.errors import MoetrtError
from moetrt.core.progress import quiet_loggers
from moetrt.core.tolerances import TOLERANCES
from moetrt.runtime import load, resolve_artifact
from moetrt.runtime.manifest import read_manifest
from moetrt.trt.profiles import check_in_profile
from moetrt.verify.compare import VerifyReport, compare_outputs, default_shapes, past_of, shape_text


def verify_loaded(
    artifact: str | Path,
    reference: str | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    backend: str | None = None,
    reference_dtype: str | None = None,
    tolerance: float | None = None,
) -> VerifyReport:
    """Parity of what `load(artifact)` runs (an engine, or an onnxruntime session) with the PyTorch model.

    The reference and dtype come from the build's manifest.json (engine) or the ONNX file's metadata;
    shapes default to `verify.default_shapes` (batch 1, a larger batch, a long sequence), and an engine
    refuses, before running, any of them outside its profile. Same metric and tolerances as `moetrt verify`.
    `reference_dtype` / `tolerance` override the recorded precision's (for a graph widened from bf16 to fp32:
    the reference keeps the bf16 weights, the tolerance is fp32's); floating inputs are cast to the dtype
    the artifact takes.
    """
    import time

    import torch

    from moetrt.export.model_source import load_model

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    path = resolve_artifact(artifact, backend)
    onnx_path = path if path.suffix == ".onnx" else path.parent / ONNX_NAME
    meta = _onnx_metadata(onnx_path) if onnx_path.is_file() else {}
    manifest_path = path.parent / MANIFEST_NAME
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    reference = reference or meta.get(META_SOURCE) or (manifest or {}).get("source")
    if not reference or reference.endswith(".onnx"):
        raise MoetrtError(f"{path} does not name the PyTorch model it came from", "pass --reference MODEL")
    dtype = reference_dtype or (manifest or {}).get("precision") or meta.get(META_DTYPE, "fp32")
    if dtype not in TOLERANCES:
        raise MoetrtError(f"{path} has unknown precision {dtype!r}", "rebuild it with `moetrt build`")

    say(f"loading the reference {reference} ({dtype})")
    loaded = load_model(reference, dtype)
    if shapes is None:
        example = meta.get(META_EXAMPLE_SHAPE, "")
        batch, _, seq = example.partition("x")
        example_shape = (int(batch), int(seq)) if batch.isdigit() and seq.isdigit() else (2, 8)
        long_seq = int(meta.get(META_LONG_SEQ, loaded.long_seq))
        shapes = default_shapes(example_shape, long_seq, decoder=loaded.state is not None)
    feeds_per_shape = [
        loaded.prefixed_inputs(shape[0], shape[1], seed + i, past_of(shape)) for i, shape in enumerate(shapes)
    ]
    if path.suffix == ".plan" and manifest is not None:
        # From the manifest alone, before a GPU or TensorRT is needed.
        for inputs in feeds_per_shape:
            shape_of = {n: list(t.shape) for n, t in zip(loaded.input_names, inputs)}
            check_in_profile(manifest["profiles"], shape_of)

    runner = load(path, backend)
    say(f"loaded {path} ({runner.backend})")
    if list(loaded.input_names) != list(runner.input_names):
        raise MoetrtError(
            f"{path} takes inputs {runner.input_names} but {reference} takes {loaded.input_names}",
            "pass the --reference MODEL this artifact was built from",
        )

    device = torch.device("cuda") if runner.backend != "onnxruntime" else runner.device
    reference_module = loaded.module.float().eval()
    from moetrt.verify.quantized import dequantized_experts

    # Quantized experts: the reference runs with the same dequantized experts (a no-op for native ones).
    quantized = dequantized_experts(reference_module, onnx_path) if onnx_path.is_file() else nullcontext(0)
    output_names = list(runner.output_names)[: len(loaded.output_names)]
    report = VerifyReport(artifact=str(artifact), reference=reference, dtype=dtype)
    tolerance = tolerance if tolerance is not None else TOLERANCES[dtype]

    def feed(name: str, tensor: torch.Tensor) -> torch.Tensor:
        want = runner.input_specs[name][0]
        if tensor.is_floating_point() and want is not None and want.is_floating_point:
            tensor = tensor.to(want)
        return tensor.to(device)

    say(f"running {runner.backend} and PyTorch at shapes {', '.join(map(shape_text, shapes))}")
    with quantized:
        for shape, inputs in zip(shapes, feeds_per_shape):
            outputs = runner({n: feed(n, t) for n, t in zip(loaded.input_names, inputs)})
            with torch.inference_mode(), quiet_loggers("transformers"):
                expected = reference_module(*(t.float() if t.is_floating_point() else t for t in inputs))
            expected = (expected,) if isinstance(expected, torch.Tensor) else tuple(expected)
            for name, ref in zip(output_names, expected):
                report.rows.append(compare_outputs(outputs[name], ref, shape, name, tolerance))
    report.seconds = time.perf_counter() - start
    return report


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable here: `load` reports it with its own message
        return {}
    return {p.key: p.value for p in model.metadata_props}
