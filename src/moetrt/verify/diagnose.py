"""Why a verify row failed: routing flips at near-ties, the first layer out of tolerance, the dtype itself.

At a failing shape the probed copy of the artifact (`verify.probes`) and the PyTorch reference run again on the
same inputs, the reference with hooks on its modules:

- Routing: at each fused MoE block the reference's own choice of experts is computed from its input with the
  op's router (`op.reference`, float64) and set against the experts onnxruntime selected. A token whose sets
  differ is a flip. Its margin is how far the artifact's choice stands behind the reference's k-th choice in
  the reference's selection scores; its perturbation is how far the artifact's own input (rounded to its dtype
  by the layers before) moved the gap between those experts, plus float32's noise. A flip with
  margin <= perturbation is a near-tie the artifact's rounding decides: the reference is routed like the artifact for that token (its block output recomputed by
  the op's oracle with the artifact's experts), and the outputs are judged against that reference. A flip with
  a larger margin is a real disagreement and is never re-routed.
- Layers (`per_layer`): the output of every attention, linear-attention and MoE/MLP module of every decoder
  layer against the reference's, in the order they run; the first beyond tolerance is named.
- The dtype: for a row still failing, PyTorch itself runs in the artifact's dtype; when that misses the float32
  reference by as much, the error is the dtype's arithmetic, not the export.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrt.core.dtypes import precision
from moetrt.core.tolerances import relative_error
from moetrt.op.reference import choice_scores, moe_reference, route, router_logits
from moetrt.verify.compare import Shape, VerifyReport, VerifyRow, compare_outputs
from moetrt.verify.compare import shape_text as format_shape
from moetrt.verify.probes import FusedBlockProbe, ProbedModel, stored_tensor, write_probed_model

#: Scores computed in float32 by the artifact agree with the float64 recomputation only to this relative
#: amount, so a margin below it is a tie whatever the inputs.
FLOAT32_SCORE_NOISE = 1e-6


@dataclass(frozen=True)
class RoutingFlip:
    shape: Shape
    module: str
    token: tuple[int, int]  # (batch index, position)
    reference_ids: tuple[int, ...]
    artifact_ids: tuple[int, ...]
    margin: float
    perturbation: float  # how far the artifact's own input moved the gap between the experts in question

    @property
    def near_tie(self) -> bool:
        return self.margin <= self.perturbation

    def describe(self) -> str:
        kind = "near-tie" if self.near_tie else "NOT a near-tie"
        only_ref = sorted(set(self.reference_ids) - set(self.artifact_ids))
        only_art = sorted(set(self.artifact_ids) - set(self.reference_ids))
        return (
            f"{self.module or '(root)'} token (batch {self.token[0]}, position {self.token[1]}): reference "
            f"experts {only_ref}, artifact {only_art}; margin {self.margin:.2e}, the artifact's input moved "
            f"the gap by {self.perturbation:.2e} ({kind})"
        )


@dataclass(frozen=True)
class LayerError:
    shape: Shape
    module: str
    kind: str
    rel_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tolerance


@dataclass
class Diagnosis:
    shape: Shape
    flips: list[RoutingFlip] = field(default_factory=list)
    #: the artifact's outputs against the reference routed like it (set when near-tie flips were re-routed)
    rerouted_rows: list[VerifyRow] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    #: relative error of PyTorch run in the artifact's dtype against the float32 reference, per output
    torch_in_dtype_error: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def first_bad_layer(self) -> LayerError | None:
        return next((layer for layer in self.layers if not layer.passed), None)


def layer_modules(root: nn.Module) -> list[tuple[str, str]]:
    """(module path, kind) of every sub-layer worth naming: the non-norm children of each decoder layer
    (the items of every `layers` ModuleList), or the root's children for a model without one."""
    layers = [
        (f"{path}.{index}" if path else str(index), child)
        for path, module in root.named_modules()
        if isinstance(module, nn.ModuleList) and path.split(".")[-1] == "layers"
        for index, child in enumerate(module)
    ]
    parents = layers or [("", root)]
    found = []
    for parent_path, parent in parents:
        for name, child in parent.named_children():
            if "norm" in type(child).__name__.lower() or not any(True for _ in child.parameters()):
                continue
            found.append((f"{parent_path}.{name}" if parent_path else name, _kind(child)))
    return found


