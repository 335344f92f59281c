"""End to end on the demo models of all seven families: export -> fuse -> one fused node per MoE layer, no
expert gathers left, nothing unexplained, and the fused model still matches PyTorch.

Blocks (`demo:<family>:block`) run in fp32, fp16 and bf16 in the default run; whole causal LMs run in fp32
(one family by default, all of them under the `slow` marker). onnxruntime's CPU provider cannot take bf16
inputs from numpy (and lacks most bf16 kernels), so bf16 blocks are fed through a float32 -> bf16 Cast added
in front of the fused model; the fused op's body itself runs in bf16 there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, invoke
from moetrt_testing.graphs import expert_table_gathers, fused_nodes, rel_err, run_onnx
from onnx import TensorProto, helper

from moetrt.cli import main
from moetrt.core.artifacts import META_FUSED_MOE as METADATA_KEY
from moetrt.core.tolerances import tolerance
from moetrt.export.demo_models import DEMO_FAMILIES, build_demo
from moetrt.export.onnx_export import export_onnx
from moetrt.passes import decompose_model, fuse_file, fuse_model
from moetrt.verify.model import verify

WHOLE_FAST = ("mixtral",)  # whole-model families in the default run; the rest are `slow`


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuse_demo")


@functools.cache
def _exported(workdir: Path, spec: str, dtype: str) -> tuple[Path, int]:
    path = workdir / f"{spec.replace(':', '_')}_{dtype}.onnx"
    result = export_onnx(spec, path, dtype=dtype)
    return path, result.num_moe_blocks


def _fuse_and_check(workdir: Path, spec: str, dtype: str) -> Path:
    """Export, fuse, and check the structural claims; returns the fused file."""
    path, num_moe_layers = _exported(workdir, spec, dtype)
    fused_path = path.with_suffix(".fused.onnx")
    result = fuse_file(path, fused_path, explain=True)
    assert num_moe_layers >= 1
    assert result.num_fused == num_moe_layers, result.unfused_candidates
    assert result.unfused_candidates == []  # what `moetrt fuse --explain` lists
    model = onnx.load(str(fused_path))
    assert len(fused_nodes(model)) == num_moe_layers
    assert not expert_table_gathers(model)
    assert not [n for n in model.graph.node if n.op_type == "TopK"]  # routing went into the fused nodes too
    assert model.ir_version <= 10
    assert {p.key: p.value for p in model.metadata_props}[METADATA_KEY] == str(num_moe_layers)
    return fused_path


def _verify_passes(fused_path: Path, spec: str) -> None:
    report = verify(fused_path, reference=spec)
    assert len(report.rows) >= 3 and report.passed, report.format_table()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_block_fuses_and_verifies(workdir: Path, family: str, dtype: str) -> None:
    spec = f"demo:{family}:block"
    _verify_passes(_fuse_and_check(workdir, spec, dtype), spec)


def _with_float32_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (bf16 input/output) wrapped in Casts so that float32 arrays can be fed and read."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    (x,), (y,) = graph.input, graph.output
    graph.node.insert(0, helper.make_node("Cast", [f"{x.name}_f32"], [x.name], to=TensorProto.BFLOAT16))
    graph.node.append(helper.make_node("Cast", [y.name], [f"{y.name}_f32"], to=TensorProto.FLOAT))
    x_f32 = helper.make_tensor_value_info(f"{x.name}_f32", TensorProto.FLOAT, None)
    x_f32.type.tensor_type.shape.CopyFrom(x.type.tensor_type.shape)
    y_f32 = helper.make_tensor_value_info(f"{y.name}_f32", TensorProto.FLOAT, None)
    del graph.input[:], graph.output[:]
    graph.input.append(x_f32)
    graph.output.append(y_f32)
    return model


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_block_fuses_in_bf16(workdir: Path, family: str) -> None:
    spec = f"demo:{family}:block"
    fused_path = _fuse_and_check(workdir, spec, "bf16")
    runnable = _with_float32_io(onnx.load(str(fused_path)))
    # The reference is the block with the same bf16 weights run in float32: the op computes in float32 from
    # bf16 inputs (moe_reference), so it routes on float32 logits, while a bf16 PyTorch run rounds the logits
    # to bf16 first and near-ties then pick other experts for some tokens.
    loaded = build_demo(family, block=True, dtype=torch.bfloat16)
    module = loaded.module.float()
    for seed, (batch, seq) in enumerate([(1, 1), (2, 9), (3, 40)]):
        (x,) = loaded.make_inputs(batch, seq, seed)
        with torch.no_grad():
            want = module(x.float())
        got = run_onnx(runnable, {runnable.graph.input[0].name: x.float().numpy()})[0]
        assert rel_err(got, want) <= tolerance("bf16"), (family, batch, seq)


def _whole_params() -> list[object]:
    return [pytest.param(f, marks=() if f in WHOLE_FAST else pytest.mark.slow) for f in DEMO_FAMILIES]


@pytest.mark.parametrize("family", _whole_params())
def test_whole_model_fuses_every_layer_and_verifies(workdir: Path, family: str) -> None:
    spec = f"demo:{family}"
    _verify_passes(_fuse_and_check(workdir, spec, "fp32"), spec)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_whole_model_fuses_in_half_precision(workdir: Path, family: str, dtype: str) -> None:
    fused_path = _fuse_and_check(workdir, f"demo:{family}", dtype)
    if dtype == "fp16":
        _verify_passes(fused_path, f"demo:{family}")


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_decompose_of_fuse_equals_the_original(workdir: Path, family: str) -> None:
    path, _ = _exported(workdir, f"demo:{family}:block", "fp32")
    original = onnx.load(str(path))
    decomposed = decompose_model(fuse_model(original).model)
    assert not fused_nodes(decomposed) and not [f for f in decomposed.functions if f.domain == "moetrt"]
    loaded = build_demo(family, block=True)
    for seed, (batch, seq) in enumerate([(1, 1), (2, 9), (3, 40)]):
        (x,) = loaded.make_inputs(batch, seq, seed)
        feeds = {original.graph.input[0].name: x.numpy()}
        assert rel_err(run_onnx(decomposed, feeds)[0], run_onnx(original, feeds)[0]) <= 1e-6


# ------------------------------------------------------------------------------------------------ no MoE
def _dense_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 8])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_model_without_moe_comes_back_unchanged(tmp_path: Path) -> None:
    model = _dense_model()
    result = fuse_model(model)
    assert result.num_fused == 0 and result.unfused_candidates == []
    assert result.model.graph.SerializeToString() == model.graph.SerializeToString()
    assert any("0 MoE blocks" in line for line in result.summary_lines())
    path = tmp_path / "dense.onnx"
    onnx.save(model, str(path))
    out = CliRunner().invoke(main, ["fuse", str(path), "-o", str(tmp_path / "dense.fused.onnx")])
    assert out.exit_code == 0 and "0 MoE blocks" in out.output


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_fuse_explain_and_decompose(workdir: Path, tmp_path: Path) -> None:
    path, _ = _exported(workdir, "demo:qwen3_next:block", "fp32")
    fused = tmp_path / "fused.onnx"
    out = CliRunner().invoke(main, ["fuse", str(path), "-o", str(fused), "--explain"])
    assert out.exit_code == 0, out.output
    for name in ("cleanup", "fuse_moe", "pack_weights"):
        assert any(
            line.split()[:1] == [name] and line.rstrip().endswith("ms") for line in out.output.splitlines()
        )
    assert "1 MoE blocks fused, 0 unfused candidates" in out.output
    decomposed = tmp_path / "decomposed.onnx"
    out = CliRunner().invoke(main, ["fuse", str(fused), "-o", str(decomposed), "--decompose"])
    assert out.exit_code == 0, out.output
    assert "1 fused MoE nodes inlined back to standard ops" in out.output
    model = onnx.load(str(decomposed))
    assert not fused_nodes(model) and not model.functions


@pytest.mark.parametrize(
    "case", ["missing", "corrupt", "not_onnx_suffix", "same_path", "directory", "out_directory"]
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    src = tmp_path / "in.onnx"
    dst = tmp_path / "out.onnx"
    if case == "corrupt":
        src.write_bytes(b"this is not a protobuf \x00\xff\x13")
    elif case in ("not_onnx_suffix", "same_path", "out_directory"):
        onnx.save(_dense_model(), str(src))
    elif case == "directory":
        src.mkdir()
    if case == "not_onnx_suffix":
        dst = tmp_path / "out.txt"
    if case == "same_path":
        dst = src
    if case == "out_directory":
        dst = tmp_path / "already_a_dir.onnx"
        dst.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = invoke("fuse", str(src), "-o", str(dst))
    assert_one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_large_models_are_written_with_external_data(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moetrt.core import onnx_io

    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1024)  # stands in for protobuf's 2 GiB
    path, _ = _exported(workdir, "demo:mixtral:block", "fp32")
    out = tmp_path / "fused.onnx"
    fuse_file(path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    assert out.stat().st_size < 100_000 < (tmp_path / "fused.onnx.data").stat().st_size
    model = onnx.load(str(out))  # loads the external data from beside the file
    assert len(fused_nodes(model)) == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    original = onnx.load(str(path))
    assert (
        rel_err(run_onnx(model, {"hidden_states": x})[0], run_onnx(original, {"hidden_states": x})[0]) <= 1e-5
    )


def test_input_with_external_data_is_checked_and_fused(workdir: Path, tmp_path: Path) -> None:
    """Weights read from external data (memory-mapped) still go through the fused op's numeric check."""
    path, _ = _exported(workdir, "demo:mixtral:block", "fp32")
    external = tmp_path / "ext.onnx"
    onnx.save(
        onnx.load(str(path)),
        str(external),
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    result = fuse_file(external, tmp_path / "fused.onnx")
    assert result.num_fused == 1 and not result.unfused_candidates, result.unfused_candidates
