"""ONNX I/O: atomic saves with external data past the limit, IR capped at 10, exact float32 widening."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from moetrt.core import onnx_io
from moetrt.core.errors import MoetrtError


def _bf16_model(size: int = 1024) -> onnx.ModelProto:
    """x (bf16) -> Cast to bf16 -> times a bf16 initializer, IR 11. 1024 values are 2 KiB: over the size from
    which tensors go to external data; 4 values stay inline."""
    values = ([1.5, 2.0, -0.25, 3.0] * 256)[:size]
    weight = numpy_helper.from_array(np.array(values, dtype=ml_dtypes.bfloat16), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["c"], to=onnx.TensorProto.BFLOAT16),
            helper.make_node("Mul", ["c", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [2, size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [2, size])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=11)


def test_save_caps_ir_and_writes_external_data_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _bf16_model()
    small = tmp_path / "small.onnx"
    assert onnx_io.save_onnx(model, small) is None and onnx.load(str(small)).ir_version == 10
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1)  # stands in for 2 GiB
    data = onnx_io.save_onnx(model, small)
    assert data == tmp_path / "small.onnx.data" and data.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx", "small.onnx.data"]  # no staging left
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1 << 40)
    tiny = tmp_path / "tiny.onnx"
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1)
    assert onnx_io.save_onnx(_bf16_model(4), tiny) is None  # "external", but every tensor stays inline
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1 << 40)
    onnx_io.save_onnx(model, small)  # smaller again: the stale data file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx", "tiny.onnx"]


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"not a model")
    for path, message in ((tmp_path, "is a directory"), (tmp_path / "no.onnx", "does not exist")):
        with pytest.raises(MoetrtError, match=message):
            onnx_io.load_onnx(path)
    with pytest.raises(MoetrtError, match="not a readable ONNX model"):
        onnx_io.load_onnx(tmp_path / "empty.onnx")


def test_widening_is_exact_and_leaves_the_input_alone() -> None:
    model = _bf16_model()
    wide = onnx_io.widen_to_fp32(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16  # untouched
    assert wide.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert wide.graph.node[0].attribute[0].i == onnx.TensorProto.FLOAT
    np.testing.assert_array_equal(
        numpy_helper.to_array(wide.graph.initializer[0])[:4], [1.5, 2.0, -0.25, 3.0]
    )
    onnx.checker.check_model(wide)


def _ir_model_with_weights(count: int, size: int = 4096) -> object:
    import onnx_ir as ir

    model = ir.serde.deserialize_model(_bf16_model(size))
    graph = model.graph
    for i in range(1, count):  # more weights, each added to the output
        weight = ir.Value(
            name=f"w{i}",
            shape=ir.Shape([size]),
            type=ir.TensorType(ir.DataType.BFLOAT16),
            const_value=ir.tensor(np.full(size, i, dtype=ml_dtypes.bfloat16), name=f"w{i}"),
        )
        graph.register_initializer(weight)
        add = ir.node("Add", [graph.outputs[0], weight])
        graph.append(add)
        graph.outputs[0] = add.outputs[0]
        add.outputs[0].name = f"y{i}"
    return model


def test_large_weights_go_to_numbered_shards_and_stale_shards_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1)  # stands in for 2 GiB
    monkeypatch.setattr(onnx_io, "DATA_SHARD_BYTES", 3 * 8192)  # three 8 KiB weights per shard
    out = tmp_path / "m.onnx"
    first = onnx_io.save_onnx(_ir_model_with_weights(7), out)
    shards = onnx_io.external_data_files(out)
    assert len(shards) == 3 and first == shards[0] and all(s.is_file() for s in shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", *(s.name for s in shards)])
    weights = {i.name: numpy_helper.to_array(i) for i in onnx_io.load_onnx(out).graph.initializer}
    assert all((weights[f"w{i}"].astype(np.float32) == i).all() for i in range(1, 7))  # read back exactly

    onnx_io.save_onnx(_ir_model_with_weights(4), out)  # fewer shards now: the old ones go
    again = onnx_io.external_data_files(out)
    assert len(again) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", *(s.name for s in again)])
    monkeypatch.setattr(onnx_io, "DATA_SHARD_BYTES", 1 << 40)
    onnx_io.save_onnx(_ir_model_with_weights(4), out)  # under one shard: one .data file
    assert [p.name for p in onnx_io.external_data_files(out)] == ["m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_an_external_save_leaves_the_callers_model_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _bf16_model()
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1)  # stands in for 2 GiB
    onnx_io.save_onnx(model, tmp_path / "a.onnx")
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # still inline, still whole
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1 << 40)
    onnx_io.save_onnx(model, tmp_path / "a.onnx")  # inline now: the old data file goes, the model still loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]
    loaded = onnx_io.load_onnx(tmp_path / "a.onnx")
    assert (
        numpy_helper.to_array(loaded.graph.initializer[0]).tobytes()
        == numpy_helper.to_array(model.graph.initializer[0]).tobytes()
    )
