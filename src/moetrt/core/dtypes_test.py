"""The dtype vocabulary: every spelling of a precision maps to one Precision, anything else is refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from moetrt.core.dtypes import BF16, FP16, FP32, KERNEL_NAMES, NAMES, kernel_name_of, name_of, precision
from moetrt.core.errors import MoetrtError


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("fp32", FP32),
        ("float32", FP32),
        ("FP16", FP16),
        ("float16", FP16),
        ("bf16", BF16),
        ("bfloat16", BF16),
        (torch.float16, FP16),
        (torch.bfloat16, BF16),
        (np.dtype("float32"), FP32),
        (onnx.TensorProto.BFLOAT16, BF16),
        (ir.DataType.FLOAT16, FP16),
    ],
)
def test_every_spelling_names_one_precision(spelling: object, expected: object) -> None:
    assert precision(spelling) is expected


def test_names_round_trip_through_torch() -> None:
    assert NAMES == ("fp32", "fp16", "bf16") and KERNEL_NAMES == ("float32", "float16", "bfloat16")
    for p in (FP32, FP16, BF16):
        assert precision(p.torch) is p and p.torch.itemsize == p.itemsize
        assert name_of(p.kernel_name) == p.name and kernel_name_of(p.name) == p.kernel_name


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int32, onnx.TensorProto.INT64, "", object()])
def test_unsupported_dtypes_are_one_line_errors(bad: object) -> None:
    with pytest.raises(MoetrtError, match="unsupported dtype") as err:
        precision(bad)
    assert "fp32, fp16, bf16" in err.value.one_line()
