"""Engine builds with TensorRT-RTX: no plugins, so every `moetrt::MoE` node is inlined to its function body
(standard ONNX ops) and TensorRT-RTX compiles it natively. Builds on a CPU-only machine for any
TensorRT-RTX compute capability (SM 7.5, 8.0, 8.6, 8.9, 12.0, 12.1).

TensorRT-RTX networks are strongly typed: the precision is the ONNX model's (export at --precision).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import write_onnx
from moetrt.op import spec
from moetrt.trt.targets import RTX_SMS, Target
from moetrt.trt.trt_build import (
    CapturingLogger,
    EngineBuild,
    Progress,
    build_and_serialize,
    parse_onnx,
)

PIP_HINT = (
    "pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116 (or moetrt[rtx])"
)


def import_tensorrt_rtx() -> ModuleType:
    """The TensorRT-RTX Python module: `tensorrt_rtx` (NVIDIA's SDK wheel) or `tensorrt_rtx_bindings` (PyPI)."""
    try:
        import tensorrt_rtx

        return tensorrt_rtx
    except ImportError:
        pass
    try:
        import tensorrt_rtx_bindings
    except ImportError as err:
        raise MoetrtError("TensorRT-RTX is not installed", PIP_HINT) from err
    return tensorrt_rtx_bindings


def write_inlined(onnx_path: Path, out_path: Path) -> int:
    """Write `onnx_path` with every moetrt::MoE call replaced by its function body to `out_path` (onnx-ir end
    to end: weights stay in the external data until written, so memory does not grow with the model);
    returns the number of calls inlined."""
    import onnx_ir as ir

    from moetrt.passes.decompose import count_fused, decompose_ir

    model = ir.load(str(onnx_path))
    calls = count_fused(model)
    if calls and not any(key[0] == spec.DOMAIN and key[1] == spec.OP_TYPE for key in model.functions):
        raise MoetrtError(
            f"the model has {calls} moetrt::MoE nodes but no function bodies for them",
            "re-fuse it with `moetrt fuse` (fused nodes must carry their ONNX function body)",
        )
    decompose_ir(model)
    left = sum(1 for node in model.graph.all_nodes() if node.domain == spec.DOMAIN)
    if left:
        raise MoetrtError(
            f"{left} moetrt nodes remain after inlining", "re-fuse the model with `moetrt fuse`"
        )
    write_onnx(model, out_path)
    return calls


def build_rtx_engine(
    onnx_path: Path,
    plan_path: Path,
    target: Target,
    profiles: Sequence[dict[str, Any]],
    progress: Progress,
    verbose: bool = False,
) -> EngineBuild:
    """Build `plan_path` from the fused ONNX with TensorRT-RTX for `target` (MoE nodes as native layers)."""
    if target.sm not in RTX_SMS:
        raise MoetrtError(
            f"TensorRT-RTX cannot build for SM {target.sm}",
            f"use a target with SM in {RTX_SMS} or --engine-backend tensorrt",
        )
    trt = import_tensorrt_rtx()
    start = time.perf_counter()
    logger = CapturingLogger(trt, verbose)
    builder = trt.Builder(logger)
    with tempfile.TemporaryDirectory(prefix="moetrt-rtx-", dir=plan_path.parent) as tmp:
        staged = Path(tmp) / "inlined.onnx"
        inlined = write_inlined(onnx_path, staged)
        progress(f"inlined {inlined} moetrt::MoE node(s) to standard ops (TensorRT-RTX takes no plugins)")
        # The parser and builder hold every weight themselves: TensorRT-RTX's own need, about the weights
        # once more while the plan is serialised.
        progress(f"parsing with the TensorRT-RTX {trt.__version__} ONNX parser")
        network = parse_onnx(trt, builder, logger, onnx.load(str(staged), load_external_data=False), staged)
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{target.sm}"), 0)
        progress(
            f"building the TensorRT-RTX engine for {target.name} (SM {target.sm}, {network.num_layers} layers)"
        )
        return build_and_serialize(
            trt,
            builder,
            network,
            config,
            logger,
            profiles,
            plan_path,
            "tensorrt-rtx",
            False,
            target.sm,
            start,
        )
