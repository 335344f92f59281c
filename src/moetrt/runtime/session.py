"""`Session`: an onnxruntime session for a (fused) ONNX model with the Engine's call signature.

onnxruntime runs each `moetrt::MoE` node's function body, so the fused model runs anywhere. CUDA execution
provider when onnxruntime-gpu is installed (and a GPU is visible), CPU otherwise. Tensors in and out are torch
tensors, exchanged through DLPack (no copy on CPU; bf16 included, which numpy cannot hold).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import model_precision
from moetrt.runtime.decoder_io import check_decoder_feeds, state_from_metadata

_ORT_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}


class Session:
    """Run an ONNX model by tensor name: `session({"hidden_states": x}) -> {"output": y, ...}`."""

    backend = "onnxruntime"

    def __init__(
        self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise MoetrtError(
                f"{self.path} does not exist", "pass an .onnx file (or a `moetrt build` directory)"
            )
        available = ort.get_available_providers()
        if providers is None:
            cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own exception types for a bad model
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            missing = re.search(r"implementation for (\w+)\(", first)
            if missing and _is_bf16_file(self.path):
                raise MoetrtError(
                    f"onnxruntime's {providers[0]} has no bf16 kernel for {missing.group(1)}, so it cannot run "
                    f"the bf16 model {self.path.name}",
                    "run it with onnxruntime-gpu on a CUDA machine, or build/export with --precision fp16 or fp32",
                ) from err
            raise MoetrtError(
                f"onnxruntime cannot load {self.path.name}: {first}",
                "check the file with `moetrt inspect`, or re-export it",
            ) from err
        self.providers = self._session.get_providers()
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.input_specs = {
            i.name: (_ORT_TO_TORCH.get(i.type), list(i.shape)) for i in self._session.get_inputs()
        }
        self.state = state_from_metadata(self._session.get_modelmeta().custom_metadata_map)
        self.last_seconds = 0.0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu")

    def __call__(
        self, inputs: Mapping[str, torch.Tensor] | None = None, **named: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        import onnxruntime as ort

        feeds = check_inputs(dict(inputs or {}, **named), self.input_specs)
        if self.state is not None:
            check_decoder_feeds(self.state, {name: list(t.shape) for name, t in feeds.items()})
        values = {name: ort.OrtValue.from_dlpack(tensor.contiguous()) for name, tensor in feeds.items()}
        start = time.perf_counter()
        try:
            outputs = self._session.run_with_ort_values(self.output_names, values)
        except Exception as err:  # onnxruntime's errors carry the op and the shapes; keep the first line
            raise MoetrtError(
                f"onnxruntime failed: {str(err).strip().splitlines()[0]}",
                "check the input shapes against `moetrt inspect`",
            ) from err
        self.last_seconds = time.perf_counter() - start
        # Clone: the OrtValue owns the memory and is freed with `outputs`.
        return {
            name: torch.from_dlpack(value._ortvalue.to_dlpack()).clone()
            for name, value in zip(self.output_names, outputs)
        }


def check_inputs(
    feeds: dict[str, torch.Tensor], specs: Mapping[str, tuple[torch.dtype | None, Sequence[Any]]]
) -> dict[str, torch.Tensor]:
    """Names, dtypes and fixed dims of the inputs, each checked with a message that says what to pass."""
    missing = [name for name in specs if name not in feeds]
    unknown = [name for name in feeds if name not in specs]
    if missing or unknown:
        raise MoetrtError(
            f"inputs do not match the model: missing {missing}, unknown {unknown}",
            f"pass exactly {list(specs)}",
        )
    for name, tensor in feeds.items():
        if not isinstance(tensor, torch.Tensor):
            raise MoetrtError(f"input {name} is a {type(tensor).__name__}", "pass torch tensors")
        dtype, dims = specs[name]
        if dtype is not None and tensor.dtype != dtype:
            raise MoetrtError(
                f"input {name} is {tensor.dtype}, the model takes {dtype}", f"cast it with .to({dtype})"
            )
        if len(dims) != tensor.dim():
            raise MoetrtError(
                f"input {name} has rank {tensor.dim()}, the model takes {len(dims)} ({dims})",
                f"reshape {name} to {dims}",
            )
        for axis, (want, got) in enumerate(zip(dims, tensor.shape)):
            if isinstance(want, int) and want > 0 and want != got:
                raise MoetrtError(
                    f"input {name} dim {axis} is {got}, the model fixes it at {want}",
                    f"pass {name} with shape {dims}",
                )
    return feeds


def _is_bf16_file(path: Path) -> bool:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # the caller reports the load error itself
        return False
    return model_precision(model) == "bf16"
