"""The export's self-check: it passes a faithful export, catches a wrong one, and fails the command unless told
to warn (nothing written then)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, invoke
from onnx import numpy_helper

from moetrt.export.model_source import load_model
from moetrt.export.onnx_export import export_onnx
from moetrt.export.self_check import OutputCheck, check_export


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_faithful_export_passes_and_a_wrong_file_fails(tmp_path: Path, dtype: str) -> None:
    loaded = load_model("demo:mixtral:block", dtype)
    path = tmp_path / "block.onnx"
    export_onnx(loaded, path, dtype=dtype, self_check="off")
    checks = check_export(path, loaded)
    assert [c.name for c in checks] == ["output"] and all(c.passed for c in checks), checks
    assert checks[0].rel_err > 0  # a real comparison, not an identical copy

    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight).astype(np.float32) * 1.5
    weight.CopyFrom(numpy_helper.from_array(values.astype(numpy_helper.to_array(weight).dtype), weight.name))
    onnx.save(model, str(path))
    (wrong,) = check_export(path, loaded)
    assert not wrong.passed and wrong.rel_err > 1e-2, wrong


def _failing(_path: Path, _loaded: object) -> list[OutputCheck]:
    return [OutputCheck("logits", 0.46, 1e-5)]


def test_a_mismatch_fails_the_export_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("moetrt.export.self_check.check_export", _failing)
    out = tmp_path / "new" / "m.onnx"
    code, _, err = invoke("export", "demo:mixtral:block", "-o", str(out))
    assert_one_line_error(code, err, "does not match PyTorch", "rel err 4.60e-01", "--self-check warn")
    assert not (tmp_path / "new").exists()


def test_warn_keeps_the_file_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moetrt.export.self_check.check_export", _failing)
    out = tmp_path / "m.onnx"
    code, _, err = invoke("export", "demo:mixtral:block", "-o", str(out), "--self-check", "warn")
    assert code == 0 and out.is_file() and "warning: the exported ONNX does not match PyTorch" in err
