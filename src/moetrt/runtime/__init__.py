"""Run what `moetrt build` wrote: `load(path)` → an Engine (.plan) or a Session (.onnx), same call signature.

Submodules (verify, build helpers, manifest) are imported explicitly; importing this package stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetrt.errors import MoetrtError

if TYPE_CHECKING:
    import torch

    from moetrt.runtime.engine import Engine
    from moetrt.runtime.session import Session
    from moetrt.runtime.verify import VerifyReport


def resolve_artifact(path: str | Path, backend: str | None = None) -> Path:
    """The file `load` would run: `path` itself, or a build directory's model.plan (model.onnx when it has no
    plan or `backend="onnxruntime"`)."""
    path = Path(path)
    if path.is_dir():
        plan, onnx_path = path / "model.plan", path / "model.onnx"
        if backend != "onnxruntime" and plan.is_file():
            return plan
        if onnx_path.is_file():
            return onnx_path
        raise MoetrtError(
            f"{path} holds neither model.plan nor model.onnx",
            "point at a directory written by `moetrt build`, or at a file",
        )
    if not path.exists():
        raise MoetrtError(f"{path} does not exist", "pass a .plan, an .onnx, or a `moetrt build` directory")
    if path.suffix == ".plan" and backend == "onnxruntime":
        portable = path.parent / "model.onnx"
        if not portable.is_file():
            raise MoetrtError(
                f"no model.onnx beside {path} for the onnxruntime backend", "pass the .onnx file itself"
            )
        return portable
    return path


def load(path: str | Path, backend: str | None = None) -> Engine | Session:
    """Load `path` for inference: `out = load(p)({"hidden_states": x})` returns {output name: tensor}.

    - `.plan`: a TensorRT / TensorRT-RTX Engine (checked against the manifest.json beside it first);
    - `.onnx`: an onnxruntime Session (CUDA EP with onnxruntime-gpu and a GPU, CPU otherwise);
    - a `moetrt build` directory: its model.plan, or its model.onnx when no engine was built or
      `backend="onnxruntime"`.
    """
    path = resolve_artifact(path, backend)
    if path.suffix == ".plan" and backend != "onnxruntime":
        from moetrt.runtime.engine import Engine

        return Engine(path)
    if path.suffix == ".onnx":
        from moetrt.runtime.session import Session

        return Session(path)
    raise MoetrtError(
        f"cannot tell how to run {path.name}", "pass a .plan, an .onnx, or a `moetrt build` directory"
    )


def feed_shapes(
    input_specs: Mapping[str, tuple[Any, Sequence[Any]]],
    batch: int = 1,
    seq: int = 16,
    tokens: int | None = None,
) -> dict[str, list[int]]:
    """Concrete input shapes: an input with two dynamic dims gets (batch, seq), one with a single dynamic dim
    gets `tokens` (default batch * seq)."""
    shapes = {}
    single_dynamic = False
    for name, (_dtype, dims) in input_specs.items():
        dynamic = [axis for axis, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        if len(dynamic) > 2:
            raise MoetrtError(
                f"input {name} has {len(dynamic)} dynamic dims {list(dims)}", "export with batch and seq only"
            )
        sizes = (
            {dynamic[-1]: tokens or batch * seq} if len(dynamic) == 1 else dict(zip(dynamic, (batch, seq)))
        )
        shapes[name] = [sizes.get(axis, d) for axis, d in enumerate(dims)]
        single_dynamic = single_dynamic or len(dynamic) == 1
    if tokens is not None and not single_dynamic:
        # Silently ignoring --tokens would time another shape than the one asked for.
        raise MoetrtError(
            "--tokens sets the token count of [T, H] inputs; this model's inputs take a batch and a sequence",
            "use --batch and --seq instead",
        )
    return shapes


def check_run_request(
    path: str | Path, backend: str | None = None, batch: int = 1, seq: int = 16, tokens: int | None = None
) -> None:
    """For an engine: refuse a batch / token count outside its profile from the manifest alone, before a GPU
    or TensorRT is needed (ONNX models have no profile)."""
    from moetrt.runtime.manifest import MANIFEST_NAME, read_manifest
    from moetrt.runtime.trt_build import check_in_profile

    resolved = resolve_artifact(path, backend)
    manifest_path = resolved.parent / MANIFEST_NAME
    if resolved.suffix != ".plan" or backend == "onnxruntime" or not manifest_path.is_file():
        return
    manifest = read_manifest(manifest_path)
    specs = {entry["name"]: (None, entry["shape"]) for entry in manifest["io"]["inputs"]}
    check_in_profile(manifest["profiles"], feed_shapes(specs, batch, seq, tokens))


def random_feeds(
    runner: Engine | Session,
    batch: int = 1,
    seq: int = 16,
    tokens: int | None = None,
    seed: int = 0,
    int_high: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Random inputs (never zeros) for every input of `runner`: an input with two dynamic dims gets
    (batch, seq), one with a single dynamic dim gets `tokens` (default batch * seq)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if getattr(runner, "backend", "") != "onnxruntime" else runner.device
    shapes = feed_shapes(runner.input_specs, batch, seq, tokens)
    feeds = {}
    for name, (dtype, _dims) in runner.input_specs.items():
        shape = shapes[name]
        if dtype is not None and dtype.is_floating_point:
            value = torch.randn(shape, generator=gen).to(dtype)
        else:
            high = (int_high or {}).get(name, 100)
            value = torch.randint(0, high, shape, generator=gen).to(dtype or torch.int64)
        feeds[name] = value.to(device)
    return feeds


def vocab_sizes(onnx_path: str | Path) -> dict[str, int]:
    """For integer inputs that index an embedding table (Gather on an initializer): the table's row count."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    rows = {init.name: init.dims[0] for init in model.graph.initializer if init.dims}
    graph_inputs = {v.name for v in model.graph.input}
    return {
        node.input[1]: rows[node.input[0]]
        for node in model.graph.node
        if node.op_type == "Gather" and node.input[0] in rows and node.input[1] in graph_inputs
    }


