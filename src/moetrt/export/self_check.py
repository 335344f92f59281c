"""An export checks itself: the written ONNX, run by onnxruntime on the export's example inputs, against the
PyTorch module it came from. A silently wrong export (an op the exporter lowered differently, a specialised
shape) is caught here, before the file is reported written.

The reference runs in float32 from the model's own weights (already rounded to the export dtype), as `moetrt
verify` does. A bf16 or fp16 graph runs as its exact float32 widening (onnxruntime's CPU provider lacks bf16
kernels), judged at its dtype's tolerance: the check is of the graph. Half-precision arithmetic can flip a
top-k routing choice at a near-tie (a cached decoder's example, with its past, meets such ties in the fp16
demos), which says nothing about the export; `moetrt verify` runs the half graph and explains such flips.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moetrt.core.dtypes import name_of
from moetrt.core.onnx_io import write_widened
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.export.loaded import LoadedModel


@dataclass(frozen=True)
class OutputCheck:
    name: str
    rel_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tolerance

    def __str__(self) -> str:
        return f"{self.name}: rel err {self.rel_err:.2e} (tolerance {self.tolerance:.0e})"


def check_export(onnx_path: Path, loaded: LoadedModel) -> list[OutputCheck]:
    """Relative error of every output of the written model against PyTorch at the example inputs."""
    import onnxruntime as ort

    widen = loaded.dtype in (torch.bfloat16, torch.float16)
    inputs = loaded.example_inputs
    with tempfile.TemporaryDirectory(prefix="moetrt-check-") as tmp:
        path = onnx_path
        if widen:  # onnxruntime runs the exact float32 widening, from a file (external data when it needs)
            path = Path(tmp) / "widened.onnx"
            write_widened(onnx_path, path, which="half")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {
            name: (t.float() if widen and t.is_floating_point() else t).detach().cpu().numpy()
            for name, t in zip(loaded.input_names, inputs)
        }
        got = session.run(None, feeds)
        del session
    expected = _float32_reference(loaded)
    bound = tolerance(name_of(loaded.dtype))
    return [
        OutputCheck(name, relative_error(np.asarray(out, dtype=np.float64), ref.double().numpy()), bound)
        for name, out, ref in zip(loaded.output_names, got, expected)
    ]


def _float32_reference(loaded: LoadedModel) -> tuple[torch.Tensor, ...]:
    """The module's outputs in float32 on its own weights; the module is put back in its dtype after (exact:
    every half value is a float32 value)."""
    module, dtype = loaded.module, loaded.dtype
    inputs = tuple(t.float() if t.is_floating_point() else t for t in loaded.example_inputs)
    module.float()
    try:
        with torch.inference_mode():
            out = module(*inputs)
    finally:
        module.to(dtype)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(o for o in out if isinstance(o, torch.Tensor))
    return tuple(o.float() for o in outs)
