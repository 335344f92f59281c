"""`verify_blocks` (`moetrt verify --blocks`, and build parity above the whole-model bound): each fused MoE block
against its PyTorch module, one block in memory at a time, from disk for a large checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import invoke
from onnx import numpy_helper

from moetrt import build as build_module
from moetrt.build_request import BuildOptions
from moetrt.core.errors import MoetrtError
from moetrt.core.tolerances import FUSION_CHECK_TOLERANCE
from moetrt.export import offloaded
from moetrt.export.demo_models import build_demo
from moetrt.export.onnx_export import export_onnx
from moetrt.passes.pipeline import fuse_file
from moetrt.verify.blocks import BLOCK_TOKENS, verify_blocks


def _fused(tmp_path: Path, spec: str, dtype: str = "fp32", stream: bool | None = None) -> Path:
    exported, fused = tmp_path / "m.onnx", tmp_path / "f.onnx"
    export_onnx(spec, exported, dtype=dtype, stream=stream)
    fuse_file(exported, fused)
    return fused


@pytest.fixture(scope="module")
def qwen3_moe_fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fused(tmp_path_factory.mktemp("blocks"), "demo:qwen3_moe")


def test_every_block_matches_its_module(qwen3_moe_fused: Path) -> None:
    report = verify_blocks(qwen3_moe_fused)
    assert report.passed, report.format_table()
    modules = [row.output for row in report.rows]
    assert modules == [
        m for m in ("model.model.layers.0.mlp", "model.model.layers.1.mlp") for _ in BLOCK_TOKENS
    ]
    assert {row.shape for row in report.rows} == {(1, t) for t in BLOCK_TOKENS}
    assert all(row.rel_err <= FUSION_CHECK_TOLERANCE for row in report.rows)


def test_a_wrong_weight_fails_only_its_block(qwen3_moe_fused: Path, tmp_path: Path) -> None:
    model = onnx.load(qwen3_moe_fused)
    second = [n for n in model.graph.node if n.op_type == "MoE"][1]
    for index, init in enumerate(model.graph.initializer):
        if init.name == second.input[2]:  # expert gate_up of layer 1
            broken = numpy_helper.to_array(init).copy()
            broken[0] *= np.float32(1.5)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(broken, init.name))
    broken_path = tmp_path / "broken.onnx"
    onnx.save(model, broken_path)
    report = verify_blocks(broken_path)
    assert not report.passed
    assert all(row.passed for row in report.rows if row.output.endswith("layers.0.mlp"))
    assert not all(row.passed for row in report.rows if row.output.endswith("layers.1.mlp"))


def test_a_large_checkpoint_is_checked_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "tiny-qwen3-next"
    build_demo("qwen3_next").module.model.save_pretrained(model_dir, max_shard_size="200KB")
    monkeypatch.setattr(offloaded, "STREAM_MIN_BYTES", 1)
    messages: list[str] = []
    fused = _fused(tmp_path, str(model_dir), dtype="bf16", stream=True)
    report = verify_blocks(fused, progress=messages.append)
    assert report.passed, report.format_table()
    assert any("from disk" in m for m in messages)
    assert len(report.rows) == 2 * len(BLOCK_TOKENS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("moetrt-blocks-")]  # offload folder gone


def test_build_above_the_whole_model_bound_checks_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_module, "PARITY_MAX_BYTES", 1)
    outdir = tmp_path / "out"
    result = build_module.build("demo:mixtral", outdir, BuildOptions(target="h100"))
    parity = json.loads((outdir / "manifest.json").read_text())["parity"]
    assert parity["checked"] and parity["passed"] and parity["scope"] == build_module.BLOCKS_SCOPE
    assert len(parity["rows"]) == 2 * len(BLOCK_TOKENS)
    assert "block parity PASS" in result.summary()


def test_a_model_without_fused_blocks_is_refused(tmp_path: Path) -> None:
    exported = tmp_path / "m.onnx"
    export_onnx("demo:mixtral", exported)
    with pytest.raises(MoetrtError, match="no fused moetrt::MoE node"):
        verify_blocks(exported)


def test_cli_blocks(qwen3_moe_fused: Path) -> None:
    code, out, _ = invoke("verify", str(qwen3_moe_fused), "--blocks")
    assert code == 0 and "model.model.layers.1.mlp" in out and "PASS: 6/6" in out
    code, _, err = invoke("verify", str(qwen3_moe_fused), "--blocks", "--per-layer")
    assert code == 1 and "--blocks" in err


def test_a_block_model_is_checked_too(tmp_path: Path) -> None:
    """A block export carries the exporter's shape bookkeeping outside any module scope: the fused node
    still names its block module."""
    from moetrt.core.artifacts import node_scopes

    assert node_scopes("['_empty_nn_module_stack_from_metadata_hook', 'sym_size_int_7']") == []
    assert node_scopes("['', 'block', 'block.experts', 'bmm_1']") == ["", "block", "block.experts"]
    report = verify_blocks(_fused(tmp_path, "demo:qwen3_next:block"))
    assert report.passed and {row.output for row in report.rows} == {"block"}, report.format_table()
