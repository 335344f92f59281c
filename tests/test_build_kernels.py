"""`moetrt build`'s plugin-engine path before TensorRT runs: one AOT compilation per distinct MoE variant of
the model, for the target SM and build precision, reused by every plugin instance (the compiler is replaced by
a recorder here; tests/test_plugin_fields.py and the aot tests compile real cubins), and the refusal of a
machine TensorRT cannot build the target on."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from moetrt_testing.single_op_model import single_moe_model
from onnx import helper

from moetrt.build import BuildOptions, _compile_kernels, _node_attributes, build
from moetrt.core.errors import MoetrtError
from moetrt.kernels import configs
from moetrt.op.spec import MoEAttributes
from moetrt.trt.targets import resolve_target

SMALL = MoEAttributes(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
GROUPED = MoEAttributes(
    num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, scoring="sigmoid", n_group=2, topk_group=1
)


def _as_stored(attrs: MoEAttributes) -> MoEAttributes:
    """The attributes as an ONNX node stores them (floats as float32), which is what the plugin sees too."""
    return _node_attributes(helper.make_node("MoE", [], [], **attrs.to_onnx_attributes()))


def _three_layer_model() -> onnx.ModelProto:
    """Two layers sharing one variant and a third of another: only the MoE nodes and their attributes matter."""
    model, _ = single_moe_model(SMALL, torch.float16)
    node = model.graph.node[0]
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    twin.name = "moe_1"
    other = helper.make_node(
        node.op_type,
        list(node.input),
        ["other_out"],
        name="moe_2",
        domain=node.domain,
        **GROUPED.to_onnx_attributes(),
    )
    model.graph.node.extend([twin, other])
    return model


def test_one_compilation_per_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[MoEAttributes, str, int]] = []

    def recorder(attrs: MoEAttributes, dtype: str, sm: int, workers: int = 1) -> bytes:
        calls.append((attrs, dtype, sm))
        assert workers >= 1
        return b"MOETRTKB" + bytes([len(calls)]) * 10

    monkeypatch.setattr("moetrt.trt.plugin.compile_kernel_bytes", recorder)
    lines: list[str] = []
    timings: dict[str, float] = {}
    summary, cache = _compile_kernels(
        _three_layer_model(), resolve_target("a100"), "bf16", lines.append, timings
    )
    small, grouped = _as_stored(SMALL), _as_stored(GROUPED)
    assert sorted(calls, key=repr) == sorted([(small, "bf16", 80), (grouped, "bf16", 80)], key=repr)
    assert set(cache) == {(small, "bf16", 80), (grouped, "bf16", 80)}
    assert summary == {"sm": 80, "variants": 2, "bytes": 36, "config_tables": configs.table_sources(80)}
    assert len(lines) == 2 and all("sm_80 bf16" in line for line in lines)
    assert timings["kernels"] >= 0


def test_node_attributes_round_trip() -> None:
    model, _ = single_moe_model(GROUPED, torch.float32)
    read = _node_attributes(model.graph.node[0])
    assert read == _as_stored(GROUPED)
    assert read.swiglu_alpha == pytest.approx(GROUPED.swiglu_alpha, rel=1e-7)


@pytest.mark.parametrize(
    ("device_sm", "message"),
    [(None, "TensorRT builds engines on a CUDA GPU"), (89, r"builds for the GPU it runs on \(SM 89\)")],
)
def test_tensorrt_path_refuses_a_machine_it_cannot_build_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device_sm: int | None, message: str
) -> None:
    # With `tensorrt` importable, a missing or different GPU is refused before the export starts.
    monkeypatch.setattr("moetrt.build._importable", lambda module: module == "tensorrt")
    monkeypatch.setattr("moetrt.trt.trt_build.current_device_sm", lambda: device_sm)
    monkeypatch.setattr(
        "moetrt.export.onnx_export.export_onnx", lambda *a, **k: pytest.fail("exported before the check")
    )
    with pytest.raises(MoetrtError, match=message):
        build("demo:mixtral:block", tmp_path / "out", BuildOptions(target="h100"))
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_names_the_config_tables(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """With $MOETRT_KERNEL_CONFIGS set, the build says which tables its kernels' configs came from, and the
    summary (the manifest's engine.kernels) lists the package's table and then the overlay's."""
    monkeypatch.setattr("moetrt.trt.plugin.compile_kernel_bytes", lambda *a, **k: b"MOETRTKB")
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "sm90.json").write_text(json.dumps({"entries": {}}))
    monkeypatch.setenv(configs.KERNEL_CONFIGS_ENV, str(folder))
    lines: list[str] = []
    summary, _ = _compile_kernels(_three_layer_model(), resolve_target("h100"), "bf16", lines.append, {})
    overlay = str((folder / "sm90.json").resolve())
    assert summary["config_tables"] == ["moetrt/kernels/configs/sm90.json", overlay]
    assert lines[0] == f"kernel configs for sm_90: {overlay} over moetrt/kernels/configs/sm90.json"
    monkeypatch.delenv(configs.KERNEL_CONFIGS_ENV)
    assert configs.table_sources(90) == ["moetrt/kernels/configs/sm90.json"]
    assert configs.table_sources(75) == []
