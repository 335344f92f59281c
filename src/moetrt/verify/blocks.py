"""Block parity at any model size: each fused MoE block of an artifact against its PyTorch module.

For every fused `moetrt::MoE` node (found with the module it replaced, from its scopes) the op's oracle
(`op.reference.moe_reference`, float32) runs on the artifact's own weights, memory-mapped from its external
data, and the PyTorch module runs in float32 on weights read from the source model; both get the same random
hidden states. Only one block's weights are in memory at a time (as float32 for the module: about twice the
block's bf16 bytes), whatever the model's size: a Hugging Face checkpoint is opened from disk
(`export.offloaded`) and each block is materialised, checked and dropped in turn.

What it checks: the export's and the fusion's reading of each block (routing variant, expert layout, packing,
shared expert) against the module itself, at `FUSION_CHECK_TOLERANCE` (both sides compute in float32 from
the same rounded weights). What it does not: the layers between the blocks, and the dtype's rounding of
activations (the whole-model check does both, where the model fits).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetrt.core.artifacts import META_DTYPE, META_SOURCE
from moetrt.core.errors import MoetrtError
from moetrt.core.onnx_io import load_onnx, metadata
from moetrt.core.tolerances import FUSION_CHECK_TOLERANCE
from moetrt.verify.compare import VerifyReport, compare_outputs
from moetrt.verify.probes import node_module_scopes, stored_tensor
from moetrt.verify.quantized import dequantized_experts

Progress = Callable[[str], None]
#: Token counts each block is checked at: one token (decode), a few, and more than any top-k could tie up.
BLOCK_TOKENS = (1, 7, 64)


def verify_blocks(
    onnx_path: Path,
    reference: str | None = None,
    tokens: Sequence[int] = BLOCK_TOKENS,
    seed: int = 0,
    progress: Progress | None = None,
) -> VerifyReport:
    """One row per (fused block, token count): the block's output against its PyTorch module's."""
    import onnx_ir as ir

    from moetrt.core.artifacts import WRAPPED_PREFIX
    from moetrt.export.model_source import load_model, loads_from_disk
    from moetrt.op.fused_node import check_fused_model, fused_nodes

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():  # a `moetrt build` directory: its model, checked against the manifest
        from moetrt.runtime.loading import check_against_manifest, resolve_artifact

        onnx_path = resolve_artifact(onnx_path, "onnxruntime")
        check_against_manifest(onnx_path)
    header = load_onnx(onnx_path, load_external_data=False)
    meta = metadata(header)
    reference = reference or meta.get(META_SOURCE)
    if not reference:
        raise MoetrtError(f"{onnx_path} does not name its source model", "pass --reference MODEL")
    dtype = meta.get(META_DTYPE, "fp32")
    blocks = list(zip(fused_nodes(header), check_fused_model(header)))
    if not blocks:
        raise MoetrtError(f"{onnx_path} has no fused moetrt::MoE node", "fuse it first (`moetrt fuse`)")
    del header

    report = VerifyReport(artifact=str(onnx_path), reference=reference, dtype=dtype)
    graph = ir.load(str(onnx_path)).graph  # weights stay memory-mapped in the external data
    with tempfile.TemporaryDirectory(prefix="moetrt-blocks-", dir=onnx_path.parent) as tmp:
        from_disk = loads_from_disk(reference)
        say(f"opening the reference {reference}{' from disk' if from_disk else ''}")
        loaded = load_model(reference, dtype, offload_dir=Path(tmp) / "offload" if from_disk else None)
        root = loaded.module
        prefix = WRAPPED_PREFIX if hasattr(root, "WRAPPED_PREFIX") else ""
        for index, (node, attrs) in enumerate(blocks):
            scopes = node_module_scopes(node)
            if not scopes:
                raise MoetrtError(
                    f"fused node {node.name} does not name the module it replaced",
                    "fuse the export again with this moetrt (fused nodes now carry their module scopes)",
                )
            path = scopes[-1]
            say(f"block {index + 1}/{len(blocks)}: {path or '(root)'}")
            module = root.get_submodule(path) if path else root
            quantized = dequantized_experts(root, onnx_path, [(node, attrs)], graph)  # a no-op for native
            with _materialised(module, loaded.offloaded, path, prefix), quantized:
                for count in tokens:
                    gen = torch.Generator().manual_seed(seed + count)
                    hidden = torch.randn(1, count, attrs.hidden_size, generator=gen).to(loaded.dtype).float()
                    with torch.inference_mode():
                        out = module(hidden)
                    ref = (out[0] if isinstance(out, tuple | list) else out).reshape(count, -1)
                    got = _oracle(graph, node, attrs, hidden.reshape(count, -1))
                    row = compare_outputs(got, ref, (1, count), path or "(root)", FUSION_CHECK_TOLERANCE)
                    report.rows.append(row)
            _release(graph, node)
    report.seconds = time.perf_counter() - start
    return report


def _oracle(graph: Any, node: Any, attrs: Any, hidden: torch.Tensor) -> torch.Tensor:
    from moetrt.op.reference import moe_reference

    inputs = {"hidden_states": hidden}
    for name, value_name in zip(attrs.present_inputs()[1:], list(node.input)[1:], strict=False):
        tensor = stored_tensor(graph, value_name)
        if tensor is None:
            raise MoetrtError(
                f"fused node {node.name}: input {name} ({value_name}) is not a stored weight",
                "check the file written by `moetrt fuse` (its weights are packed initializers)",
            )
        inputs[name] = tensor
    return moe_reference(inputs, attrs)["output"].float()


def _release(graph: Any, node: Any) -> None:
    """Unmap the block's weights: pages read from a memory map stay resident while it is open."""
    for name in node.input:
        value = graph.initializers.get(name)
        release = getattr(getattr(value, "const_value", None), "release", None)
        if callable(release):
            release()


class _materialised:
    """The module with real float32 weights for the duration of the block (read from disk for a meta-device
    model), back on the meta device afterwards; a module that already has weights runs in float32."""

    def __init__(self, module: nn.Module, offloaded: Any, path: str, prefix: str) -> None:
        self.module, self.offloaded, self.path, self.prefix = module, offloaded, path, prefix

    def __enter__(self) -> nn.Module:
        # transformers' experts: the per-expert loop, not the export's batched form, which gathers every
        # (token, slot)'s weights (gigabytes at 64 tokens of a real-width block)
        self.implementations = []
        for config in {id(c): c for m in self.module.modules() if (c := getattr(m, "config", None))}.values():
            if hasattr(config, "_experts_implementation"):
                self.implementations.append((config, config._experts_implementation))
                config._experts_implementation = "eager"
        if self.offloaded is None:
            self.dtype = next(self.module.parameters()).dtype
            return self.module.float()
        self.module.to_empty(device="cpu").float()  # float32 storage first: no second copy in the model dtype
        base = self.path[len(self.prefix) :] if self.path.startswith(self.prefix) else self.path
        with torch.no_grad():
            for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]:
                source = f"{base}.{name}" if base else name
                tensor.copy_(self.offloaded.read(source))
        return self.module.float()

    def __exit__(self, *exc: object) -> None:
        for config, implementation in self.implementations:
            config._experts_implementation = implementation
        if self.offloaded is None:
            self.module.to(self.dtype)
        else:
            self.module.to("meta")