def _kind(module: nn.Module) -> str:
    name = type(module).__name__
    lowered = name.lower()
    if any(word in lowered for word in ("deltanet", "linearattention", "mamba", "ssm")):
        return f"linear attention ({name})"
    if "attention" in lowered or "attn" in lowered:
        return f"attention ({name})"
    if "moe" in lowered or "sparse" in lowered or hasattr(module, "experts"):
        return f"MoE block ({name})"
    return name


def diagnose(
    onnx_path: Path,
    module: nn.Module,
    input_names: Sequence[str],
    output_names: Sequence[str],
    cases: Sequence[tuple[Shape, dict[str, np.ndarray]]],
    dtype: str,
    tolerance: float,
    per_layer: bool,
    failing: set[Shape] | None = None,
) -> list[Diagnosis]:
    """Diagnose each (shape, feed) case; `module` is the reference (run in float32 here). The dtype check runs
    only for `failing` shapes (default: every case) whose failure the routing does not explain."""
    import onnxruntime as ort

    reference = module.float().eval()
    layers = layer_modules(reference) if per_layer else []
    with tempfile.TemporaryDirectory(prefix="moetrt-diagnose-") as tmp:
        probed = write_probed_model(onnx_path, Path(tmp), [path for path, _ in layers])
        session = ort.InferenceSession(str(probed.path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        weights = _BlockWeights(onnx_path)
        results = []
        for shape, feed in cases:
            arrays = dict(zip(names, session.run(names, feed)))
            diagnosis = Diagnosis(shape)
            tensors = [_tensor(feed[name]) for name in input_names]
            with (
                _hooks(reference, probed, layers, arrays, weights, diagnosis, tolerance),
                torch.inference_mode(),
            ):
                outs = _as_tuple(reference(*tensors))
            if diagnosis.flips and any(flip.near_tie for flip in diagnosis.flips):
                diagnosis.rerouted_rows = [
                    compare_outputs(arrays[name], ref.float().numpy(), shape, name, tolerance)
                    for name, ref in zip(output_names, outs)
                ]
            explained = bool(diagnosis.rerouted_rows) and all(r.passed for r in diagnosis.rerouted_rows)
            if (failing is None or shape in failing) and not explained and dtype != "fp32":
                diagnosis.torch_in_dtype_error = _torch_in_dtype(
                    reference, tensors, output_names, outs, dtype
                )
            results.append(diagnosis)
    return results


class _BlockWeights:
    """The fused blocks' weights, read lazily from the artifact (memory-mapped external data)."""

    def __init__(self, onnx_path: Path) -> None:
        import onnx_ir as ir

        self._graph = ir.load(str(onnx_path)).graph

    def get(self, name: str) -> torch.Tensor | None:
        return stored_tensor(self._graph, name)


@contextlib.contextmanager
def _hooks(
    reference: nn.Module,
    probed: ProbedModel,
    layers: list[tuple[str, str]],
    arrays: dict[str, np.ndarray],
    weights: _BlockWeights,
    diagnosis: Diagnosis,
    tolerance: float,
) -> Iterator[None]:
    handles = []
    if not probed.fused_blocks:
        diagnosis.notes.append(
            "routing not compared: the file has no fused moetrt::MoE node (`moetrt fuse` it to compare routing)"
        )
    blocks = {block.module: block for block in probed.fused_blocks if block.module is not None}
    if len(blocks) < len(probed.fused_blocks):
        diagnosis.notes.append(
            "fused nodes without module scopes (fused by an older moetrt): routing not compared"
        )
    for block_path, block in blocks.items():
        target = _submodule(reference, block_path)
        if target is None:
            diagnosis.notes.append(f"the reference has no module {block_path}: its routing was not compared")
            continue
        handles.append(
            target.register_forward_hook(_RoutingHook(block, arrays, weights, diagnosis), with_kwargs=True)
        )
    for layer_path, kind in layers:
        target = _submodule(reference, layer_path)
        if target is None:
            continue
        handles.append(
            target.register_forward_hook(
                _LayerHook(
                    layer_path, kind, probed.module_outputs.get(layer_path, []), arrays, diagnosis, tolerance
                )
            )
        )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The exporter's scopes are module paths from the exported root, which is the reference module."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class _RoutingHook:
    """At a fused block of the reference: compare its routing with the artifact's; re-route near-ties."""

    def __init__(
        self,
        block: FusedBlockProbe,
        arrays: dict[str, np.ndarray],
        weights: _BlockWeights,
        diagnosis: Diagnosis,
    ) -> None:
        self.block, self.arrays, self.weights, self.diagnosis = block, arrays, weights, diagnosis

    def _input(self, name: str) -> torch.Tensor | None:
        graph_name = self.block.inputs.get(name)
        return None if graph_name is None else self.weights.get(graph_name)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else next(iter(kwargs.values()))
        attrs = self.block.attrs
        batch_shape = hidden.shape[:-1]
        x_ref = hidden.reshape(-1, attrs.hidden_size).double()
        x_art = torch.from_numpy(np.asarray(self.arrays[self.block.hidden_output], dtype=np.float64))
        art_ids = torch.from_numpy(self.arrays[self.block.ids_output]).long()
        router = self._input("router_weight")
        if router is None or x_art.shape != x_ref.shape:
            self.diagnosis.notes.append(
                f"{self.block.module}: routing not compared (router weight not stored)"
            )
            return None
        bias, correction = self._input("router_bias"), self._input("score_correction_bias")
        router, bias = router.double(), None if bias is None else bias.double()
        correction = None if correction is None else correction.double()
        logits_ref = router_logits(x_ref, router, bias)
        choice_ref = choice_scores(logits_ref, attrs, correction)
        choice_art = choice_scores(router_logits(x_art, router, bias), attrs, correction)
        ref_ids = route(logits_ref, attrs, correction)[1]
        forced: list[int] = []
        for token in range(x_ref.shape[0]):
            ref_set, art_set = set(ref_ids[token].tolist()), set(art_ids[token].tolist())
            if ref_set == art_set:
                continue
            flip = _flip(self, token, batch_shape, choice_ref[token], choice_art[token], ref_set, art_set)
            self.diagnosis.flips.append(flip)
            if flip.near_tie:
                forced.append(token)
        if not forced:
            return None
        return _with_rows_rerouted(self, output, x_ref, art_ids, forced)


def _flip(
    hook: _RoutingHook,
    token: int,
    batch_shape: torch.Size,
    choice_ref: torch.Tensor,
    choice_art: torch.Tensor,
    ref_set: set[int],
    art_set: set[int],
) -> RoutingFlip:
    only_ref, only_art = sorted(ref_set - art_set), sorted(art_set - ref_set)
    kth = min(float(choice_ref[e]) for e in ref_set)
    margin = max(0.0, kth - min(float(choice_ref[e]) for e in only_art))
    # How far the artifact's input moved the gap between an expert it chose and one the reference chose:
    # a flip whose margin is within that is decided by the input's rounding.
    gap_ref = choice_ref[only_art][:, None] - choice_ref[only_ref][None, :]
    gap_art = choice_art[only_art][:, None] - choice_art[only_ref][None, :]
    scale = float(choice_ref[only_art + only_ref].abs().max())
    perturbation = float((gap_art - gap_ref).abs().max()) + FLOAT32_SCORE_NOISE * scale
    position = np.unravel_index(token, tuple(batch_shape)) if len(batch_shape) > 1 else (0, token)
    return RoutingFlip(
        shape=hook.diagnosis.shape,
        module=hook.block.module,
        token=(int(position[0]), int(position[-1])),
        reference_ids=tuple(sorted(ref_set)),
        artifact_ids=tuple(sorted(art_set)),
        margin=margin,
        perturbation=perturbation,
    )


def _with_rows_rerouted(
    hook: _RoutingHook, output: Any, x_ref: torch.Tensor, art_ids: torch.Tensor, forced: list[int]
) -> Any:
    attrs = hook.block.attrs
    rows = torch.tensor(forced)
    inputs: dict[str, torch.Tensor] = {"hidden_states": x_ref[rows].float()}
    for name in attrs.present_inputs()[1:]:
        tensor = hook._input(name)
        if tensor is None:
            hook.diagnosis.notes.append(f"{hook.block.module}: {name} not stored, near-ties not re-routed")
            return None
        inputs[name] = tensor
    rerouted = moe_reference(inputs, attrs, ids=art_ids[rows])["output"]
    first = output[0] if isinstance(output, tuple | list) else output
    flat = first.reshape(-1, attrs.hidden_size).clone()
    flat[rows] = rerouted.to(flat.dtype)
    new_first = flat.reshape(first.shape)
    if isinstance(output, tuple | list):
        return type(output)([new_first, *output[1:]])
    return new_first


class _LayerHook:
    def __init__(
        self,
        path: str,
        kind: str,
        candidates: list[str],
        arrays: dict[str, np.ndarray],
        diagnosis: Diagnosis,
        tolerance: float,
    ) -> None:
        self.path, self.kind, self.candidates, self.arrays = path, kind, candidates, arrays
        self.diagnosis, self.tolerance = diagnosis, tolerance

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        ref = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(ref, torch.Tensor):
            return
        same_shape = [name for name in self.candidates if tuple(self.arrays[name].shape) == tuple(ref.shape)]
        if not same_shape:
            self.diagnosis.notes.append(f"{self.path}: no value of the artifact matches its output")
            return
        art = np.asarray(self.arrays[same_shape[-1]], dtype=np.float64)
        rel = relative_error(art, ref.detach().double().numpy())
        self.diagnosis.layers.append(
            LayerError(self.diagnosis.shape, self.path, self.kind, rel, self.tolerance)
        )


def _torch_in_dtype(
    reference: nn.Module,
    tensors: list[torch.Tensor],
    output_names: Sequence[str],
    outs: tuple[torch.Tensor, ...],
    dtype: str,
) -> dict[str, float]:
    """Relative error of PyTorch in `dtype` against the float32 reference (`outs`), per output; empty when
    PyTorch cannot run the model in that dtype on the CPU."""
    torch_dtype = precision(dtype).torch
    try:
        reference.to(torch_dtype)
        with torch.inference_mode():
            low = _as_tuple(reference(*[t.to(torch_dtype) if t.is_floating_point() else t for t in tensors]))
    except (RuntimeError, NotImplementedError):
        return {}
    finally:
        reference.float()
    return {
        name: relative_error(lo.float().numpy(), ref.float().numpy())
        for name, lo, ref in zip(output_names, low, outs)
    }


def _tensor(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() if tensor.is_floating_point() else tensor


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(t for t in out if isinstance(t, torch.Tensor))


#: Flips listed per shape before the rest are counted.
MAX_FLIPS_LISTED = 8


def apply_diagnoses(report: VerifyReport, diagnoses: Sequence[Diagnosis]) -> None:
    """Fold what the diagnoses found into `report`: rows of a shape whose only differences are near-tie
    routing flips are judged against the reference routed like the artifact; findings explain the rest."""
    for diagnosis in diagnoses:
        shape_text = format_shape(diagnosis.shape)
        flips = diagnosis.flips
        if flips:
            near = sum(flip.near_tie for flip in flips)
            report.findings.append(
                f"routing at {shape_text}: {len(flips)} token(s) routed differently from the reference, "
                f"{near} at near-ties (margin within what the artifact's rounding moved the scores)"
            )
            report.findings += [f"  {flip.describe()}" for flip in flips[:MAX_FLIPS_LISTED]]
            if len(flips) > MAX_FLIPS_LISTED:
                report.findings.append(f"  ... and {len(flips) - MAX_FLIPS_LISTED} more")
        if diagnosis.rerouted_rows:
            rerouted = {row.output: row for row in diagnosis.rerouted_rows}
            for index, row in enumerate(report.rows):
                again = rerouted.get(row.output)
                if row.shape != diagnosis.shape or again is None:
                    continue
                note = f"routed like the artifact; plain reference: {row.rel_err:.2e}"
                report.rows[index] = replace(again, note=note)
        for layer in diagnosis.layers:
            verdict = "PASS" if layer.passed else "FAIL"
            report.findings.append(
                f"layer {shape_text} {layer.module} [{layer.kind}]: rel err {layer.rel_err:.2e} {verdict}"
            )
        if diagnosis.layers:
            bad = diagnosis.first_bad_layer
            report.findings.append(
                f"first layer out of tolerance at {shape_text}: {bad.module} [{bad.kind}], rel err "
                f"{bad.rel_err:.2e} (tolerance {bad.tolerance:.0e})"
                if bad
                else f"every layer output within tolerance at {shape_text}"
            )
        failing = [row for row in report.rows if row.shape == diagnosis.shape and not row.passed]
        for row in failing:
            own = diagnosis.torch_in_dtype_error.get(row.output)
            if own is None:
                continue
            if own > row.tolerance:
                report.findings.append(
                    f"dtype at {shape_text}: PyTorch itself in {report.dtype} misses its float32 run by rel err "
                    f"{own:.2e} on {row.output} (tolerance {row.tolerance:.0e}): the error is {report.dtype}'s "
                    "arithmetic in this model, not the export; verify an fp32 export to check the export"
                )
            else:
                report.findings.append(
                    f"dtype at {shape_text}: PyTorch in {report.dtype} stays within tolerance (rel err "
                    f"{own:.2e} on {row.output}), so the artifact adds the error; `--per-layer` names the "
                    "first layer where it appears"
                )
        report.findings += diagnosis.notes
