"""Export from disk (`export.offloaded`): a Hugging Face checkpoint traced on the meta device, its weights read
one at a time while written, gives the same file as the in-memory export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from moetrt.export.demo_models import build_demo
from moetrt.export.offloaded import STREAM_MIN_BYTES
from moetrt.export.onnx_export import export_onnx
from moetrt.passes.pipeline import fuse_file


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-Next (linear attention, per-expert weights merged by transformers on load) in many shards."""
    model_dir = tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-next"
    build_demo("qwen3_next").module.model.save_pretrained(model_dir, max_shard_size="200KB")
    assert len(list(model_dir.glob("*.safetensors"))) > 2
    return model_dir


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_export_writes_the_same_model_as_the_in_memory_one(
    sharded_checkpoint: Path, tmp_path: Path, dtype: str
) -> None:
    streamed, in_memory = tmp_path / "streamed.onnx", tmp_path / "in_memory.onnx"
    result = export_onnx(str(sharded_checkpoint), streamed, dtype=dtype, stream=True)
    export_onnx(str(sharded_checkpoint), in_memory, dtype=dtype, stream=False)
    assert result.num_moe_blocks == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in_memory.onnx",
        "streamed.onnx",
    ]  # no offload left

    got, want = _initializers(streamed), _initializers(in_memory)
    if dtype == "bf16":
        # The one difference: the streamed export keeps buffers as transformers loads them (the rotary
        # frequencies in float32), where the in-memory model was cast to bf16 whole (frequencies rounded).
        got = {k: v for k, v in got.items() if not k.endswith("inv_freq") and not k.startswith("_to_copy")}
        want = {k: v for k, v in want.items() if not k.startswith("_to_copy")}
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name
    a, b = onnx.load(streamed, load_external_data=False), onnx.load(in_memory, load_external_data=False)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert fuse_file(streamed, tmp_path / "fused.onnx").num_fused == 2


def test_large_checkpoints_stream_by_default(sharded_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from moetrt.export import offloaded

    messages: list[str] = []
    monkeypatch.setattr(offloaded, "STREAM_MIN_BYTES", 1)
    export_onnx(str(sharded_checkpoint), tmp_path / "m.onnx", progress=messages.append)
    assert any("from disk" in m for m in messages)
    assert any("self-check skipped" in m for m in messages)
    assert STREAM_MIN_BYTES == 2 << 30
