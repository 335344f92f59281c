"""Fixtures shared by the CPU tests: a fused single-block ONNX file and the check that nothing was left behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from moetrt_testing.single_op_model import single_moe_model

from moetrt.cli import main
from moetrt.core.dtypes import precision
from moetrt.op.presets import like
from moetrt.op.spec import MoEAttributes

#: A small block with every common part: softmax + renorm, a gated shared expert.
SMALL_SHARED = like("qwen3_next", 8, 2, 32, 16)

FusedBlockWriter = Callable[..., Path]


@pytest.fixture
def fused_block(tmp_path: Path) -> FusedBlockWriter:
    """`fused_block(dtype="fp16", attrs=SMALL_SHARED)` writes one fused moetrt::MoE model under tmp_path."""

    def write(dtype: str = "fp16", attrs: MoEAttributes = SMALL_SHARED, name: str | None = None) -> Path:
        model, _ = single_moe_model(attrs, precision(dtype).torch)
        path = tmp_path / (name or f"block_{dtype}.onnx")
        onnx.save(model, str(path))
        return path

    return write


def leftovers(parent: Path, name: str) -> list[Path]:
    """The hidden staging files a write of `parent/name` left beside it (none after success or failure)."""
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def invoke(*args: str) -> tuple[int, str, str]:
    """`moetrt ARGS` in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 1; stderr ends with exactly one `error: ...` line (progress lines may come before it)."""
    assert code == 1, err
    lines = err.splitlines()
    assert (
        lines and lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    ), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], (needle, err)
