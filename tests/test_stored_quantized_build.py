"""Checkpoints whose experts are stored quantized, built end to end: the fused nodes keep the stored codes.

Made locally (tests/moetrt_testing/stored_checkpoints.py) in three formats and families: FP8 blocks (Qwen3-MoE,
one attention projection FP8 too), GPTQ 4-bit with zero points (Mixtral: stored under `block_sparse_moe` with
w1/w3/w2), GPT-OSS's MXFP4 (gate / up rows interleaved, biases beside). Each builds into a TensorRT-RTX engine
(fp32) whose parity against the PyTorch model (its experts dequantized from the same codes) must pass, and the
written model must hold exactly the stored codes and scales, no float expert table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from moetrt_testing import stored_checkpoints

from moetrt.cli import main
from moetrt.op.spec import DOMAIN, OP_TYPE, MoEAttributes

pytest.importorskip("tensorrt_rtx_bindings")

CASES = {
    "fp8-qwen3_moe": (lambda out: stored_checkpoints.fp8_checkpoint("qwen3_moe", out), "fp8_block", 16),
    "gptq-mixtral": (lambda out: stored_checkpoints.gptq_checkpoint("mixtral", out), "int4", 16),
    "mxfp4-gpt_oss": (stored_checkpoints.gpt_oss_mxfp4_checkpoint, "mxfp4", 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stored_quantized_checkpoint_builds_with_its_own_codes(case: str, tmp_path: Path) -> None:
    make, weight_format, block = CASES[case]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    stored = make(model_dir)
    out = tmp_path / "build"
    result = CliRunner().invoke(
        main,
        ["build", str(model_dir), "-o", str(out), "--engine-backend", "tensorrt-rtx", "--target", "rtx40",
         "--precision", "fp32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["checked"] > 0
    quant = manifest["quantization"]
    assert quant["format"] == weight_format and quant["block"] == [block]
    assert quant["method"].startswith("stored by the checkpoint")
    model = ir.load(out / "model.onnx")
    nodes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP_TYPE]
    layers = sorted(stored, key=lambda name: int(name.split("layers.")[1].split(".")[0]))
    assert len(nodes) == len(layers) > 0
    for node, layer in zip(nodes, layers, strict=True):
        attrs = MoEAttributes.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
        assert (attrs.weight_format, attrs.weight_block) == (weight_format, block)
        by_name = dict(zip(attrs.present_inputs(), node.inputs, strict=True))
        for which, table in zip(("gate_up", "down"), stored[layer], strict=True):
            codes = by_name[f"expert_{which}_weight"].const_value.numpy()
            np.testing.assert_array_equal(codes, table.codes.numpy())
            np.testing.assert_array_equal(
                by_name[f"expert_{which}_scale"].const_value.numpy(), table.scale.numpy()
            )
            if table.zero is not None:
                np.testing.assert_array_equal(
                    by_name[f"expert_{which}_zero"].const_value.numpy(), table.zero.numpy()
                )
    # no float expert table was written beside the codes (scales and biases are float by the format)
    floats = [
        v.name
        for v in model.graph.initializers.values()
        if "expert" in v.name
        and v.dtype in (ir.DataType.FLOAT, ir.DataType.BFLOAT16)
        and not any(part in v.name for part in ("scale", "bias"))
    ]
    assert floats == []


def test_stored_quantized_checkpoint_refusals(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    stored_checkpoints.fp8_checkpoint("qwen3_moe", model_dir)
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(model_dir), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code != 0 and "would be written in float" in result.output
    assert not (tmp_path / "m.onnx").exists()
    out = tmp_path / "build"
    result = runner.invoke(
        main,
        ["build", str(model_dir), "-o", str(out), "--engine-backend", "tensorrt-rtx", "--target", "rtx40",
         "--precision", "fp32", "--weights", "int4"],
    )  # fmt: skip
    assert result.exit_code != 0 and "already stored as fp8_block" in result.output
    assert not out.exists()


def test_stored_quantized_checkpoint_streamed_from_disk(tmp_path: Path) -> None:
    """Above the streaming bound the model is traced on the meta device and every value read when written: the
    same fused model, its experts the stored codes, as the in-memory export (which passed its self-check)."""
    import onnxruntime as ort

    from moetrt.build import _stored_experts_fused
    from moetrt.export.onnx_export import export_onnx

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    stored = stored_checkpoints.fp8_checkpoint("qwen3_moe", model_dir)
    for stream in (True, False):
        export_onnx(
            str(model_dir),
            tmp_path / f"s{stream}.onnx",
            dtype="fp32",
            stream=stream,
            rewrite=_stored_experts_fused,
        )
    model = ir.load(tmp_path / "sTrue.onnx")
    nodes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP_TYPE]
    for node, layer in zip(nodes, sorted(stored), strict=True):
        attrs = MoEAttributes.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
        by_name = dict(zip(attrs.present_inputs(), node.inputs, strict=True))
        np.testing.assert_array_equal(
            by_name["expert_gate_up_weight"].const_value.numpy(), stored[layer][0].codes.numpy()
        )
    sessions = [ort.InferenceSession(str(tmp_path / f"s{s}.onnx")) for s in (True, False)]
    rng = np.random.default_rng(0)
    feeds = {}
    for value in sessions[0].get_inputs():
        shape = [
            2 if d == "batch" else 5 if d in ("seq", "total") else 0 if d == "past" else d
            for d in value.shape
        ]
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 512, shape).astype(np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones(shape, dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(5, dtype=np.int64), (2, 1))
        else:
            feeds[value.name] = np.zeros(shape, dtype=np.float32)
    streamed, in_memory = (s.run(["logits"], feeds)[0] for s in sessions)
    np.testing.assert_allclose(streamed, in_memory, rtol=1e-5, atol=1e-6)