def run_timed(
    runner: Engine | Session,
    batch: int = 1,
    seq: int = 16,
    tokens: int | None = None,
    iters: int = 10,
    seed: int = 0,
    cuda_graph: bool = False,
) -> list[str]:
    """Run on random inputs: one warm-up, `iters` timed runs; returns printable lines (outputs, timing)."""
    import statistics
    import time

    import torch

    onnx_path = runner.path if runner.path.suffix == ".onnx" else runner.path.parent / "model.onnx"
    highs = vocab_sizes(onnx_path) if onnx_path.is_file() else {}
    feeds = random_feeds(runner, batch=batch, seq=seq, tokens=tokens, seed=seed, int_high=highs)
    on_gpu = any(t.is_cuda for t in feeds.values())
    call = runner
    if cuda_graph:
        if runner.backend == "onnxruntime":
            raise MoetrtError("--cuda-graph needs a TensorRT engine", "run a .plan, or drop --cuda-graph")
        graph = runner.capture_graph(feeds)  # type: ignore[union-attr]

        def call(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return graph(inputs)

    outputs = call(feeds)  # warm-up (and lazy initialisation)
    times = []
    for _ in range(iters):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = call(feeds)
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    lines = [f"{runner.backend}: {runner.path}"]
    lines += [
        f"input  {name}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in feeds.items()
    ]
    for name, out in outputs.items():
        values = out.float()
        finite = bool(torch.isfinite(values).all())
        lines.append(
            f"output {name}: {tuple(out.shape)} {str(out.dtype).removeprefix('torch.')} mean {values.mean():.4g} "
            f"std {values.std():.4g} absmax {values.abs().max():.4g}{'' if finite else ' NON-FINITE'}"
        )
    lines.append(
        f"time: median {statistics.median(times) * 1e3:.3f} ms, min {min(times) * 1e3:.3f} ms "
        f"over {iters} runs{' (CUDA graph replay)' if cuda_graph else ''}"
    )
    return lines


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
    from moetrt.export.onnx_export import META_DTYPE, META_EXAMPLE_SHAPE, META_LONG_SEQ, META_SOURCE
    from moetrt.runtime.manifest import MANIFEST_NAME, read_manifest
    from moetrt.runtime.trt_build import check_in_profile
    from moetrt.runtime.verify import TOLERANCES, VerifyReport, VerifyRow, default_shapes

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    path = resolve_artifact(artifact, backend)
    onnx_path = path if path.suffix == ".onnx" else path.parent / "model.onnx"
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
        shapes = default_shapes(example_shape, int(meta.get(META_LONG_SEQ, loaded.long_seq)))
    feeds_per_shape = [loaded.make_inputs(b, s, seed + i) for i, (b, s) in enumerate(shapes)]
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
    output_names = list(runner.output_names)[: len(loaded.output_names)]
    report = VerifyReport(artifact=str(artifact), reference=reference, dtype=dtype)
    tolerance = tolerance if tolerance is not None else TOLERANCES[dtype]

    def feed(name: str, tensor: torch.Tensor) -> torch.Tensor:
        want = runner.input_specs[name][0]
        if tensor.is_floating_point() and want is not None and want.is_floating_point:
            tensor = tensor.to(want)
        return tensor.to(device)

    say(f"running {runner.backend} and PyTorch at shapes {', '.join(f'{b}x{s}' for b, s in shapes)}")
    for (batch, seq), inputs in zip(shapes, feeds_per_shape):
        outputs = runner({n: feed(n, t) for n, t in zip(loaded.input_names, inputs)})
        with torch.inference_mode(), _quiet_transformers():
            expected = reference_module(*(t.float() if t.is_floating_point() else t for t in inputs))
        expected = (expected,) if isinstance(expected, torch.Tensor) else tuple(expected)
        for name, ref in zip(output_names, expected):
            report.rows.append(_compare_row(outputs[name], ref, (batch, seq), name, tolerance, VerifyRow))
    report.seconds = time.perf_counter() - start
    return report


def _compare_row(
    out: torch.Tensor, ref: torch.Tensor, shape: tuple[int, int], name: str, tolerance: float, row: Any
) -> Any:
    """One VerifyRow: relative norm error ‖out − ref‖ / ‖ref‖ in float64 (non-finite or misshapen: fail)."""
    if tuple(out.shape) != tuple(ref.shape):
        note = f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        return row(shape, name, float("inf"), float("inf"), tolerance, False, note)
    out64, ref64 = out.detach().cpu().double(), ref.detach().cpu().double()
    if not bool(out64.isfinite().all()):
        return row(shape, name, float("inf"), float("inf"), tolerance, False, "non-finite output")
    diff = out64 - ref64
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ref_norm = float(ref64.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else float("inf"))
    return row(shape, name, max_abs, rel, tolerance, rel <= tolerance)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' "falling back to the PyTorch implementation" notices are about speed, not parity."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable here: `load` reports it with its own message
        return {}
    return {p.key: p.value for p in model.metadata_props}


__all__ = [
    "check_run_request",
    "feed_shapes",
    "load",
    "random_feeds",
    "resolve_artifact",
    "run_timed",
    "verify_loaded",
    "vocab_sizes",
]
