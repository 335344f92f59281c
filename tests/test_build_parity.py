"""The parity record `moetrt build` writes: what it compared, and the bf16 case onnxruntime's CPU provider
cannot run (checked as the exact fp32 widening of the same graph, and recorded as such)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SMALL_SHARED
from moetrt_testing.single_op_model import single_moe_model
from onnx import numpy_helper

from moetrt.build import UPCAST_SCOPE, BuildOptions, _parity, build
from moetrt.core.onnx_io import widen_to_fp32
from moetrt.core.tolerances import relative_error
from moetrt.op.reference import moe_reference, random_inputs
from moetrt.runtime.session import Session
from moetrt.trt.targets import DimRange

ATTRS = dataclasses.replace(SMALL_SHARED, output_router_logits=True)


def test_widening_is_exact(tmp_path: Path) -> None:
    model, weights = single_moe_model(ATTRS, torch.bfloat16, seed=3)
    widened = widen_to_fp32(model)
    tensors = [*widened.graph.initializer]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in tensors)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in widened.graph.input)
    for original, wide in zip(model.graph.initializer, tensors):  # every bf16 value is kept as it was
        bits = numpy_helper.to_array(original).view(np.int16).copy()
        bf16 = torch.from_numpy(bits).view(torch.bfloat16)
        assert torch.equal(bf16.float(), torch.from_numpy(numpy_helper.to_array(wide).copy()))
    assert model.graph.initializer[0].data_type == onnx.TensorProto.BFLOAT16  # the input is not modified
    onnx.save(widened, str(tmp_path / "wide.onnx"))
    session = Session(tmp_path / "wide.onnx")
    for tokens in (1, 9, 70):
        x = random_inputs(ATTRS, tokens, torch.bfloat16, seed=tokens)["hidden_states"]
        out = session({"hidden_states": x.float()})
        # Same bf16 values, in float64 (moe_reference returns the dtype of hidden_states).
        inputs = {name: t.double() for name, t in {**weights, "hidden_states": x}.items()}
        ref = moe_reference(inputs, ATTRS, torch.float64)
        for name in ("output", "router_logits"):
            assert relative_error(out[name], ref[name]) <= 1e-5, (tokens, name)


@pytest.fixture(scope="module")
def bf16_block(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorrt_rtx_bindings")
    out = tmp_path_factory.mktemp("bf16") / "out"
    options = BuildOptions(precision="bf16", engine_backend="tensorrt-rtx", tokens=DimRange(1, 16, 256))
    result = build("demo:mixtral:block", out, options)
    assert "ONNX parity PASS (bf16 graph widened to fp32)" in result.summary()
    return out


def test_bf16_build_records_what_was_checked(bf16_block: Path) -> None:
    parity = json.loads((bf16_block / "manifest.json").read_text())["parity"]
    assert parity["checked"] and parity["passed"] and parity["scope"] == UPCAST_SCOPE
    assert parity["precision"] == "bf16" and "widened to fp32" in parity["backend"]
    assert [row["tolerance"] for row in parity["rows"]] == [1e-2] * 3
    # No bf16 activations in the widened graph: the Mixtral block (no scalar constants) agrees to fp32 rounding.
    assert 0 < parity["max_rel_err"] <= 1e-5


def test_bf16_parity_catches_a_wrong_graph(bf16_block: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    shutil.copy(bf16_block / "model.onnx", broken)
    model = onnx.load(str(broken))
    # Swap the gate and up halves of every expert's gate_up weight: the shapes stay valid, the math does not.
    gate_up = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 3 else 0)
    raw = numpy_helper.to_array(gate_up)
    half = raw.shape[1] // 2
    swapped = np.concatenate([raw[:, half:], raw[:, :half]], axis=1)
    gate_up.CopyFrom(numpy_helper.from_array(swapped, gate_up.name))
    onnx.save(model, str(broken))
    parity = _parity(broken, "bf16", lambda _msg: None)
    assert parity["checked"] and not parity["passed"] and parity["max_rel_err"] > 1e-2
