"""The fusion pipeline: cleanup -> fuse_moe -> pack_weights, on ModelProtos and on files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from moetrt.core.artifacts import META_EXPERT_WEIGHTS, META_FUSED_MOE
from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import MAX_IR_VERSION, load_onnx, save_onnx, set_metadata, weight_bytes
from moetrt.core.progress import heartbeat
from moetrt.op.fused_node import check_fused_model
from moetrt.passes.base import CountedPass, PassStat, UnfusedCandidate, run_pipeline
from moetrt.passes.cleanup import CleanupPass
from moetrt.passes.decompose import count_fused, decompose_ir
from moetrt.passes.fuse_moe import FuseMoEPass
from moetrt.passes.pack_weights import PackMoEWeightsPass
from moetrt.passes.quantize_experts import ExpertQuantization, QuantizeExpertsPass


@dataclass
class FuseResult:
    model: onnx.ModelProto | ir.Model  # an ir.Model from `fuse_file`
    stats: list[PassStat] = field(default_factory=list)
    num_fused: int = 0
    unfused_candidates: list[UnfusedCandidate] = field(default_factory=list)
    num_decomposed: int | None = None  # set by `fuse_file(..., decompose=True)`: fused nodes inlined

    def summary_lines(self, explain: bool = False) -> list[str]:
        """What `moetrt fuse` prints: per-pass counts and time, the total, and with `explain` every miss."""
        lines = [f"  {s.name:<14} {s.count:>5}  {s.seconds * 1000:9.1f} ms" for s in self.stats]
        if self.num_decomposed is not None:
            lines.append(f"{self.num_decomposed} fused MoE nodes inlined back to standard ops")
        elif self.num_fused == 0 and not self.unfused_candidates:
            lines.append("0 MoE blocks: nothing to fuse, the model is unchanged")
        else:
            lines.append(
                f"{self.num_fused} MoE blocks fused, {len(self.unfused_candidates)} unfused candidates"
            )
            if self.num_fused == 0:
                lines.append("the model is unchanged (run with --explain to see why each candidate was left)")
        if explain:
            for c in self.unfused_candidates:
                lines.append(f"  unfused: {c.where}  rule={c.rule}  failed: {c.check}")
        return lines


def default_passes() -> list[CountedPass]:
    return [CleanupPass(), FuseMoEPass(), PackMoEWeightsPass()]


def fuse_ir(model: ir.Model) -> tuple[list[PassStat], int, list[UnfusedCandidate]]:
    """Run the passes on `model` in place: (per-pass stats, blocks fused, candidates left unfused)."""
    stats, unfused = run_pipeline(model, default_passes())
    num_fused = next((s.count for s in stats if s.name == FuseMoEPass.name), 0)
    if num_fused:
        model.ir_version = MAX_IR_VERSION  # function `overload` needs IR 10; onnxruntime refuses newer
        _type_graph_outputs(model)
    return stats, num_fused, unfused


def _type_graph_outputs(model: ir.Model) -> None:
    """A graph output the rewrite now computes (the block's output reshaped back) has no element type yet;
    TensorRT's parser refuses an untyped output. Its type is its producer's first input's (views, the fused
    node: both keep the dtype), or a Cast's target."""
    for output in model.graph.outputs:
        value = output
        while output.dtype is None and (node := value.producer()) is not None:
            if node.op_type == "Cast" and node.domain == "":
                output.dtype = ir.DataType(node.attributes["to"].value)
                break
            if not node.inputs or node.inputs[0] is None:
                break
            value = node.inputs[0]
            if value.dtype is not None:
                output.dtype = value.dtype


