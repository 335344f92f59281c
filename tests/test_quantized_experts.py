"""Quantized experts end to end on a demo model: `moetrt fuse --weights`, `moetrt verify` against the same
dequantized experts (and, on request, against the native weights), `moetrt build --weights` into a TensorRT-RTX
engine with the quantization recorded, generation through the quantized decoder, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke

from moetrt.core.onnx_io import load_onnx
from moetrt.export.onnx_export import export_onnx
from moetrt.op.fused_node import check_fused_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quantized") / "qwen3_moe.onnx"
    export_onnx("demo:qwen3_moe", path, self_check="off")
    return path


@pytest.mark.parametrize("weights", ["fp8", "int4", "mxfp4"])
def test_fuse_quantizes_and_verify_checks_the_quantized_graph(
    exported: Path, tmp_path: Path, weights: str
) -> None:
    out = tmp_path / f"{weights}.onnx"
    code, stdout, err = invoke("fuse", str(exported), "-o", str(out), "--weights", weights)
    assert code == 0, err
    assert "quantize" in stdout
    formats = {a.weight_format for a in check_fused_model(load_onnx(out, load_external_data=False))}
    assert formats == {"fp8_block" if weights == "fp8" else weights}
    code, stdout, err = invoke("verify", str(out))
    assert code == 0, stdout + err
    assert "compared against the reference with the same dequantized experts" in stdout
    # Against the native weights the rows measure the quantization itself: they leave the fp32 bound.
    code, stdout, _ = invoke("verify", str(out), "--native-reference")
    assert code == 1 and "compared against the model's native weights" in stdout


def test_fp8_activations_fuse_and_verify(exported: Path, tmp_path: Path) -> None:
    """`--activations fp8`: the fused nodes say so, onnxruntime runs their quantizing bodies, and the reference
    quantizes its experts' inputs alike: block by block on the same inputs, and over the whole fp32 model."""
    out = tmp_path / "a8.onnx"
    code, stdout, err = invoke(
        "fuse", str(exported), "-o", str(out), "--weights", "fp8", "--activations", "fp8"
    )
    assert code == 0, err
    nodes = check_fused_model(load_onnx(out, load_external_data=False))
    assert {(a.weight_format, a.activation_format) for a in nodes} == {("fp8_block", "fp8_block")}
    code, stdout, err = invoke("verify", str(out), "--blocks")
    assert code == 0 and "PASS: 6/6" in stdout, stdout + err
    code, stdout, err = invoke("verify", str(out))
    assert code == 0 and "fp8 activations: the reference quantizes" in stdout, stdout + err
    # against the weight-only op (native experts, activations unquantized) the rows leave the fp32 bound
    code, stdout, _ = invoke("verify", str(out), "--native-reference")
    assert code == 1


def test_build_with_fp8_activations_checks_blocks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = invoke(
        "build", "demo:qwen3_moe", "-o", str(out), "--engine-backend", "tensorrt-rtx", "--weights", "fp8",
        "--activations", "fp8",
    )  # fmt: skip
    assert code == 0, err
    assert "block parity PASS" in stdout and "fp8 activations: checking each fused block" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["built"] and manifest["parity"]["passed"]
    assert manifest["quantization"]["activations"] == "fp8_block"
    assert 1e-3 < manifest["quantization"]["error_vs_native"]["logits"] < 0.5


def test_build_with_quantized_experts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = invoke(
        "build",
        "demo:mixtral",
        "-o",
        str(out),
        "--engine-backend",
        "tensorrt-rtx",
        "--weights",
        "int4",
        "--int4-zero-point",
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["built"] and manifest["parity"]["passed"]
    assert any("dequantized experts" in line for line in manifest["parity"]["findings"])
    quantization = manifest["quantization"]
    assert (
        quantization["format"] == "int4" and quantization["zero_point"] and quantization["block"] == [64]
    )  # the largest that divides 64
    assert 1e-3 < quantization["error_vs_native"]["logits"] < 0.5, quantization
    code, stdout, err = invoke(
        "generate",
        str(out),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--backend",
        "onnxruntime",
        "--json",
    )
    assert code == 0, err
    assert len(json.loads(stdout)["ids"][0]) == 4


def test_plugin_build_compiles_quantized_kernels(tmp_path: Path) -> None:
    """The plugin backend (the default) with quantized experts: the AOT bundle holds dequantizing kernels
    for the fused node's format (the engine itself needs TensorRT and a GPU, not on this machine)."""
    from moetrt.kernels import plan
    from moetrt.kernels.aot import KernelBundle

    out = tmp_path / "out"
    code, _, err = invoke(
        "build", "demo:qwen3_moe", "-o", str(out), "--weights", "int4", "--precision", "fp16"
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["format"] == "int4"
    bundles = sorted(out.glob("kernels/*.bin"))
    assert bundles, sorted(p.name for p in out.rglob("*"))
    bundle = KernelBundle.from_bytes(bundles[0].read_bytes())
    assert bundle.moe_attributes().weight_format == "int4"
    for bucket in bundle.buckets.values():
        gate_up = bucket["variants"]["gate_up"]
        assert plan.variant_weight_format(bucket["constexprs"][gate_up]) == "int4"
        assert "gemv_gate_up" not in bucket["variants"] and "experts" not in bucket["variants"]


def test_quantization_refusals(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = invoke(
        "build", "demo:mixtral", "-o", str(out), "--int4-zero-point", "--engine-backend", "tensorrt-rtx"
    )
    assert_one_line_error(code, err, "--int4-zero-point applies to --weights int4")
    assert not out.exists()
    code, _, err = invoke(
        "fuse", str(exported), "-o", str(tmp_path / "f.onnx"), "--weights", "int4", "--weight-block", "48"
    )
    assert_one_line_error(code, err, "--weight-block 48 does not fit")
    assert not (tmp_path / "f.onnx").exists()
    code, _, err = invoke(
        "fuse", str(exported), "-o", str(tmp_path / "f.onnx"), "--weights", "fp8", "--decompose"
    )
    assert_one_line_error(code, err, "--decompose")
    code, _, err = invoke("fuse", str(exported), "-o", str(tmp_path / "f.onnx"), "--weight-block", "32")
    assert_one_line_error(code, err, "--weight-block applies to quantized weights")
