"""`verify`: shapes, the report, failures it must catch, files it must refuse, and fused-style models whose
custom-domain nodes carry local function bodies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from moetrt.cli import parse_shapes
from moetrt.core.errors import MoetrtError
from moetrt.core.tolerances import TOLERANCES
from moetrt.export.onnx_export import META_SOURCE, export_onnx
from moetrt.verify.compare import compare_outputs as _compare
from moetrt.verify.compare import default_shapes
from moetrt.verify.model import verify


@pytest.fixture(scope="module")
def mixtral_block(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "mixtral_block.onnx"
    export_onnx("demo:mixtral:block", out)
    return out


def test_parse_shapes() -> None:
    assert parse_shapes("1x8, 3X16,2x80") == [(1, 8), (3, 16), (2, 80)]
    for bad in ("", "1x", "0x8", "8", "1x2x3", "ax4"):
        with pytest.raises(MoetrtError) as err:
            parse_shapes(bad)
        assert "BATCHxSEQ" in err.value.one_line()


def test_default_shapes_cover_batch_one_larger_batch_and_long_sequence() -> None:
    shapes = default_shapes((2, 8), long_seq=130)
    assert (1, 7) in shapes
    assert any(batch > 2 for batch, _ in shapes)
    assert any(seq >= 130 for _, seq in shapes)
    # A long example sequence still gets a longer check.
    assert max(seq for _, seq in default_shapes((2, 200), long_seq=72)) > 200


def test_report_table(mixtral_block: Path) -> None:
    messages: list[str] = []
    report = verify(mixtral_block, shapes=[(1, 3), (4, 9)], seed=3, progress=messages.append)
    assert report.passed and report.dtype == "fp32" and report.reference == "demo:mixtral:block"
    assert [row.shape for row in report.rows] == [(1, 3), (4, 9)]
    table = report.format_table().splitlines()
    assert table[0].split() == ["shape", "output", "max", "abs", "err", "rel", "err", "tolerance", "result"]
    assert table[2].startswith("1x3") and table[3].startswith("4x9") and "PASS" in table[3]
    assert table[-1].startswith("PASS: 2/2")
    assert any("onnxruntime" in m for m in messages)


def test_wrong_reference_fails(mixtral_block: Path) -> None:
    """Same signature, different weights: verify must report a failure, not pass."""
    report = verify(mixtral_block, reference="demo:olmoe:block")
    assert not report.passed
    assert all(not row.passed and row.rel_err > 0.1 for row in report.rows)
    assert "FAIL" in report.format_table().splitlines()[-1]


def test_reference_with_other_inputs_is_refused(mixtral_block: Path) -> None:
    with pytest.raises(MoetrtError, match="takes inputs") as err:
        verify(mixtral_block, reference="demo:mixtral")
    assert "--reference" in err.value.hint


def test_model_spec_is_exported_first() -> None:
    report = verify("demo:olmoe:block")
    assert report.passed and report.artifact == "demo:olmoe:block" and len(report.rows) == 3


def test_fused_style_model_with_local_function_verifies(mixtral_block: Path, tmp_path: Path) -> None:
    """The whole graph moved into one custom-domain node whose body is a model-local function, as the
    fuse pass writes them: onnxruntime runs the body, and verify needs no change."""
    model = onnx.load(str(mixtral_block))
    graph = model.graph
    inputs = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    outputs = [o.name for o in graph.output]
    body = helper.make_function(
        "moetrt.test", "WholeBlock", inputs, outputs, list(graph.node), list(model.opset_import)
    )
    del graph.node[:]
    del graph.value_info[:]
    graph.node.append(helper.make_node("WholeBlock", inputs, outputs, domain="moetrt.test"))
    model.functions.append(body)
    model.opset_import.append(helper.make_opsetid("moetrt.test", 1))
    fused = tmp_path / "fused.onnx"
    onnx.save(model, str(fused))

    assert [n.domain for n in onnx.load(str(fused)).graph.node] == ["moetrt.test"]
    report = verify(fused)  # the reference comes from the metadata, which the rewrite kept
    assert report.passed, report.format_table()


def test_missing_metadata_asks_for_reference(mixtral_block: Path, tmp_path: Path) -> None:
    model = onnx.load(str(mixtral_block))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(MoetrtError, match=f"no {META_SOURCE} metadata") as err:
        verify(bare)
    assert "--reference" in err.value.hint
    assert verify(bare, reference="demo:mixtral:block", shapes=[(1, 5)]).passed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not an onnx model", "is not a readable ONNX model"),
        (b"", "is empty"),
    ],
)
def test_corrupt_onnx_is_refused(content: bytes, message: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(MoetrtError, match=message) as err:
        verify(bad)
    assert "moetrt export" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_truncated_onnx_is_refused(mixtral_block: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(mixtral_block.read_bytes()[:5000])
    with pytest.raises(MoetrtError, match=r"cut\.onnx") as err:
        verify(cut)
    assert "\n" not in err.value.one_line()


def test_missing_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(MoetrtError, match="does not exist"):
        verify(tmp_path / "nowhere.onnx")


def test_compare_flags_shape_mismatch_and_non_finite() -> None:
    ref = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    row = _compare(ref[:, :2], ref, (2, 3), "out", TOLERANCES["fp32"])
    assert not row.passed and "shape" in row.note
    broken = ref.copy()
    broken[0, 0, 0] = np.nan
    row = _compare(broken, ref, (2, 3), "out", TOLERANCES["fp32"])
    assert not row.passed and "non-finite" in row.note
    row = _compare(ref * (1 + 2e-5), ref, (2, 3), "out", TOLERANCES["fp32"])
    assert not row.passed and row.rel_err == pytest.approx(2e-5, rel=1e-3)
    row = _compare(ref * (1 + 2e-5), ref, (2, 3), "out", TOLERANCES["fp16"])
    assert row.passed
