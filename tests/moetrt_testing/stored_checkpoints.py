"""Small checkpoints whose experts are stored quantized, made locally from the demo models.

Each writes the format's tensors under the names and in the layouts the released checkpoints use (FP8 blocks as
DeepSeek-V3 / Qwen3-Next-FP8 per expert linear with `weight_scale_inv`, GPT-OSS's MXFP4 `_blocks` / `_scales`,
GPTQ's packed `qweight` / `qzeros` / `scales`), and the matching `quantization_config` in config.json.
Returns the codes it stored, per MoE layer, in the op's layouts, so a test can compare what a build kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moetrt.export.demo_models import build_demo
from moetrt.op.quant import QuantizedWeight, quantize, unpack_nibbles
from moetrt.op.spec import FP8_BLOCK, INT4, MXFP4

_EXPERT_LINEAR = re.compile(r"(.+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")


def _pairs(codes: torch.Tensor) -> torch.Tensor:
    """The op's 4-bit bytes (runs of 8, op.quant) as GPT-OSS stores them: byte j holds k = 2j and 2j + 1."""
    values = unpack_nibbles(codes)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _saved_demo(family: str, out: Path) -> dict[str, torch.Tensor]:
    build_demo(family).module.model.save_pretrained(out)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
        file.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def _finish(out: Path, tensors: dict[str, torch.Tensor], quantization: dict[str, object]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=1))


def _pack_words(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] 4-bit fields -> int32 words, field j in bits 4j..4j+3."""
    word = torch.zeros(fields.shape[:-1], dtype=torch.int64)
    for j in range(8):
        word |= fields[..., j].long() << (4 * j)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _per_expert_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    layers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        match = _EXPERT_LINEAR.match(name)
        if match:
            layers.setdefault(match.group(1), {}).setdefault(int(match.group(2)), {})[match.group(3)] = tensor
    return layers


def fp8_checkpoint(
    family: str, out: Path, block: int = 16
) -> dict[str, tuple[QuantizedWeight, QuantizedWeight]]:
    """Every expert linear (and each attention q_proj) as e4m3 + `weight_scale_inv` over B x B blocks."""
    tensors = _saved_demo(family, out)
    layers = _per_expert_layers(tensors)
    quantized: dict[str, QuantizedWeight] = {}
    for name in list(tensors):
        if _EXPERT_LINEAR.match(name) or name.endswith("self_attn.q_proj.weight"):
            q = quantize(FP8_BLOCK, block, tensors[name].float()[None])
            tensors[name] = q.codes[0].view(torch.float8_e4m3fn)
            tensors[f"{name}_scale_inv"] = q.scale[0]
            quantized[name] = QuantizedWeight(q.codes[0], q.scale[0])
    stored = _stacked_layers(layers, quantized)
    _finish(
        out,
        tensors,
        {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [block, block],
        },
    )
    return stored


def _names(expert: dict[str, torch.Tensor]) -> tuple[str, str, str]:
    return ("gate_proj", "up_proj", "down_proj") if "gate_proj" in expert else ("w1", "w3", "w2")


def _stacked_layers(
    layers: dict[str, dict[int, dict[str, torch.Tensor]]], quantized: dict[str, QuantizedWeight]
) -> dict[str, tuple[QuantizedWeight, QuantizedWeight]]:
    """Per MoE layer, the stored per-expert linears in the op's layouts: gate_up [E, 2I, ...] (gate rows then up
    rows), down [E, H, ...]; codes, scales and zero points alike."""

    def stack(parts: list[list[QuantizedWeight]]) -> QuantizedWeight:
        def field(name: str) -> torch.Tensor | None:
            if getattr(parts[0][0], name) is None:
                return None
            return torch.stack([torch.cat([getattr(q, name) for q in expert]) for expert in parts])

        codes, scale = field("codes"), field("scale")
        assert codes is not None and scale is not None
        return QuantizedWeight(codes, scale, field("zero"))

    stored = {}
    for layer, experts in layers.items():
        gate, up, down = _names(experts[0])

        def of(e: int, w: str, layer: str = layer) -> QuantizedWeight:
            return quantized[f"{layer}.experts.{e}.{w}.weight"]

        ids = sorted(experts)
        stored[layer] = (stack([[of(e, gate), of(e, up)] for e in ids]), stack([[of(e, down)] for e in ids]))
    return stored


def gptq_checkpoint(
    family: str, out: Path, group: int = 16
) -> dict[str, tuple[QuantizedWeight, QuantizedWeight]]:
    """Every expert linear as asymmetric 4-bit GPTQ ("v1": stored zero points one less than the zero)."""
    tensors = _saved_demo(family, out)
    layers = _per_expert_layers(tensors)
    quantized: dict[str, QuantizedWeight] = {}
    for name in list(tensors):
        if not _EXPERT_LINEAR.match(name):
            continue
        weight = tensors.pop(name).float()  # [N, K]
        q = quantize(INT4, group, weight[None], zero_point=True)
        assert q.zero is not None
        quantized[name] = QuantizedWeight(
            q.codes[0], q.scale[0].half().float(), q.zero[0]
        )  # scales stored fp16
        n, k = weight.shape
        codes = unpack_nibbles(q.codes[0]).t()  # [K, N]
        prefix = name.removesuffix(".weight")
        tensors[f"{prefix}.qweight"] = _pack_words(codes.reshape(k // 8, 8, n).permute(0, 2, 1))
        zeros = q.zero[0].t().to(torch.int64) - 1  # [K/G, N], stored zero - 1
        tensors[f"{prefix}.qzeros"] = _pack_words(zeros.reshape(k // group, n // 8, 8))
        tensors[f"{prefix}.scales"] = q.scale[0].t().half()
        tensors[f"{prefix}.g_idx"] = torch.arange(k, dtype=torch.int32) // group
    stored = _stacked_layers(layers, quantized)
    _finish(
        out,
        tensors,
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "desc_act": False,
            "sym": False,
            "checkpoint_format": "gptq",
        },
    )
    return stored


def gpt_oss_mxfp4_checkpoint(out: Path) -> dict[str, tuple[QuantizedWeight, QuantizedWeight]]:
    """GPT-OSS's experts as MXFP4 `_blocks` / `_scales`, gate and up rows interleaved as it stores them."""
    tensors = _saved_demo("gpt_oss", out)
    stored: dict[str, tuple[QuantizedWeight, QuantizedWeight]] = {}
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
        layer = name.removesuffix(".experts.gate_up_proj")
        tables = {}
        for which in ("gate_up_proj", "down_proj"):
            weight = (
                tensors.pop(f"{layer}.experts.{which}").float().transpose(1, 2)
            )  # [E, N, K]; gate/up interleaved
            q = quantize(MXFP4, 32, weight)
            e, n, half_k = q.codes.shape
            tensors[f"{layer}.experts.{which}_blocks"] = _pairs(q.codes).reshape(e, n, half_k // 16, 16)
            tensors[f"{layer}.experts.{which}_scales"] = q.scale
            tables[which] = q
        gu = tables["gate_up_proj"]
        stored[layer] = (
            QuantizedWeight(
                torch.cat([gu.codes[:, 0::2], gu.codes[:, 1::2]], dim=1),
                torch.cat([gu.scale[:, 0::2], gu.scale[:, 1::2]], dim=1),
            ),
            tables["down_proj"],
        )
    _finish(
        out,
        tensors,
        {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
    )
    return stored
