"""manifest.json: build / validate / write / read, file hashes, and the plan sidecar checks (before TensorRT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from moetrt.core.errors import MoetrtError
from moetrt.runtime.manifest import (
    build_manifest,
    check_plan,
    inspect_artifact,
    parity_line,
    read_manifest,
    summary_lines,
    token_range,
    validate_manifest,
    verify_files,
    write_manifest,
)

PLAN_BYTES = b"vtrt\x00\x00\x00\x00" + bytes(range(256)) * 8


def _tiny_onnx(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _build(tmp_path: Path, sm: int = 89) -> dict[str, Any]:
    _tiny_onnx(tmp_path / "model.onnx")
    (tmp_path / "model.plan").write_bytes(PLAN_BYTES)
    manifest = build_manifest(
        source="demo:qwen3_next",
        target={"name": "rtx40", "sm": sm, "description": "Ada"},
        precision="fp16",
        engine={
            "backend": "tensorrt-rtx",
            "built": True,
            "plan_magic": PLAN_BYTES[:4].hex(),
            "runs_on_sms": [sm],
        },
        profiles=[
            {
                "input": "input_ids",
                "axes": {"0": "batch", "1": "tokens"},
                "min": [1, 1],
                "opt": [1, 128],
                "max": [4, 4096],
            }
        ],
        fused_ops={"moetrt::MoE": 2, "total_nodes": 40},
        files={"model.onnx": tmp_path / "model.onnx", "model.plan": tmp_path / "model.plan"},
        io={"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}], "outputs": []},
        parity={"checked": True, "max_rel_err": 1e-6},
    )
    write_manifest(tmp_path / "manifest.json", manifest)
    return manifest


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    back = read_manifest(tmp_path)
    assert back == json.loads(json.dumps(manifest))
    assert back["files"]["model.plan"]["bytes"] == len(PLAN_BYTES)
    assert len(back["files"]["model.onnx"]["sha256"]) == 64
    assert "torch" in back["versions"] and "python" in back["versions"]
    assert token_range(back, "input_ids") == (1, 4)
    verify_files(back, tmp_path)
    assert any("hashes match" in line for line in summary_lines(inspect_artifact(tmp_path)))


def test_validate_names_every_problem(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    broken = dict(manifest, precision=16, files={"model.plan": {"sha256": "00"}})
    del broken["profiles"]
    with pytest.raises(MoetrtError) as err:
        validate_manifest(broken)
    line = err.value.one_line()
    assert (
        "precision" in line and "profiles" in line and "files.model.plan" in line and "moetrt build" in line
    )
    with pytest.raises(MoetrtError, match="format"):
        validate_manifest(dict(manifest, format="other"))
    with pytest.raises(MoetrtError, match="newer"):
        validate_manifest(dict(manifest, format_version=99))


def test_unreadable_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(MoetrtError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(MoetrtError, match="no manifest"):
        read_manifest(tmp_path / "elsewhere")


def test_tampered_file_is_detected(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[-1] ^= 1  # same size, other content
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(MoetrtError, match="does not match its manifest"):
        verify_files(manifest, tmp_path)


def test_plan_checks_pass_for_the_built_plan(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    check_plan(tmp_path / "model.plan", manifest, device_sm=89)
    check_plan(tmp_path / "model.plan", manifest, device_sm=None)


def test_corrupt_plan_is_refused(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    data = bytearray(PLAN_BYTES)
    data[100] ^= 0xFF
    (tmp_path / "model.plan").write_bytes(bytes(data))
    with pytest.raises(MoetrtError, match="corrupt"):
        check_plan(tmp_path / "model.plan", manifest, 89)
    (tmp_path / "model.plan").write_bytes(PLAN_BYTES[:-10])
    with pytest.raises(MoetrtError, match="truncated"):
        check_plan(tmp_path / "model.plan", manifest, 89)


def test_foreign_plan_is_refused(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    (tmp_path / "model.plan").write_bytes(b"PK\x03\x04" + PLAN_BYTES[4:])  # a zip, not a plan
    with pytest.raises(MoetrtError, match="not a TensorRT plan"):
        check_plan(tmp_path / "model.plan", manifest, 89)
    lone = tmp_path / "lone" / "other.plan"
    lone.parent.mkdir()
    lone.write_bytes(PLAN_BYTES)
    with pytest.raises(MoetrtError) as err:
        check_plan(lone, None, 89)
    assert "no manifest.json" in err.value.one_line() and "moetrt build" in err.value.one_line()
    with pytest.raises(MoetrtError, match="not listed"):
        check_plan(lone, manifest, 89)


def test_plan_for_another_sm_is_refused(tmp_path: Path) -> None:
    manifest = _build(tmp_path, sm=89)
    with pytest.raises(MoetrtError) as err:
        check_plan(tmp_path / "model.plan", manifest, device_sm=90)
    line = err.value.one_line()
    assert "built for SM 89" in line and "this GPU is SM 90" in line and "--target sm_90" in line


def test_missing_plan(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    (tmp_path / "model.plan").unlink()
    with pytest.raises(MoetrtError, match="does not exist"):
        check_plan(tmp_path / "model.plan", manifest, 89)


def test_parity_line_says_what_was_compared() -> None:
    assert parity_line(None) == "skipped at build time (--no-parity)"
    assert parity_line({"checked": False, "reason": "no bf16 kernel for Where"}) == (
        "not checked: no bf16 kernel for Where"
    )
    rows = [{"passed": True}, {"passed": False}]
    line = parity_line(
        {
            "checked": True,
            "passed": False,
            "rows": rows,
            "dtype": "fp16",
            "backend": "onnxruntime CPUExecutionProvider",
            "reference": "demo:mixtral",
            "max_rel_err": 0.0123,
        }
    )
    assert line.startswith(
        "FAILED 1/2 (model.onnx, fp16, on onnxruntime CPUExecutionProvider vs demo:mixtral"
    )
    assert "1.23e-02" in line and "the engine itself was not run" in line
