"""Run a loaded artifact on random inputs: the shapes a request means, the profile check, timed runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetrt.core.artifacts import MANIFEST_NAME, ONNX_NAME
from moetrt.core.errors import MoetrtError
from moetrt.runtime.loading import resolve_artifact

if TYPE_CHECKING:
    import torch

    from moetrt.runtime.engine import Engine
    from moetrt.runtime.session import Session


def feed_shapes(
    input_specs: Mapping[str, tuple[Any, Sequence[Any]]],
    batch: int = 1,
    seq: int = 16,
    tokens: int | None = None,
    past: int = 0,
) -> dict[str, list[int]]:
    """Concrete input shapes: an input with two dynamic dims gets (batch, seq), one with a single dynamic dim
    gets `tokens` (default batch * seq). A cached decoder's dims go by name: `past` earlier tokens, the
    mask's `total` = past + seq."""
    from moetrt.trt.profiles import BATCH_DIM, PAST_DIM, SEQ_DIM, TOTAL_DIM, is_decoder

    if is_decoder([(name, dims) for name, (_dtype, dims) in input_specs.items()]):
        sizes_by_name = {BATCH_DIM: batch, SEQ_DIM: seq, PAST_DIM: past, TOTAL_DIM: past + seq}
        return {
            name: [d if isinstance(d, int) and d > 0 else sizes_by_name.get(d, batch) for d in dims]
            for name, (_dtype, dims) in input_specs.items()
        }
    if past:
        raise MoetrtError("--past applies to cached decoders; this model keeps no state", "leave out --past")
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
    path: str | Path,
    backend: str | None = None,
    batch: int = 1,
    seq: int = 16,
    tokens: int | None = None,
    past: int = 0,
) -> None:
    """For an engine: refuse a batch / token count outside its profile from the manifest alone, before a GPU
    or TensorRT is needed (ONNX models have no profile)."""
    from moetrt.runtime.manifest import read_manifest
    from moetrt.trt.profiles import check_in_profile

    resolved = resolve_artifact(path, backend)
    manifest_path = resolved.parent / MANIFEST_NAME
    if resolved.suffix != ".plan" or backend == "onnxruntime" or not manifest_path.is_file():
        return
    manifest = read_manifest(manifest_path)
    specs = {entry["name"]: (None, entry["shape"]) for entry in manifest["io"]["inputs"]}
    check_in_profile(manifest["profiles"], feed_shapes(specs, batch, seq, tokens, past))


def random_feeds(
    runner: Engine | Session,
    batch: int = 1,
    seq: int = 16,
    tokens: int | None = None,
    seed: int = 0,
    int_high: dict[str, int] | None = None,
    past: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs (never zeros) for every input of `runner`: an input with two dynamic dims gets
    (batch, seq), one with a single dynamic dim gets `tokens` (default batch * seq). A cached decoder gets
    `seq` random tokens after `past` earlier ones: an all-ones mask, their positions, random state."""
    import torch

    from moetrt.core.artifacts import ATTENTION_MASK, POSITION_IDS

    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if getattr(runner, "backend", "") != "onnxruntime" else runner.device
    shapes = feed_shapes(runner.input_specs, batch, seq, tokens, past)
    decoder = getattr(runner, "state", None) is not None
    feeds = {}
    for name, (dtype, _dims) in runner.input_specs.items():
        shape = shapes[name]
        if decoder and name == ATTENTION_MASK:
            value = torch.ones(shape, dtype=torch.int64)
        elif decoder and name == POSITION_IDS:
            value = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        elif dtype is not None and dtype.is_floating_point:
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
    past: int = 0,
) -> list[str]:
    """Run on random inputs: one warm-up, `iters` timed runs; returns printable lines (outputs, timing)."""
    import statistics
    import time

    import torch

    onnx_path = runner.path if runner.path.suffix == ".onnx" else runner.path.parent / ONNX_NAME
    highs = vocab_sizes(onnx_path) if onnx_path.is_file() else {}
    feeds = random_feeds(runner, batch=batch, seq=seq, tokens=tokens, seed=seed, int_high=highs, past=past)
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
