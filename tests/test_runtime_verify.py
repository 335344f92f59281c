"""`moetrt.verify.artifact.verify_loaded` (what `moetrt verify --engine` runs): the artifact `load` picks, against the
PyTorch model named in the build's manifest, through the onnxruntime backend here (engines need a GPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from moetrt.build import BuildOptions, build
from moetrt.core.errors import MoetrtError
from moetrt.runtime import check_run_request, resolve_artifact
from moetrt.trt.targets import DimRange
from moetrt.verify.artifact import verify_loaded


@pytest.fixture(scope="module")
def block_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real build of the Mixtral MoE block demo: export, fuse, TensorRT-RTX engine (about 10 s)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    out = tmp_path_factory.mktemp("block") / "out"
    options = BuildOptions(
        precision="fp32", engine_backend="tensorrt-rtx", tokens=DimRange(1, 64, 512), parity=False
    )
    result = build("demo:mixtral:block", out, options)
    assert result.engine_built and result.manifest["fused_ops"]["moetrt::MoE"] == 1
    return out


def test_onnxruntime_backend_matches_pytorch(block_build: Path) -> None:
    report = verify_loaded(block_build, backend="onnxruntime", shapes=[(1, 1), (3, 17), (2, 130)])
    assert report.reference == "demo:mixtral:block" and report.dtype == "fp32"
    assert [row.shape for row in report.rows] == [(1, 1), (3, 17), (2, 130)]
    assert report.passed, report.format_table()
    assert all(0 < row.rel_err <= 1e-5 for row in report.rows)  # rounding, not an identical copy


def test_a_wrong_model_fails_parity(block_build: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(block_build, broken)
    model = onnx.load(str(broken / "model.onnx"))
    experts = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(experts).copy()
    values[0] *= 1.5  # one expert's weights off by half: a defect parity must catch
    experts.CopyFrom(numpy_helper.from_array(values, experts.name))
    onnx.save(model, str(broken / "model.onnx"))
    with pytest.raises(MoetrtError, match="does not match its manifest"):  # inside a build: refused unrun
        verify_loaded(broken, backend="onnxruntime")
    onnx.save(model, str(tmp_path / "wrong.onnx"))  # on its own, it runs, and parity catches the defect
    report = verify_loaded(tmp_path / "wrong.onnx")
    assert not report.passed and max(row.rel_err for row in report.rows) > 1e-3


def test_engine_path_refuses_without_gpu(block_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moetrt.runtime.engine.current_device_sm", lambda: None)
    assert resolve_artifact(block_build).name == "model.plan"
    assert resolve_artifact(block_build / "model.plan", "onnxruntime") == block_build / "model.onnx"
    with pytest.raises(MoetrtError, match="no CUDA GPU is visible"):
        verify_loaded(block_build)


def test_shapes_outside_the_profile_are_refused_first(block_build: Path) -> None:
    check_run_request(block_build, batch=1, seq=512)
    with pytest.raises(MoetrtError, match=r"tokens = 513 is outside the engine's profile 1\.\.512"):
        check_run_request(block_build, batch=1, seq=513)
    check_run_request(block_build, backend="onnxruntime", batch=1, seq=513)  # the ONNX model has no profile


def test_needs_a_reference(tmp_path: Path) -> None:
    from moetrt_testing.single_op_model import single_moe_model

    from moetrt.op.spec import MoEAttributes

    model, _ = single_moe_model(MoEAttributes(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8))
    onnx.save(model, str(tmp_path / "block.onnx"))
    with pytest.raises(MoetrtError, match="does not name the PyTorch model") as err:
        verify_loaded(tmp_path / "block.onnx")
    assert "pass --reference MODEL" in err.value.one_line()


def test_cli_verify_engine(block_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from moetrt.cli import main

    portable = tmp_path / "portable"  # a build directory without a plan runs model.onnx on onnxruntime
    portable.mkdir()
    for name in ("model.onnx", "manifest.json"):
        shutil.copy(block_build / name, portable / name)
    result = CliRunner().invoke(main, ["verify", str(portable), "--engine", "--shapes", "1x3,2x40"])
    assert result.exit_code == 0, result.output
    assert "PASS: 2/2 checks within tolerance" in result.stdout and "1e-05 (fp32)" in result.stdout

    monkeypatch.setattr("moetrt.runtime.engine.current_device_sm", lambda: None)
    result = CliRunner().invoke(main, ["verify", str(block_build), "--engine"])
    assert result.exit_code == 1 and result.stderr.splitlines()[-1].startswith(
        "error: no CUDA GPU is visible"
    )
    result = CliRunner().invoke(main, ["verify", str(block_build), "--engine", "--shapes", "1x600"])
    assert result.exit_code == 1 and "outside the engine's profile 1..512" in result.stderr


def test_bf16_model_on_the_cpu_provider_says_what_to_do(tmp_path: Path) -> None:
    """onnxruntime's CPU provider lacks bf16 kernels: loading says so in one line instead of 'corrupt file'."""
    from onnx import TensorProto, helper

    from moetrt.runtime.session import Session

    graph = helper.make_graph(
        [helper.make_node("Where", ["cond", "x", "x"], ["y"])],
        "bf16_where",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, [4]),
            helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4])],
    )
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10), path)
    with pytest.raises(MoetrtError) as err:
        Session(path, providers=["CPUExecutionProvider"])
    assert "no bf16 kernel for Where" in str(err.value) and "\n" not in str(err.value)
    assert "--precision fp16" in err.value.hint
