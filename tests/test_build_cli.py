"""The `build`, `run` and `inspect` commands: one-line errors with exit 1, and the demo's real TensorRT-RTX build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FusedBlockWriter, invoke

from moetrt.op.spec import MoEAttributes

ATTRS = MoEAttributes(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, output_router_logits=True)


@pytest.fixture
def block(fused_block: FusedBlockWriter) -> Path:
    return fused_block("fp16", ATTRS, "block.onnx")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "h900"], "unknown target"),
        (["--target", "sm_75", "--precision", "bf16"], "no bf16"),
        (["--tokens", "9:1:1"], "--tokens"),
        (["--engine-backend", "tensorrt-rtx", "--target", "b200"], "TensorRT-RTX cannot build"),
    ],
)
def test_build_errors_are_one_line(tmp_path: Path, block: Path, args: list[str], message: str) -> None:
    code, _, err = invoke("build", str(block), "-o", str(tmp_path / "out"), *args)
    assert code == 1 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_build_inspect_run(tmp_path: Path, block: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings")
    out = tmp_path / "out"
    code, stdout, err = invoke("build", str(block), "-o", str(out), "--engine-backend", "tensorrt-rtx")
    assert code == 0, err
    # The single-node model names no source model: parity is recorded as not checked, with the reason.
    assert stdout.count("\n") == 1 and "parity not checked" in stdout  # the one summary line
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["checked"] is False and "moetrt.source" in parity["reason"]
    assert "built model.plan with TensorRT-RTX" in err and "engine model.plan (tensorrt-rtx, rtx40)" in stdout

    code, stdout, _ = invoke("inspect", str(out))
    assert code == 0 and "hashes match" in stdout and "MoE x1" in stdout and "top_k=2" in stdout
    code, stdout, _ = invoke("inspect", str(out / "model.plan"))
    assert code == 0 and "matches its manifest" in stdout
    code, stdout, _ = invoke("inspect", str(out / "model.onnx"), "--json")
    assert code == 0 and json.loads(stdout)["onnx"]["moe_nodes"] == 1

    code, stdout, err = invoke("run", str(out), "--backend", "onnxruntime", "--tokens", "7", "--iters", "2")
    assert code == 0, err
    assert "output output: (7, 32) float16" in stdout and "output router_logits: (7, 8) float16" in stdout
    assert "NON-FINITE" not in stdout and "time: median" in stdout

    (out / "model.plan").write_bytes(b"vtrt" + bytes(100))  # damaged after the build
    code, _, err = invoke("run", str(out / "model.plan"))
    assert code == 1 and "does not match its manifest" in err and err.count("\n") == 1
    code, _, err = invoke("inspect", str(out / "model.plan"))
    assert code == 1 and "corrupt" in err


def test_run_and_inspect_bad_paths(tmp_path: Path) -> None:
    code, _, err = invoke("run", str(tmp_path / "nope.onnx"))
    assert code == 1 and "does not exist" in err
    (tmp_path / "x.plan").write_bytes(b"ftrt")
    code, _, err = invoke("inspect", str(tmp_path / "x.plan"))
    assert code == 1 and "no manifest.json" in err
    code, _, err = invoke("run", str(tmp_path / "x.plan"), "--cuda-graph")
    assert code == 1 and "no manifest.json" in err


def test_demo_tensorrt_rtx_build(tmp_path: Path) -> None:
    """The README's command, for real: export, fuse, inline, build with TensorRT-RTX (about 40 s on 2 cores)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    out = tmp_path / "out"
    code, stdout, err = invoke("build", "demo:qwen3_next", "-o", str(out), "--engine-backend", "tensorrt-rtx")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["built"] and manifest["engine"]["backend"] == "tensorrt-rtx"
    assert manifest["fused_ops"]["moetrt::MoE"] >= 1
    assert manifest["parity"]["checked"] and manifest["parity"]["passed"], manifest["parity"]
    assert "onnxruntime" in manifest["parity"]["scope"] and manifest["parity"]["precision"] == "fp16"
    assert stdout.count("\n") == 1 and "ONNX parity PASS" in stdout and "parity PASS" in err
    assert (out / "model.plan").stat().st_size == manifest["files"]["model.plan"]["bytes"]
    code, stdout, err = invoke(
        "run", str(out), "--backend", "onnxruntime", "--batch", "2", "--seq", "5", "--iters", "1"
    )
    assert code == 0 and "NON-FINITE" not in stdout, err


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_every_demo_family_builds_a_tensorrt_rtx_engine(tmp_path: Path, family: str) -> None:
    """The other six families through the whole build (about 10 s each): engine, one fused op per MoE layer,
    parity of the fused ONNX against PyTorch."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from moetrt.export.demo_models import build_demo

    out = tmp_path / "out"
    code, _stdout, err = invoke("build", f"demo:{family}", "-o", str(out), "--engine-backend", "tensorrt-rtx")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["built"] and (out / "model.plan").stat().st_size > 0
    assert manifest["fused_ops"]["moetrt::MoE"] == build_demo(family).num_moe_blocks
    assert manifest["parity"]["passed"], manifest["parity"]
