"""`moetrt export` and `moetrt verify` through click's test runner: output, exit codes, one-line errors, and
no file left behind by a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from moetrt.cli import main

CUSTOM = Path(__file__).parent / "data" / "custom_moe.py"


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    assert "; " in errors[0], "the line says what is wrong, then what to do"
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def exported_block(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "olmoe_block.onnx"
    result = _run("export", "demo:olmoe:block", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_help_texts() -> None:
    export_help = _run("export", "--help")
    assert export_help.exit_code == 0
    for text in ("demo:<family>", "module:path/to/file.py:factory", "--dtype", "--opset", "config.json"):
        assert text in export_help.output
    verify_help = _run("verify", "--help")
    assert verify_help.exit_code == 0
    for text in ("--reference", "--shapes", "--seed", "BATCHxSEQ", "exits 1"):
        assert text in verify_help.output


def test_export_then_verify(exported_block: Path) -> None:
    assert exported_block.is_file()
    assert sorted(p.name for p in exported_block.parent.iterdir()) == ["olmoe_block.onnx"]

    result = _run("verify", str(exported_block))
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(rows) == 3 and all(row.endswith("PASS") for row in rows)
    assert {row.split()[0] for row in rows} == {"1x7", "3x16", "2x72"}
    assert result.stdout.splitlines()[-1].startswith("PASS: 3/3")


def test_export_prints_summary_and_progress(tmp_path: Path) -> None:
    out = tmp_path / "custom.onnx"
    result = _run("export", f"module:{CUSTOM}:make_moe", "-o", str(out), "--opset", "20")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}") and "1 MoE blocks found" in result.stdout
    assert "opset 20" in result.stdout
    assert "[moetrt] exporting with torch.onnx.export" in result.stderr
    assert "warning" not in result.stderr


def test_verify_failure_exits_non_zero(exported_block: Path) -> None:
    result = _run("verify", str(exported_block), "--reference", "demo:qwen3_moe:block", "--shapes", "1x4,3x9")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL: 0/2")


def test_verify_model_spec_with_shapes_and_seed() -> None:
    result = _run("verify", f"module:{CUSTOM}:make_moe", "--shapes", "1x4,5x3,2x70", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert "exporting it to a temporary ONNX file" in result.stderr
    assert result.stdout.splitlines()[-1].startswith("PASS: 3/3")


def test_model_without_moe_exports_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "dense.onnx"
    result = _run("export", f"module:{CUSTOM}:make_dense", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert "found 0 MoE blocks" in result.stderr
    assert "0 MoE blocks found" in result.stdout


def test_bf16_verify_runs_the_float32_widening_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "bf16.onnx"
    assert _run("export", "demo:mixtral:block", "-o", str(out), "--dtype", "bf16").exit_code == 0
    result = _run("verify", str(out))
    assert result.exit_code == 0, result.output
    assert "exact float32 widening" in result.stdout and "1e-02 (bf16)" in result.stdout


@pytest.mark.parametrize(
    ("make_model", "fragments"),
    [
        (lambda d: "demo:llama", ("unknown demo family 'llama'", "demo:qwen3_next")),
        (lambda d: str(d / "no_such_model"), ("does not exist",)),
        (lambda d: _dir_without_config(d), ("has no config.json", "config.json + *.safetensors")),
        (
            lambda d: f"module:{CUSTOM}:make_raises",
            ("RuntimeError: weights file not found", "fix the factory"),
        ),
        (lambda d: f"module:{d / 'gone.py'}:make", ("does not exist", "module:path/to/file.py:factory")),
    ],
    ids=["unknown-family", "missing-path", "dir-without-config", "factory-raises", "missing-module-file"],
)
def test_export_bad_model(make_model, fragments: tuple[str, ...], tmp_path: Path) -> None:
    workdir = tmp_path / "in"
    workdir.mkdir()
    model = make_model(workdir)
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = _run("export", model, "-o", str(outdir / "model.onnx"))
    _assert_one_line_error(result, *fragments)
    assert list(outdir.iterdir()) == [], "nothing written, no temp files left"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--opset", "11"), ("opset 11 is not supported", "18 to 23")),
        (("--dtype", "bf16", "--opset", "18"), ("bf16 needs opset 22",)),
    ],
)
def test_export_bad_options(args: tuple[str, ...], fragments: tuple[str, ...], tmp_path: Path) -> None:
    result = _run("export", "demo:mixtral:block", "-o", str(tmp_path / "m.onnx"), *args)
    _assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_export_to_non_onnx_name(tmp_path: Path) -> None:
    _assert_one_line_error(_run("export", "demo:mixtral:block", "-o", str(tmp_path / "m.bin")), ".onnx")
    assert list(tmp_path.iterdir()) == []


def test_verify_corrupt_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf")
    _assert_one_line_error(_run("verify", str(bad)), "corrupt.onnx", "moetrt export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx"]


def test_verify_missing_file_and_bad_shapes(tmp_path: Path, exported_block: Path) -> None:
    _assert_one_line_error(_run("verify", str(tmp_path / "nowhere.onnx")), "does not exist")
    _assert_one_line_error(_run("verify", str(exported_block), "--shapes", "2by8"), "BATCHxSEQ")


def _dir_without_config(parent: Path) -> str:
    model_dir = parent / "weights_only"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    return str(model_dir)
