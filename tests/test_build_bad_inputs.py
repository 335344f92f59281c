"""Every bad input of `moetrt build` / `run` / `inspect`, through the CLI: one line on stderr that says what to
do, exit code 1, and nothing half-written. Engine checks that need no GPU run on a real TensorRT-RTX build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from conftest import FusedBlockWriter, assert_one_line_error, invoke, leftovers
from moetrt_testing.single_op_model import single_moe_model

from moetrt.core.errors import MoetrtError
from moetrt.op.spec import MoEAttributes

ATTRS = MoEAttributes(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)


def _nothing_left(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not leftovers(parent, name)


@pytest.fixture
def block(fused_block: FusedBlockWriter) -> Path:
    return fused_block("fp16", ATTRS, "block.onnx")


@pytest.fixture(scope="module")
def rtx_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real TensorRT-RTX build (rtx40, fp16, tokens 1:16:256) of one MoE block."""
    pytest.importorskip("tensorrt_rtx_bindings")
    root = tmp_path_factory.mktemp("rtx")
    model, _ = single_moe_model(ATTRS, torch.float16)
    onnx.save(model, str(root / "block.onnx"))
    out = root / "out"
    code, _, err = invoke(
        "build",
        str(root / "block.onnx"),
        "-o",
        str(out),
        "--engine-backend",
        "tensorrt-rtx",
        "--tokens",
        "1:16:256",
        "--no-parity",
    )
    assert code == 0, err
    return out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--target", "h900"], ["unknown target 'h900'", "sm_XX"]),
        (["--target", "sm_61"], ["older than TensorRT 10 supports"]),
        (["--target", "sm_75", "--precision", "bf16"], ["no bf16", "--precision fp16"]),
        (["--target", "thor"], ["not compiled for target thor"]),
        (["--engine-backend", "tensorrt-rtx", "--target", "h100"], ["TensorRT-RTX cannot build", "SM 90"]),
        (["--tokens", "64:8:4096"], ["--tokens", "1:128:4096"]),
        (["--batch", "0:1:2"], ["--batch"]),
        (["--engine-backend", "tensorrt-rtx", "--precision", "bf16"], ["is fp16 but --precision is bf16"]),
        (["--plugin-library", "/nonexistent/libmoetrt_plugin.so"], ["does not exist", "libmoetrt_plugin.so"]),
        (
            ["--engine-backend", "tensorrt-rtx", "--target", "rtx40", "--plugin-library", "x.so"],
            ["--plugin-library is for --engine-backend tensorrt"],
        ),
        # a format the target SM cannot run: fp8 x fp8 products need the fp8 tensor cores of SM 8.9+
        (
            ["--weights", "fp8", "--activations", "fp8", "--target", "orin"],
            ["--activations fp8 runs on fp8 tensor cores", "target orin (SM 87)", "leave out --activations"],
        ),
        (
            ["--weights", "fp8", "--activations", "fp8", "--target", "a100"],
            ["fp8 tensor cores", "target a100 (SM 80)"],
        ),
        (["--weights", "int4", "--activations", "fp8"], ["it needs --weights fp8"]),
        (
            ["--weights", "fp8", "--activations", "fp8", "--precision", "fp32"],
            ["is for fp16 and bf16 engines"],
        ),
        (["--activations", "fp8"], ["it needs --weights fp8"]),
    ],
)
def test_build_refuses_with_one_line(
    tmp_path: Path, block: Path, args: list[str], needles: list[str]
) -> None:
    code, stdout, err = invoke("build", str(block), "-o", str(tmp_path / "out"), *args)
    assert_one_line_error(code, err, *needles)
    assert stdout == "" and _nothing_left(tmp_path, "out")


def test_build_of_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x07not protobuf at all")
    code, _, err = invoke("build", str(bad), "-o", str(tmp_path / "out"), "--engine-backend", "tensorrt-rtx")
    assert_one_line_error(code, err, "not a readable ONNX model")
    assert _nothing_left(tmp_path, "out")


def test_corrupt_plan_is_refused_before_tensorrt(rtx_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "corrupt"
    shutil.copytree(rtx_build, out)
    plan = out / "model.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: same size, same header
    plan.write_bytes(bytes(data))
    for command in ("run", "inspect"):
        code, _, err = invoke(command, str(plan))
        assert_one_line_error(code, err, "does not match its manifest", "rebuild")
    code, _, err = invoke("run", str(out))  # the build directory resolves to the same plan
    assert_one_line_error(code, err, "does not match its manifest")


def test_foreign_plans_are_refused(rtx_build: Path, tmp_path: Path) -> None:
    # Not a TensorRT plan at all, in a build directory: the header differs from the manifest's record.
    out = tmp_path / "foreign"
    shutil.copytree(rtx_build, out)
    (out / "model.plan").write_bytes(b"PK\x03\x04" + bytes(4096))
    code, _, err = invoke("run", str(out / "model.plan"))
    assert_one_line_error(code, err, "is not a TensorRT plan of the kind its manifest records")
    # A plan that came without moetrt's manifest: moetrt cannot tell what it was built for.
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(rtx_build / "model.plan", loose / "engine.plan")
    code, _, err = invoke("run", str(loose / "engine.plan"))
    assert_one_line_error(code, err, "no manifest.json beside", "moetrt build")
    # A manifest that is not moetrt's.
    (loose / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    code, _, err = invoke("inspect", str(loose / "engine.plan"))
    assert_one_line_error(code, err, "invalid", "format")


def test_engine_built_for_another_sm(rtx_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An H100 (SM 9.0) is visible; the plan was built for rtx40 (SM 8.9).
    monkeypatch.setattr("moetrt.runtime.engine.current_device_sm", lambda: 90)
    code, _, err = invoke("run", str(rtx_build))
    assert_one_line_error(code, err, "built for SM 89 (rtx40)", "this GPU is SM 90", "--target sm_90")


def test_engine_needs_a_gpu(rtx_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moetrt.runtime.engine.current_device_sm", lambda: None)
    code, _, err = invoke("run", str(rtx_build))
    assert_one_line_error(code, err, "no CUDA GPU is visible", "model.onnx")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--tokens", "257"], ["tokens = 257 is outside the engine's profile 1..256", "--tokens"]),
        (["--batch", "300", "--seq", "1"], ["outside the engine's profile 1..256"]),
    ],
)
def test_token_count_outside_the_profile(rtx_build: Path, args: list[str], needles: list[str]) -> None:
    # Refused from the manifest, before a GPU or TensorRT is needed.
    code, _, err = invoke("run", str(rtx_build), *args)
    assert_one_line_error(code, err, *needles)
    # The portable model has no profile: the same request runs through onnxruntime.
    code, stdout, err = invoke("run", str(rtx_build), "--backend", "onnxruntime", *args, "--iters", "1")
    assert code == 0 and "NON-FINITE" not in stdout, err


def test_run_of_a_directory_without_artifacts(tmp_path: Path) -> None:
    code, _, err = invoke("run", str(tmp_path))
    assert_one_line_error(code, err, "holds neither model.plan nor model.onnx")


def test_tokens_flag_on_a_batch_seq_model(tmp_path: Path) -> None:
    from moetrt.runtime import feed_shapes

    specs = {"input_ids": (torch.int64, ["batch", "seq"])}
    assert feed_shapes(specs, batch=2, seq=5) == {"input_ids": [2, 5]}
    with pytest.raises(MoetrtError, match="--tokens sets the token count of"):
        feed_shapes(specs, tokens=8)
    assert feed_shapes({"hidden_states": (torch.float16, ["T", 32])}, tokens=8) == {"hidden_states": [8, 32]}
