"""Reading and writing ONNX models: atomic, IR ≤ 10, weights in one external-data file past protobuf's limit.

Also the one float32 widening of half-precision graphs (onnxruntime's CPU provider lacks bf16 kernels for most
ops; every half value is exactly a float32 value, so the widened graph computes the same function in float32).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx

from moetrt.core.artifacts import external_data_name
from moetrt.core.dtypes import PRECISIONS
from moetrt.core.errors import MoetrtError
from moetrt.core.files import check_input_file, staging_dir

#: onnxruntime refuses newer IR versions; IR 10 is the first with function `overload`.
MAX_IR_VERSION = 10
#: Serialised size above which weights go to external data (clear of protobuf's 2 GiB limit).
PROTOBUF_LIMIT = 2**31 - 2**24
_EXTERNAL_THRESHOLD_BYTES = 1024
#: One external-data file holds at most this much; a larger model's weights go to numbered shards (below the
#: 4 GiB single-file limits of FAT32 and of several upload tools, as checkpoints shard their safetensors).
DATA_SHARD_BYTES = 4 * 1024**3


def load_onnx(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Load a model, or raise a one-line MoetrtError that says what is wrong with the file (missing, empty,
    not ONNX, no graph, external weights missing)."""
    path = check_input_file(
        path, "ONNX file", "pass an .onnx file written by `moetrt export` or `moetrt fuse`"
    )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError / OSError / ValueError
        raise MoetrtError(
            f"{path} is not a readable ONNX model ({type(err).__name__})",
            "export it with `moetrt export` or check the file",
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise MoetrtError(f"{path} holds no ONNX graph (no nodes)", "export it with `moetrt export`")
    missing = sorted(
        {
            entry.value
            for init in model.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location" and not (path.parent / entry.value).is_file()
        }
    )
    if missing:
        raise MoetrtError(
            f"{path} keeps its weights in {', '.join(str(path.parent / m) for m in missing)}, which is missing",
            "put the .data file beside the .onnx file it belongs to",
        )
    if load_external_data:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external-data files the ONNX file at `path` names (its `.data` file, or its numbered shards), in the
    order they are first named; [] when its weights are inline or the file cannot be read."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable file names no data files
        return []
    names = dict.fromkeys(
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    )
    return [path.parent / name for name in names]


def weight_bytes(model: Any) -> int:
    """Bytes of the initializers of an onnx_ir.Model (lazy and external tensors are not read)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def needs_external_data(model: Any) -> bool:
    """Whether `model` (an onnx.ModelProto or an onnx_ir.Model) must keep its weights in external data."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize() > PROTOBUF_LIMIT
    return weight_bytes(model) > PROTOBUF_LIMIT


@contextlib.contextmanager
def staged_onnx_path(out_path: str | os.PathLike[str]) -> Iterator[Path]:
    """A path in a hidden directory beside `out_path` to write a model (and its `<name>.data`) to; both move
    into place only when the block succeeds, a stale data file of an earlier, larger model of the same name
    goes, and parents created for it are removed on failure. Messages name `out_path`, not the staging path."""
    out_path = Path(out_path)
    with staging_dir(out_path) as staging:
        staged = staging / out_path.name
        try:
            yield staged
        except MoetrtError as err:
            raise err.naming(str(staged), str(out_path)) from None
        # The staged model's external data (one .data file or numbered shards) moves with it; data files of
        # the model being replaced that the new one does not name go.
        new_data = external_data_files(staged)
        stale = [p for p in external_data_files(out_path) if p.name not in {d.name for d in new_data}]
        try:
            for data in new_data:
                os.replace(data, out_path.parent / data.name)
            for old in stale:
                old.unlink(missing_ok=True)
            os.replace(staged, out_path)
        except OSError as err:
            raise MoetrtError(
                f"cannot write {out_path}: {err.strerror or err}", "check free disk space and permissions"
            ) from None


def write_onnx(model: Any, path: str | os.PathLike[str], external: bool | None = None) -> None:
    """Write `model` (an onnx.ModelProto or an onnx_ir.Model) to `path` as it is, IR capped at 10; weights go to
    `<name>.data` when `external` (default: when the model needs it). Not atomic: write into
    `staged_onnx_path`, or call `save_onnx`."""
    path = Path(path)
    if external is None:
        external = needs_external_data(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    data_name = external_data_name(path.name)
    if isinstance(model, onnx.ModelProto) and not external:
        onnx.save_model(model, str(path))
        return
    import onnx_ir as ir

    if isinstance(model, onnx.ModelProto):
        # onnx's own external-data save rewrites the caller's proto (its tensors turn into references to the
        # written file); onnx-ir writes from a view of it and leaves it as it was.
        model = ir.serde.deserialize_model(model)
    if external:
        # Above one shard's worth, numbered shard files (<stem>-00001-of-0000N...): no single huge file.
        shard = DATA_SHARD_BYTES if weight_bytes(model) > DATA_SHARD_BYTES else None
        ir.save(
            model,
            path,
            external_data=data_name,
            size_threshold_bytes=_EXTERNAL_THRESHOLD_BYTES,
            max_shard_size_bytes=shard,
        )
    else:
        ir.save(model, path)


def write_widened(source: str | os.PathLike[str], path: str | os.PathLike[str], which: str = "bf16") -> None:
    """Write the exact float32 widening of the half-precision model at `source` (`widen_to_fp32`) to `path`,
    with external data when it needs it: how onnxruntime's CPU provider runs a bf16 model it has no kernels
    for."""
    write_onnx(widen_to_fp32(load_onnx(source), which, in_place=True), path)


def save_onnx(model: Any, out_path: str | os.PathLike[str], external: bool | None = None) -> Path | None:
    """Write `model` (an onnx.ModelProto or an onnx_ir.Model) to `out_path` atomically (`staged_onnx_path`);
    returns the first external-data file when the weights went to external data (tensors under 1 KiB stay
    inline, so an external save of small tensors writes none)."""
    out_path = Path(out_path)
    with staged_onnx_path(out_path) as staged:
        write_onnx(model, staged, external)
    data = external_data_files(out_path)
    return data[0] if data else None


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


_HALF_TYPES = {
    "bf16": (onnx.TensorProto.BFLOAT16,),
    "half": (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16),
}


def widen_to_fp32(model: onnx.ModelProto, which: str = "bf16", in_place: bool = False) -> onnx.ModelProto:
    """The same model with every `which` tensor ("bf16", or "half" for fp16 and bf16) as float32: weights,
    constants, Cast targets, graph I/O and value types, subgraphs and function bodies. Exact, since every half
    value is a float32 value. Returns a copy unless `in_place`."""
    from onnx import numpy_helper

    narrow = _HALF_TYPES[which]
    fp32 = onnx.TensorProto.FLOAT
    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy

    def widen_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type in narrow:
            values = numpy_helper.to_array(tensor).astype("float32")
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    def widen_nodes(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i in narrow:
                    attr.i = fp32
                elif attr.type == onnx.AttributeProto.TENSOR:
                    widen_tensor(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    widen_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        widen_graph(sub)

    def widen_graph(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            widen_tensor(tensor)
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in narrow:
                value.type.tensor_type.elem_type = fp32
        widen_nodes(graph.node)

    widen_graph(model.graph)
    for function in model.functions:
        widen_nodes(function.node)
    return model


def model_precision(model: onnx.ModelProto) -> str | None:
    """fp32 / fp16 / bf16: the float type of the first float graph input, else of the first float weight."""
    for value in model.graph.input:
        found = _PRECISION_OF_TYPE.get(value.type.tensor_type.elem_type)
        if found:
            return found
    for init in model.graph.initializer:
        found = _PRECISION_OF_TYPE.get(init.data_type)
        if found:
            return found
    return None


_PRECISION_OF_TYPE = {p.onnx_type: p.name for p in PRECISIONS}
