"""Real width: one Qwen3-Next MoE block at the released width (512 experts of 2048x512, a shared expert: 3.2 GB
of bf16 weights, past protobuf's 2 GB) goes through export, fuse, build and decompose with external data and
with memory that does not hold the weights twice. Slow (minutes, ~10 GB of disk): `pytest -m slow`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from moetrt.core.onnx_io import external_data_files
from moetrt.op.fused_node import check_fused_model
from moetrt.runtime.manifest import read_manifest, verify_files

FACTORY = """
import torch
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

from moetrt.export.loaded import FirstOutput


def factory():
    config = Qwen3NextConfig()  # the released width
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    with torch.device("meta"):
        block = Qwen3NextSparseMoeBlock(config)
    block = block.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():  # fan-in scaled, never zero; drawn a slice at a time
            rows = p.view(-1, p.shape[-1])
            for start in range(0, rows.shape[0], 8192):
                rows[start : start + 8192] = (
                    torch.randn(rows[start : start + 8192].shape, generator=gen) * p.shape[-1] ** -0.5
                ).to(p.dtype)
    return FirstOutput(block).eval(), (torch.randn(2, 3, config.hidden_size, dtype=torch.bfloat16),)
"""


def _needs_free_disk(path: Path, gigabytes: float) -> None:
    free = shutil.disk_usage(path).free / 1e9
    if free < gigabytes:
        pytest.skip(f"needs {gigabytes:.0f} GB of free disk under {path}, has {free:.0f} GB")


def _moetrt(*args: str) -> tuple[int, float]:
    """Exit code and peak RSS (GB) of `moetrt ARGS` in a process of its own."""
    probe = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "moetrt.cli", *args],
        capture_output=True,
        text=True,
    )
    rc, kib = done.stdout.split()[-2:]
    return int(rc), int(kib) / 1e6


@pytest.mark.slow
def test_a_real_width_block_exports_fuses_builds_and_decomposes(tmp_path: Path) -> None:
    _needs_free_disk(tmp_path, 20)
    (tmp_path / "block.py").write_text(FACTORY)
    exported, fused, out = tmp_path / "block.onnx", tmp_path / "fused.onnx", tmp_path / "out"
    code, export_peak = _moetrt(
        "export", f"module:{tmp_path / 'block.py'}:factory", "--dtype", "bf16", "-o", str(exported)
    )
    assert code == 0 and (tmp_path / "block.onnx.data").stat().st_size > 3e9
    code, fuse_peak = _moetrt("fuse", str(exported), "-o", str(fused))
    assert code == 0 and fuse_peak < 1.5, fuse_peak  # the weights are 3.2 GB: never loaded whole
    (attrs,) = check_fused_model(onnx.load(str(fused), load_external_data=False))
    assert (attrs.num_experts, attrs.top_k, attrs.hidden_size, attrs.intermediate_size) == (
        512,
        10,
        2048,
        512,
    )
    code, build_peak = _moetrt("build", str(exported), "-o", str(out), "--target", "h100", "--no-parity")
    assert code == 0 and build_peak < 1.5, build_peak
    manifest = read_manifest(out)
    verify_files(manifest, out)
    assert manifest["fused_ops"]["moetrt::MoE"] == 1 and any(
        n.startswith("kernels/") for n in manifest["files"]
    )
    # Block parity: the module in float32 (6.4 GB) beside the fused weights it reads (memory-mapped).
    code, blocks_peak = _moetrt("verify", str(out), "--blocks")
    assert code == 0 and blocks_peak < 12.0, blocks_peak
    code, decompose_peak = _moetrt("fuse", str(fused), "-o", str(tmp_path / "plain.onnx"), "--decompose")
    assert code == 0 and decompose_peak < 1.5, decompose_peak
    assert export_peak < 8.0, export_peak  # the exporter holds the block once (3.2 GB) plus its trace
    shutil.rmtree(tmp_path)  # ~16 GB of outputs: gone before the next real-size test


@pytest.mark.slow
def test_a_real_width_checkpoint_builds_from_disk(tmp_path: Path) -> None:
    """A 1-layer real-width Qwen3-Next checkpoint (4.5 GB, per-expert keys as released) straight to a build:
    the export streams from disk, parity checks the block against its module."""
    _needs_free_disk(tmp_path, 25)
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    script = Path(__file__).resolve().parents[1] / "bench" / "scale_checkpoint.py"
    subprocess.run([sys.executable, str(script), str(checkpoint), "--layers", "1"], check=True)
    code, export_peak = _moetrt("export", str(checkpoint), "--dtype", "bf16", "-o", str(tmp_path / "m.onnx"))
    assert code == 0 and export_peak < 3.5, export_peak  # the largest tensor (2.1 GB) plus a constant
    code, build_peak = _moetrt(
        "build", str(checkpoint), "-o", str(out), "--target", "h100", "--precision", "bf16"
    )
    assert code == 0 and build_peak < 12.0, build_peak
    manifest = read_manifest(out)
    parity = manifest["parity"]
    assert parity["checked"] and parity["passed"] and len(parity["rows"]) == 3
    shards = external_data_files(out / "model.onnx")  # 4.5 GB of weights: past one 4 GiB shard
    assert len(shards) == 2 and all(s.name in manifest["files"] for s in shards)
    verify_files(manifest, out)
    shutil.rmtree(tmp_path)
