"""The dtype vocabulary: one name per precision, and its spelling in every library moetrt talks to.

Users and the CLI say `fp32` / `fp16` / `bf16` (the `name`). Kernel bundles, config tables and the AOT compiler
store `float32` / `float16` / `bfloat16` (the `kernel_name`): those strings are part of the on-disk formats, so
they never change. Conversions to torch, numpy, ONNX and TensorRT types live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moetrt.core.errors import MoetrtError


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | fp16 | bf16: what users type and what manifests record
    kernel_name: str  # float32 | float16 | bfloat16: kernel bundles, config tables, Triton
    itemsize: int
    onnx_type: int  # onnx.TensorProto.DataType value (also onnx_ir.DataType's)
    trt_name: str  # tensorrt.DataType member name

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.kernel_name)

    @property
    def is_half(self) -> bool:
        return self.itemsize == 2


FP32 = Precision("fp32", "float32", 4, 1, "FLOAT")
FP16 = Precision("fp16", "float16", 2, 10, "HALF")
BF16 = Precision("bf16", "bfloat16", 2, 16, "BF16")
PRECISIONS: tuple[Precision, ...] = (FP32, FP16, BF16)
NAMES: tuple[str, ...] = tuple(p.name for p in PRECISIONS)
KERNEL_NAMES: tuple[str, ...] = tuple(p.kernel_name for p in PRECISIONS)

_BY_TEXT = {text: p for p in PRECISIONS for text in (p.name, p.kernel_name)}
_HINT = f"use {', '.join(NAMES)}"


def precision(value: str | Precision | Any) -> Precision:
    """The Precision of a name (fp16 or float16), a torch dtype, an ONNX / onnx_ir type or a TensorRT type."""
    if isinstance(value, Precision):
        return value
    if isinstance(value, str):
        found = _BY_TEXT.get(value.lower())
        if found is None:
            raise MoetrtError(f"unsupported dtype {value!r}", _HINT)
        return found
    text = str(value)
    if text.startswith("torch."):  # torch.float16
        return precision(text.removeprefix("torch."))
    if text in _BY_TEXT:  # numpy dtypes
        return _BY_TEXT[text]
    if isinstance(value, int):  # onnx.TensorProto / onnx_ir.DataType codes
        code = int(value)
        for p in PRECISIONS:
            if p.onnx_type == code:
                return p
        raise MoetrtError(f"unsupported dtype {value!r}", _HINT)
    trt_name = getattr(value, "name", text).split(".")[-1]
    for p in PRECISIONS:
        if p.trt_name == trt_name:
            return p
    raise MoetrtError(f"unsupported dtype {value!r}", _HINT)


def name_of(value: str | Precision | Any) -> str:
    """fp32 / fp16 / bf16 of anything `precision` accepts."""
    return precision(value).name


def kernel_name_of(value: str | Precision | Any) -> str:
    """float32 / float16 / bfloat16 of anything `precision` accepts."""
    return precision(value).kernel_name


def torch_from_numpy(array: Any) -> Any:
    """A torch tensor sharing `array`'s memory (numpy has no bfloat16: ml_dtypes' bfloat16 goes through its
    bits). Read-only arrays (memory maps) are shared too; do not write to the result."""
    import warnings

    import numpy as np
    import torch

    bf16 = array.dtype.name == "bfloat16"
    with warnings.catch_warnings():  # torch warns about read-only memory; the callers only read it
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.asarray(array).view(np.uint16) if bf16 else np.asarray(array))
    return tensor.view(torch.bfloat16) if bf16 else tensor


def numpy_from_torch(tensor: Any) -> Any:
    """A CPU tensor as a numpy array (bfloat16 as ml_dtypes' bfloat16), sharing memory where it can."""
    import torch

    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
