"""Checking an artifact whose experts are quantized: the PyTorch reference runs with the same dequantized experts.

For each fused node stored in a quantized format, its codes and scales are read from the artifact and
dequantized with the op's arithmetic (`op.quant.dequantize`) into the canonical [E, N, K] layout. The module the
node replaced (found from its scopes) gets them in its own parameter layout for the duration of the check: of
the layouts a transformers experts module may use (as is, transposed, gate and up rows interleaved, and both),
the one closest to the module's own weights is the one it uses (the quantization moves a weight by a few per
cent; another layout by about its whole norm). The comparison then checks the quantized graph (export, fusion,
the dequantizing function body); the quantization's own error against the native weights is reported beside
it, never judged by the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetrt.core.errors import MoetrtError
from moetrt.op.spec import MoEAttributes
from moetrt.verify.probes import node_module_scopes, stored_tensor


def quantized_nodes(onnx_path: Path) -> list[tuple[Any, MoEAttributes]]:
    """(fused node, attributes) of every fused node whose experts are quantized."""
    from moetrt.core.onnx_io import load_onnx
    from moetrt.op.fused_node import check_fused_model, fused_nodes

    header = load_onnx(onnx_path, load_external_data=False)
    return [(n, a) for n, a in zip(fused_nodes(header), check_fused_model(header)) if a.is_quantized]


def describe_formats(nodes: list[tuple[Any, MoEAttributes]]) -> str:
    formats = sorted({f"{a.weight_format} (block {a.weight_block})" for _, a in nodes})
    return ", ".join(formats)


@contextlib.contextmanager
def dequantized_experts(
    root: nn.Module,
    onnx_path: Path,
    nodes: list[tuple[Any, MoEAttributes]] | None = None,
    graph: Any = None,
) -> Iterator[int]:
    """Give every module a quantized fused node replaced (or those of `nodes`) its experts' dequantized
    weights; restores them after. Yields the number of blocks changed."""
    import onnx_ir as ir

    from moetrt.op.reference import expert_weight

    nodes = quantized_nodes(onnx_path) if nodes is None else [(n, a) for n, a in nodes if a.is_quantized]
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    wrapped: list[nn.Module] = []
    try:
        if nodes:
            graph = graph if graph is not None else ir.load(str(onnx_path)).graph
            for node, attrs in nodes:
                experts = _experts_of(root, node)
                stored = {
                    name: stored_tensor(graph, value)
                    for name, value in zip(attrs.present_inputs(), node.input)
                    if name.startswith("expert_")
                }
                for which in ("gate_up", "down"):
                    param = _parameter(experts, which, node.name)
                    canonical = torch.stack(
                        [expert_weight(stored, attrs, which, e) for e in range(attrs.num_experts)]
                    )
                    saved.append((param, param.data.clone()))
                    with torch.no_grad():
                        param.data.copy_(_in_layout_of(param.data, canonical, attrs, which, node.name))
                if attrs.has_fp8_activations:
                    wrapped.append(experts)
                    experts.forward = _with_fp8_expert_inputs(experts, attrs, node.name)
        yield len(nodes)
    finally:
        with torch.no_grad():
            for param, original in reversed(saved):
                param.data.copy_(original)
        for experts in wrapped:
            del experts.forward  # the class's own forward again


def _with_fp8_expert_inputs(experts: nn.Module, attrs: MoEAttributes, node: str) -> Any:
    """`experts.forward` whose expert GEMMs take their inputs as the op's fp8 activations do: each
    `F.linear` on a slice of the module's gate_up or down weight gets its input quantized per token and block
    (`op.quant.fp8_activations`, in the module's own dtype, as the op's oracle holds them in its own). A
    module that multiplies its experts some other way cannot mirror them: that is refused rather than
    compared against the weight-only op."""
    from moetrt.op.quant import fp8_activations

    params = [_parameter(experts, which, node) for which in ("gate_up", "down")]
    original = type(experts).forward
    linear = torch.nn.functional.linear

    def quantizing_linear(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # a slice of the experts' weights (their storage now: the module may have been cast since)
        if weight.untyped_storage().data_ptr() in {p.untyped_storage().data_ptr() for p in params}:
            calls[0] += 1
            x = fp8_activations(x, attrs.fp8_activation_block).to(x.dtype)
        return linear(x, weight, bias)

    calls = [0]

    config = getattr(experts, "config", None)

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] = 0
        # transformers' experts dispatch on the config: its eager loop is the one that calls F.linear per expert
        implementation = getattr(config, "_experts_implementation", None)
        if implementation is not None:
            config._experts_implementation = "eager"
        torch.nn.functional.linear = quantizing_linear
        try:
            out = original(experts, *args, **kwargs)
        finally:
            torch.nn.functional.linear = linear
            if implementation is not None:
                config._experts_implementation = implementation
        if calls[0] == 0 and bool(out.abs().sum() > 0):
            raise MoetrtError(
                f"{type(experts).__name__} does not multiply its experts with F.linear, so the reference cannot "
                f"quantize their inputs as node {node}'s fp8 activations do",
                "verify with --native-reference (the quantization's whole error), or fuse without --activations",
            )
        return out

    return forward


def _experts_of(root: nn.Module, node: Any) -> nn.Module:
    scopes = node_module_scopes(node)
    if not scopes:
        raise MoetrtError(
            f"fused node {node.name} does not name the module it replaced",
            "fuse the export again with this moetrt (fused nodes carry their module scopes)",
        )
    module = root.get_submodule(scopes[-1]) if scopes[-1] else root
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        raise MoetrtError(f"module {scopes[-1]} has no experts to compare", "report the model family")
    return experts


def _parameter(experts: nn.Module, which: str, node: str) -> nn.Parameter:
    key = "gate_up" if which == "gate_up" else "down"
    found = [p for name, p in experts.named_parameters(recurse=False) if key in name and p.dim() == 3]
    if len(found) != 1:
        raise MoetrtError(
            f"cannot tell which weight of {type(experts).__name__} holds the {which} projection of node {node}",
            "report the model family",
        )
    return found[0]


def _in_layout_of(
    target: torch.Tensor, canonical: torch.Tensor, attrs: MoEAttributes, which: str, node: str
) -> torch.Tensor:
    """`canonical` [E, N, K] in the layout of `target` whose values it is closest to."""
    candidates = [canonical, canonical.transpose(1, 2)]
    if which == "gate_up":  # gate and up rows interleaved (gate_0, up_0, gate_1, ...), as GPT-OSS stores them
        e, n, k = canonical.shape
        interleaved = canonical.reshape(e, 2, n // 2, k).transpose(1, 2).reshape(e, n, k)
        candidates += [interleaved, interleaved.transpose(1, 2)]
    fitting = [c for c in candidates if c.shape == target.shape]
    if not fitting:
        raise MoetrtError(
            f"node {node}'s {which} experts {tuple(canonical.shape)} fit no layout of the module's "
            f"{tuple(target.shape)}",
            "re-export and fuse the model",
        )
    reference = target.float()
    best = min(fitting, key=lambda c: float((c - reference).norm()))
    return best.to(target.dtype)
