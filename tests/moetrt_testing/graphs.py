"""Helpers for the graph-pass tests: export small torch modules to ONNX and compare runs.

Shared by the tests in tests/ and those beside each pass (pytest puts tests/ on the path: pyproject.toml).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from moetrt.core.tolerances import relative_error
from moetrt.op.spec import DOMAIN, OP_TYPE


def export_module(module: nn.Module, hidden_size: int, batch: int = 2, seq: int = 3) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of `module(x [batch, seq, H])` with dynamic batch and sequence, IR 10."""
    x = torch.randn(batch, seq, hidden_size)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module.eval(), (x,), dynamo=True, dynamic_shapes=(dims,), optimize=True, verbose=False
        )
    assert program is not None
    model = program.model_proto
    model.ir_version = min(model.ir_version, 10)
    return model


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_err(got: np.ndarray | torch.Tensor, want: np.ndarray | torch.Tensor) -> float:
    """The library's metric (core.tolerances.relative_error) on arrays or tensors."""
    return relative_error(np.asarray(got), np.asarray(want))


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def expert_table_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gather / GatherND nodes of the main graph that read a rank-3 initializer (expert weight tables)."""
    tables = {i.name for i in model.graph.initializer if len(i.dims) == 3}
    return [n for n in model.graph.node if n.op_type in ("Gather", "GatherND") and n.input[0] in tables]


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def init_random(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Random, never-zero parameters (transformers leaves expert tables uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return module


def hf_moe_block(family: str, hidden: int = 32, **overrides: Any) -> nn.Module:
    """A tiny transformers MoE block of `family` with batched_mm experts and random weights."""
    from transformers import AutoConfig

    common = {
        "hidden_size": hidden,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 64,
    }
    per_family: dict[str, dict[str, Any]] = {
        "qwen3_moe": {
            "moe_intermediate_size": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
        "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
        "olmoe": {"num_experts": 8, "num_experts_per_tok": 2},
        "qwen2_moe": {
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_experts": 8,
            "num_experts_per_tok": 2,
        },
        "qwen3_next": {
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
        "deepseek_v3": {
            "moe_intermediate_size": 16,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 2.5,
        },
        "gpt_oss": {"num_local_experts": 8, "num_experts_per_tok": 2},
    }
    config = AutoConfig.for_model(family, **{**common, **per_family[family], **overrides})
    config._experts_implementation = "batched_mm"
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    elif family == "qwen3_next":
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock as Block
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as Block
    return init_random(FirstOutput(Block(config)), seed=len(family))


class FirstOutput(nn.Module):
    """Keep only the first output of a block (GPT-OSS also returns its router scores)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out[0] if isinstance(out, tuple) else out


@functools.cache
def exported_hf_block(family: str) -> tuple[nn.Module, onnx.ModelProto]:
    """(module, its ONNX export) for a tiny transformers block; cached for the test session."""
    module = hf_moe_block(family)
    return module, export_module(module, hidden_size=32)


def packed_inputs(model: onnx.ModelProto, node: onnx.NodeProto) -> dict[str, torch.Tensor]:
    """The fused node's weight inputs (packed initializers), by canonical input name."""
    from moetrt.op.spec import MoEAttributes

    attrs = MoEAttributes.from_onnx_attributes(node_attributes(node))
    arrays = initializer_arrays(model)
    names = attrs.present_inputs()
    return {
        name: torch.from_numpy(arrays[value].copy())
        for name, value in zip(names, node.input)
        if name != "hidden_states"
    }