def fuse_model(model: onnx.ModelProto, explain: bool = False) -> FuseResult:
    """Fuse every MoE block of `model` into one `moetrt::MoE` node (the input proto is not modified).

    `explain` only affects what `summary_lines` prints; unfused candidates are always collected.
    """
    del explain
    ir_model = ir.serde.deserialize_model(model)
    stats, num_fused, unfused = fuse_ir(ir_model)
    if num_fused:
        out = ir.serde.serialize_model(ir_model)
    else:
        # Nothing fused: hand back the input graph as it was (the cleanup alone is not worth a changed file).
        out = onnx.ModelProto()
        out.CopyFrom(model)
    set_metadata(out, META_FUSED_MOE, str(count_fused(out)))
    return FuseResult(out, stats, num_fused, unfused)


def fuse_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    explain: bool = False,
    decompose: bool = False,
    progress: Callable[[str], None] | None = None,
    quantize: ExpertQuantization | None = None,
) -> FuseResult:
    """Fuse IN into OUT (or, with `decompose`, inline IN's fused nodes back to standard ops). `quantize`
    then stores every fused node's routed experts in that format (`QuantizeExpertsPass`)."""
    say = progress or (lambda _message: None)
    if Path(in_path).resolve() == Path(out_path).resolve():
        raise MoetrtError("output path equals the input path", "write the fused model to a new file with -o")
    if Path(out_path).is_dir():
        raise MoetrtError(f"output {out_path} is a directory", "give a file name ending in .onnx")
    say(f"reading {in_path}")
    header = load_onnx(in_path, load_external_data=False)  # a readable graph, its external data present
    check_fused_model(header)  # fused nodes already in IN must be whole (attributes, inputs, function body)
    external = _has_external_data(header)
    del header
    if decompose:
        model = ir.load(in_path)
        start = time.perf_counter()
        count = decompose_ir(model)
        model.metadata_props[META_FUSED_MOE] = "0"
        stats = [PassStat("decompose", count, time.perf_counter() - start)]
        say(f"writing {out_path}")
        save_onnx(model, out_path, external=external or None)  # None: when the weights need it
        return FuseResult(model, stats, 0, [], num_decomposed=count)
    # onnx-ir end to end: weights in external data stay on disk (memory-mapped), packed weights are computed
    # one at a time while the output is written, so fusing a model of any size holds about one weight.
    model = ir.load(in_path)
    say(f"fusing MoE blocks ({len(model.graph)} nodes)")
    with heartbeat(say, "fusing"):
        stats, num_fused, unfused = fuse_ir(model)
    if not num_fused:
        model = ir.load(in_path)  # nothing fused: the input graph as it was
    if quantize is not None:
        if not count_fused(model):
            raise MoetrtError(f"{in_path} has no fused MoE block to quantize", "fuse a model with MoE blocks")
        stats.append(_quantize(model, quantize))
    model.metadata_props[META_FUSED_MOE] = str(count_fused(model))
    say(f"writing {out_path} ({weight_bytes(model) / 1e6:.1f} MB of weights)")
    with heartbeat(say, "writing"):
        save_onnx(model, out_path, external=external or None)  # None: when the weights need it
    return FuseResult(model, stats, num_fused, unfused)


def quantize_file(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], quantize: ExpertQuantization
) -> PassStat:
    """Store the experts of IN's fused nodes quantized, into OUT (weights streamed as `fuse_file` does)."""
    header = load_onnx(in_path, load_external_data=False)
    external = _has_external_data(header)
    del header
    model = ir.load(in_path)
    stat = _quantize(model, quantize)
    if not stat.count:
        raise MoetrtError(
            f"{in_path} has no fused MoE block with native experts to quantize", "fuse it first"
        )
    save_onnx(model, out_path, external=external or None)
    return stat


def _quantize(model: ir.Model, quantize: ExpertQuantization) -> PassStat:
    """Run the quantize pass on `model` in place and record the format in its metadata."""
    quantizer = QuantizeExpertsPass(
        quantize.weight_format, quantize.block, quantize.zero_point, quantize.activation_format
    )
    start = time.perf_counter()
    result = quantizer(model)
    model.metadata_props[META_EXPERT_WEIGHTS] = quantize.weight_format
    return PassStat(quantizer.name, result.count, time.perf_counter() - start)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
