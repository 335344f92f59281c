"""`moetrt build`: real TensorRT-RTX engine builds on this CPU machine (fused MoE inlined to native layers),
profiles, the manifest it writes, the no-TensorRT path, and atomic output (nothing half-written on failure)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import FusedBlockWriter, leftovers

from moetrt.build import BuildOptions, build
from moetrt.cli import parse_dim_range
from moetrt.core.errors import MoetrtError
from moetrt.runtime import load
from moetrt.runtime.manifest import check_plan, read_manifest, verify_files
from moetrt.trt.profiles import make_profiles
from moetrt.trt.targets import DimRange

pytest.importorskip("tensorrt_rtx_bindings")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("target", ["rtx40", "rtx50", "a100"])
def test_rtx_engine_build(tmp_path: Path, precision: str, target: str, fused_block: FusedBlockWriter) -> None:
    out = tmp_path / "out"
    lines: list[str] = []
    result = build(
        str(fused_block(precision)),
        out,
        BuildOptions(
            target=target,
            precision=precision,
            tokens=DimRange(1, 16, 512),
            engine_backend="tensorrt-rtx",
            parity=False,
        ),
        progress=lines.append,
    )
    assert result.engine_built and sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.plan",
    ]
    manifest = read_manifest(out)
    verify_files(manifest, out)
    assert manifest["engine"]["backend"] == "tensorrt-rtx" and manifest["engine"]["plugin"] is False
    assert manifest["target"]["name"] == target and manifest["precision"] == precision
    assert manifest["fused_ops"]["moetrt::MoE"] == 1
    assert manifest["profiles"] == [
        {"input": "hidden_states", "axes": {"0": "tokens"}, "min": [1, 32], "opt": [16, 32], "max": [512, 32]}
    ]
    plan = (out / "model.plan").read_bytes()
    assert len(plan) > 10_000 and plan[:4].hex() == manifest["engine"]["plan_magic"]
    check_plan(out / "model.plan", manifest, manifest["target"]["sm"])
    # The portable model still carries the fused node (the engine got the inlined body).
    assert sum(n.op_type == "MoE" for n in onnx.load(str(out / "model.onnx")).graph.node) == 1
    assert any("inlined 1 moetrt::MoE" in line for line in lines)
    assert not leftovers(tmp_path, "out")


def test_built_directory_runs_with_onnxruntime(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = tmp_path / "out"
    build(
        str(fused_block("fp32")),
        out,
        BuildOptions(engine_backend="tensorrt-rtx", precision="fp32", parity=False),
    )
    session = load(out, backend="onnxruntime")
    x = torch.randn(5, 32)
    direct = load(fused_block("fp32"))({"hidden_states": x})["output"]
    assert torch.equal(session({"hidden_states": x})["output"], direct)


def test_tensorrt_backend_without_tensorrt_writes_onnx_manifest_and_kernels(
    tmp_path: Path, fused_block: FusedBlockWriter
) -> None:
    """No TensorRT here: no plan, but the fused ONNX, the manifest and the target's real cubin bundles."""
    if _has_tensorrt():
        pytest.skip("tensorrt is installed here: the plugin build path runs instead")
    pytest.importorskip("triton")
    from moetrt.kernels.aot import KernelBundle

    out = tmp_path / "out"
    lines: list[str] = []
    result = build(
        str(fused_block("fp16")),
        out,
        BuildOptions(target="h100", parity=False),
        progress=lines.append,
    )
    assert not result.engine_built and "`tensorrt` module" in (result.no_engine_reason or "")
    kernels = read_manifest(out)["engine"]["kernels"]
    assert kernels["sm"] == 90 and kernels["variants"] == 1 and len(kernels["files"]) == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        ["manifest.json", "model.onnx", *kernels["files"]]
    )
    manifest = read_manifest(out)
    verify_files(manifest, out)
    bundle = KernelBundle.from_bytes((out / kernels["files"][0]).read_bytes())
    assert (
        bundle.sm == 90 and bundle.kernels and all(k.cubin[:4] == b"\x7fELF" for k in bundle.kernels.values())
    )
    assert kernels["bytes"] == (out / kernels["files"][0]).stat().st_size
    assert any("compiling MoE kernels for sm_90" in line for line in lines)
    assert manifest["engine"]["built"] is False and "not installed" in manifest["engine"]["reason"]
    assert manifest["target"] == {"name": "h100", "sm": 90, "description": "H100 (Hopper, SM 9.0)"}
    summary = result.summary()
    assert "\n" not in summary and "no engine built: the `tensorrt` module" in summary
    assert "--engine-backend tensorrt-rtx" in summary and "parity skipped" in summary


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BuildOptions(target="h900"), "unknown target"),
        (BuildOptions(target="sm_75", precision="bf16"), "no bf16"),
        (BuildOptions(target="h100", engine_backend="tensorrt-rtx"), "TensorRT-RTX cannot build"),
        (BuildOptions(target="thor"), "not compiled for target thor"),
        (BuildOptions(engine_backend="onnx"), "unknown engine backend"),
        (BuildOptions(engine_backend="tensorrt-rtx", precision="fp32"), "is fp16 but --precision is fp32"),
    ],
)
def test_bad_input_leaves_nothing(
    tmp_path: Path, options: BuildOptions, message: str, fused_block: FusedBlockWriter
) -> None:
    out = tmp_path / "out"
    with pytest.raises(MoetrtError, match=message):
        build(str(fused_block("fp16")), out, options)
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_failure_mid_build_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused_block: FusedBlockWriter
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise MoetrtError("TensorRT failed to build the engine: out of memory", "retry")

    monkeypatch.setattr("moetrt.trt.rtx_build.build_rtx_engine", broken)
    out = tmp_path / "out"
    with pytest.raises(MoetrtError, match="out of memory"):
        build(str(fused_block("fp16")), out, BuildOptions(engine_backend="tensorrt-rtx", parity=False))
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_existing_outdir_needs_force(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    source = str(fused_block("fp16"))
    out = tmp_path / "out"
    options = BuildOptions(engine_backend="tensorrt-rtx", parity=False)
    build(source, out, options)
    first = read_manifest(out)["created_utc"]
    with pytest.raises(MoetrtError, match="not empty") as err:
        build(source, out, options)
    assert "--force" in err.value.one_line()
    build(source, out, BuildOptions(engine_backend="tensorrt-rtx", parity=False, force=True, target="rtx50"))
    assert read_manifest(out)["target"]["name"] == "rtx50" and read_manifest(out)["created_utc"] >= first
    assert not leftovers(tmp_path, "out")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(MoetrtError, match="is not a `moetrt build` directory"):
        build(source, stranger, BuildOptions(engine_backend="tensorrt-rtx", parity=False, force=True))
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_unreadable_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(MoetrtError, match="not a readable ONNX model"):
        build(str(bad), tmp_path / "out", BuildOptions(engine_backend="tensorrt-rtx"))
    with pytest.raises(MoetrtError, match="does not exist"):
        build(str(tmp_path / "missing.onnx"), tmp_path / "out", BuildOptions(engine_backend="tensorrt-rtx"))


def test_profiles_from_onnx_inputs() -> None:
    tokens, batch = parse_dim_range("1:64:2048", "--tokens"), parse_dim_range("2", "--batch")
    assert batch == DimRange(2, 2, 2)
    profiles = make_profiles(
        [("input_ids", ["batch", "seq"]), ("hidden", ["T", 64]), ("scale", [1])], tokens, batch
    )
    assert profiles == [
        {
            "input": "input_ids",
            "axes": {"1": "tokens", "0": "batch"},
            "min": [2, 1],
            "opt": [2, 64],
            "max": [2, 2048],
        },
        {"input": "hidden", "axes": {"0": "tokens"}, "min": [1, 64], "opt": [64, 64], "max": [2048, 64]},
    ]
    with pytest.raises(MoetrtError, match="3 dynamic dims"):
        make_profiles([("x", ["a", "b", "c"])], tokens, batch)
    for bad in ("0:1:2", "4:2:8", "1:2", "a:b:c", "x"):
        with pytest.raises(MoetrtError, match=r"--tokens .* MIN:OPT:MAX"):
            parse_dim_range(bad, "--tokens")
    with pytest.raises(MoetrtError, match="MIN:OPT:MAX"):
        DimRange(4, 2, 8)  # the library refuses a bad range too, whoever builds it


def test_manifest_is_json_with_versions(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = tmp_path / "out"
    build(
        str(fused_block("bf16")),
        out,
        BuildOptions(engine_backend="tensorrt-rtx", precision="bf16", parity=False),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["tensorrt-rtx-cu13-bindings"].startswith("1.")
    assert manifest["io"]["inputs"] == [{"name": "hidden_states", "dtype": "bfloat16", "shape": ["T", 32]}]
    assert manifest["parity"] is None and manifest["build_seconds"]["engine"] > 0
