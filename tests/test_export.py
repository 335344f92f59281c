"""`export_onnx` + `verify`: every demo family (block and whole model), Hugging Face directories, user
modules, dtypes, external data, and what a failed export leaves behind (nothing)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from moetrt.core import onnx_io
from moetrt.core.errors import MoetrtError
from moetrt.core.tolerances import TOLERANCES
from moetrt.export import onnx_export
from moetrt.export.demo_models import DEMO_FAMILIES, build_demo
from moetrt.export.onnx_export import MAX_IR_VERSION, META_DTYPE, META_SOURCE, export_onnx
from moetrt.verify.model import verify

DATA = Path(__file__).parent / "data"
CUSTOM = DATA / "custom_moe.py"

# Whole-model exports take 7-30 s each on 2 cores: two families in the default run, the rest under -m slow.
_FAST_WHOLE = {"qwen3_next", "deepseek_v3"}
WHOLE_MODEL_CASES = [
    pytest.param(f, marks=() if f in _FAST_WHOLE else pytest.mark.slow, id=f) for f in DEMO_FAMILIES
]


def _assert_valid_export(path: Path, spec: str, dtype: str = "fp32") -> onnx.ModelProto:
    """IR that onnxruntime accepts, the source in metadata, dynamic batch and sequence, type-checked."""
    model = onnx.load(str(path))
    assert model.ir_version <= MAX_IR_VERSION
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[META_SOURCE] == spec and meta[META_DTYPE] == dtype
    first_input = model.graph.input[0].type.tensor_type.shape.dim
    assert first_input[0].dim_param and first_input[1].dim_param, "batch and sequence must stay symbolic"
    onnx.checker.check_model(model, full_check=True)
    return model


def _assert_verified(path: Path, expected_seq_at_least: int = 65, decoder: bool = False) -> None:
    report = verify(path)
    print(report.format_table())
    assert report.passed, report.format_table()
    shapes = [row.shape for row in report.rows]
    assert len(set(shapes)) >= 3
    assert any(shape[0] == 1 for shape in shapes)
    assert any(shape[0] > 2 for shape in shapes), "a batch above the export example (2)"
    assert any(shape[1] >= expected_seq_at_least for shape in shapes), "a sequence longer than any chunk"
    assert all(row.rel_err <= TOLERANCES["fp32"] for row in report.rows)
    if decoder:  # prefill after a past, and decode steps after a short and a long past
        assert any(shape[1] > 1 and len(shape) > 2 and shape[2] > 0 for shape in shapes)
        assert any(shape[1] == 1 and shape[2] >= expected_seq_at_least for shape in shapes)


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_block_exports_and_verifies(family: str, tmp_path: Path) -> None:
    out = tmp_path / "block.onnx"
    result = export_onnx(f"demo:{family}:block", out)
    assert result.path == out and out.is_file() and result.num_moe_blocks == 1
    assert result.external_data is None and result.opset == 18 and result.num_nodes > 0
    _assert_valid_export(out, f"demo:{family}:block")
    _assert_verified(out)
    # Decode-like shapes: one token, and a batch of single tokens.
    assert verify(out, shapes=[(1, 1), (5, 1)]).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx"]  # no temp files left


@pytest.mark.parametrize("family", WHOLE_MODEL_CASES)
def test_whole_model_exports_and_verifies(family: str, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    messages: list[str] = []
    result = export_onnx(f"demo:{family}", out, progress=messages.append)
    assert result.num_moe_blocks == build_demo(family).num_moe_blocks >= 1
    assert any("exporting" in m for m in messages) and any("found" in m for m in messages)
    _assert_valid_export(out, f"demo:{family}")
    # Qwen3-Next's linear attention runs in 64-token chunks: verify crosses two chunk boundaries.
    _assert_verified(out, expected_seq_at_least=129 if family == "qwen3_next" else 65, decoder=True)
    if family == "qwen3_next":  # the chunk edges themselves, and several chunks
        report = verify(out, shapes=[(1, 1), (1, 64), (1, 65), (3, 200)])
        assert report.passed, report.format_table()


def test_hf_directory_exports_and_verifies(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny-qwen3-moe"
    demo = build_demo("qwen3_moe")
    demo.module.model.save_pretrained(model_dir)
    assert (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors"))

    out = tmp_path / "hf.onnx"
    result = export_onnx(str(model_dir), out)
    assert result.num_moe_blocks == 2
    _assert_valid_export(out, str(model_dir.resolve()))
    _assert_verified(out)
    # The reference is the saved weights: the directory's logits equal the demo's own.
    ids = demo.make_inputs(1, 9, seed=5)
    from moetrt.export.model_source import load_model

    torch.testing.assert_close(load_model(str(model_dir)).run(ids)[0], demo.run(ids)[0], rtol=0, atol=0)


@pytest.mark.slow
def test_sharded_hf_directory_with_linear_attention(tmp_path: Path) -> None:
    """Qwen3-Next saved in many safetensors shards: the chunked linear attention is found on this path too."""
    model_dir = tmp_path / "tiny-qwen3-next"
    build_demo("qwen3_next").module.model.save_pretrained(model_dir, max_shard_size="100KB")
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    out = tmp_path / "next.onnx"
    assert export_onnx(str(model_dir), out).num_moe_blocks == 2
    _assert_verified(out, expected_seq_at_least=129)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"config.json": "{not json"}, "is not valid JSON"),
        ({"config.json": '{"model_type": "mixtral"}'}, "has no *.safetensors weights"),
        (
            {"config.json": '{"model_type": "no_such_arch"}', "model.safetensors": ""},
            "transformers cannot read",
        ),
        (
            {
                "config.json": '{"model_type": "qwen3_moe", "quantization_config": {"quant_method": "gptq", '
                '"bits": 4, "group_size": 128, "desc_act": true}}',
                "model.safetensors": "",
            },
            "a gptq-quantized checkpoint with act-order (desc_act)",
        ),
        (
            {
                "config.json": '{"model_type": "qwen3_moe", "quantization_config": {"quant_method": "bitsandbytes", '
                '"load_in_4bit": true}}',
                "model.safetensors": "",
            },
            "a bitsandbytes-quantized checkpoint is not read; moetrt reads fine-grained FP8",
        ),
    ],
    ids=["bad-json", "no-weights", "unknown-model-type", "act-order-gptq", "unsupported-quantization"],
)
def test_broken_hf_directory(files: dict[str, str], message: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name, text in files.items():
        (model_dir / name).write_text(text)
    with pytest.raises(MoetrtError) as err:
        export_onnx(str(model_dir), tmp_path / "out.onnx")
    assert message in err.value.one_line() and err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_custom_module_exports_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "custom.onnx"
    result = export_onnx(f"module:{CUSTOM}:make_moe", out)
    assert result.num_moe_blocks == 1
    assert result.spec == f"module:{CUSTOM.resolve()}:make_moe"
    _assert_valid_export(out, result.spec)
    _assert_verified(out)


def test_model_without_moe_exports_and_reports_zero(tmp_path: Path) -> None:
    out = tmp_path / "dense.onnx"
    messages: list[str] = []
    result = export_onnx(f"module:{CUSTOM}:make_dense", out, progress=messages.append)
    assert result.num_moe_blocks == 0 and out.is_file()
    assert "0 MoE blocks found" in result.summary()
    assert any("found 0 MoE block" in m for m in messages)
    assert verify(out).passed


def test_fp16_export_verifies_within_fp16_tolerance(tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    result = export_onnx("demo:qwen3_next:block", out, dtype="fp16")
    assert result.dtype == "fp16"
    model = _assert_valid_export(out, "demo:qwen3_next:block", dtype="fp16")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = verify(out)
    assert report.passed and report.dtype == "fp16", report.format_table()
    # fp16 rounding is visible, and bounded by the fp16 tolerance rather than fp32's.
    assert all(TOLERANCES["fp32"] < row.rel_err <= TOLERANCES["fp16"] for row in report.rows)


def test_bf16_export_is_valid_and_verifies_as_its_float32_widening(tmp_path: Path) -> None:
    out = tmp_path / "bf16.onnx"
    result = export_onnx("demo:mixtral:block", out, dtype="bf16")
    assert result.opset == onnx_export.MIN_BF16_OPSET and result.dtype == "bf16"
    model = _assert_valid_export(out, "demo:mixtral:block", dtype="bf16")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    report = verify(
        out
    )  # onnxruntime's CPU provider has no bf16 kernels: the exact widening runs, and says so
    assert report.passed and report.dtype == "bf16", report.format_table()
    assert any("exact float32 widening" in line for line in report.findings)


def test_bf16_below_opset_22_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "bf16.onnx"
    with pytest.raises(MoetrtError, match="bf16 needs opset 22"):
        export_onnx("demo:mixtral:block", out, dtype="bf16", opset=18)
    assert not out.exists()


def test_opset_option(tmp_path: Path) -> None:
    out = tmp_path / "op23.onnx"
    result = export_onnx("demo:olmoe:block", out, opset=23)
    model = onnx.load(str(out))
    assert result.opset == 23
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    assert verify(out).passed
    with pytest.raises(MoetrtError, match="opset 12 is not supported"):
        export_onnx("demo:olmoe:block", tmp_path / "op12.onnx", opset=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op23.onnx"]


def test_external_data_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 2 GB model is too big for a unit test: lower the threshold instead.
    limit = onnx_io.PROTOBUF_LIMIT
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1024)
    out = tmp_path / "ext.onnx"
    result = export_onnx("demo:mixtral:block", out)
    assert result.external_data == tmp_path / "ext.onnx.data" and result.external_data.is_file()
    assert out.stat().st_size < result.external_data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert verify(out).passed

    # Re-exporting under the same name without external data removes the stale data file.
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", limit)
    assert export_onnx("demo:mixtral:block", out).external_data is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("demo:llama", "unknown demo family 'llama'"),
        ("demo:mixtral:blocks", "cannot parse demo spec"),
        ("does/not/exist", "does not exist"),
        (f"module:{CUSTOM}:make_raises", "make_raises() raised RuntimeError: weights file not found"),
        (f"module:{CUSTOM}:no_such_factory", "has no function 'no_such_factory'"),
        (
            f"module:{CUSTOM}:make_fails_to_export",
            "NotImplementedError: custom kernel without an export path",
        ),
        (f"module:{DATA}/missing.py:make", "does not exist"),
        (f"module:{CUSTOM}:make_not_a_module", "did not return an nn.Module"),
        ("module:no_factory_given.py", "cannot parse"),
    ],
)
def test_bad_model_leaves_nothing_behind(spec: str, message: str, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(MoetrtError) as err:
        export_onnx(spec, out)
    assert message in err.value.one_line()
    assert err.value.hint, "every error says what to do"
    assert list(tmp_path.iterdir()) == []


def test_directory_without_config_json(tmp_path: Path) -> None:
    model_dir = tmp_path / "weights_only"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out.onnx"
    with pytest.raises(MoetrtError, match=r"has no config\.json") as err:
        export_onnx(str(model_dir), out)
    assert "config.json" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights_only"]


def test_output_must_be_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(MoetrtError, match=r"does not end in \.onnx"):
        export_onnx("demo:mixtral:block", tmp_path / "model.bin")
    with pytest.raises(MoetrtError, match="is a directory"):
        (tmp_path / "dir.onnx").mkdir()
        export_onnx("demo:mixtral:block", tmp_path / "dir.onnx")


def test_failed_export_keeps_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(MoetrtError):
        export_onnx(f"module:{CUSTOM}:make_fails_to_export", out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
