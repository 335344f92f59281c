"""Experts stored quantized in a Hugging Face checkpoint, read into the fused op's layouts without a float detour.

`checkpoint_quantization(config)` names what config.json's `quantization_config` describes, or refuses it with
what is supported. `read_experts(...)` turns one MoE layer's stored expert tensors into the op's codes and
scales (op/quant.py) by exact integer and byte moves — no weight is dequantized on the way:

| checkpoint (`quant_method`)            | stored, per expert                               | op format  |
|---|---|---|
| fine-grained FP8 (`fp8`, block B x B)   | `weight` e4m3 [N, K], `weight_scale_inv` [N/B, K/B] | fp8_block B |
| MXFP4 (`mxfp4`, GPT-OSS)               | `*_blocks` [E, N, K/32, 16] u8, `*_scales` [E, N, K/32] e8m0 | mxfp4 |
| GPTQ (`gptq`, 4 bits, no act-order)    | `qweight` i32 [K/8, N], `qzeros` i32 [K/G, N/8], `scales` [K/G, N] | int4 G |
| AWQ (`awq`, 4 bits, GEMM packing)      | `qweight` i32 [K, N/8], `qzeros` i32 [K/G, N/8], `scales` [K/G, N] | int4 G |

The op keeps gate rows then up rows ([E, 2I, H]); GPT-OSS interleaves them (row 2j gate j, 2j + 1 up j), so its
rows are de-interleaved, codes and scales alike. Scales stay as stored (float scales widened to float32, e8m0
bytes unchanged). GPTQ's stored zero points are one less than the zero (its "v1" checkpoints).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moetrt.core.errors import MoetrtError
from moetrt.op.quant import QuantizedWeight, pack_nibbles, pairs_to_runs
from moetrt.op.spec import FP8_BLOCK, INT4, INT4_SYMMETRIC_ZERO, MXFP4, MXFP4_GROUP

SUPPORTED = (
    "fine-grained FP8 with square weight blocks (quant_method fp8, as Qwen3-Next-FP8 and DeepSeek-V3 ship), "
    "MXFP4 (quant_method mxfp4, GPT-OSS), GPTQ 4-bit without act-order and AWQ 4-bit GEMM"
)
# AWQ's GEMM packing: nibble j of a 32-bit word holds column AWQ_ORDER[j] of its 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GATE_NAMES, UP_NAMES, DOWN_NAMES = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's quantization_config says, in the op's terms."""

    method: str  # quant_method as stored: fp8 | mxfp4 | gptq | awq
    weight_format: str
    block: int
    zero_point: bool  # int4 with zero points as inputs (GPTQ asymmetric, AWQ)
    modules_not_quantized: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        return {
            "format": self.weight_format,
            "block": self.block,
            "zero_point": self.zero_point,
            "method": f"stored by the checkpoint ({self.method}), read without dequantizing",
        }


def _refuse(method: str, why: str) -> MoetrtError:
    return MoetrtError(
        f"a {method}-quantized checkpoint {why}; moetrt reads {SUPPORTED}",
        "export the model's bf16 checkpoint and quantize its experts with `moetrt build --weights fp8|int4|mxfp4`",
    )


def checkpoint_quantization(config: Mapping[str, Any]) -> CheckpointQuantization | None:
    """The quantization config.json describes (None: a float checkpoint); refused by name where unsupported."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, Mapping):
        raise _refuse("unknown", "has a quantization_config that is not an object")
    method = str(quant.get("quant_method", "unknown")).lower()
    skip = tuple(
        str(m) for m in (quant.get("modules_to_not_convert") or quant.get("ignored_layers") or []) if m
    )
    if method == "fp8":
        block = quant.get("weight_block_size")
        if not (
            isinstance(block, list | tuple) and len(block) == 2 and block[0] == block[1] and block[0] > 0
        ):
            raise _refuse(method, f"with weight_block_size {block!r} (per-tensor or non-square blocks)")
        if str(quant.get("fmt", "e4m3")).lower() != "e4m3":
            raise _refuse(method, f"stored as {quant.get('fmt')}")
        return CheckpointQuantization(method, FP8_BLOCK, int(block[0]), False, skip)
    if method == "mxfp4":
        return CheckpointQuantization(method, MXFP4, MXFP4_GROUP, False, skip)
    if method in ("gptq", "awq"):
        bits = quant.get("bits", quant.get("w_bit"))
        if bits != 4:
            raise _refuse(method, f"with {bits} bits (4-bit only)")
        group = quant.get("group_size", quant.get("q_group_size"))
        if not isinstance(group, int) or group <= 0:
            raise _refuse(method, f"with group_size {group!r} (per-group scales only)")
        if method == "gptq":
            if quant.get("desc_act"):
                raise _refuse(method, "with act-order (desc_act), whose groups are not contiguous")
            if str(quant.get("checkpoint_format", "gptq")).lower() != "gptq":
                raise _refuse(method, f"in the {quant.get('checkpoint_format')} checkpoint format")
            return CheckpointQuantization(method, INT4, group, not quant.get("sym", True), skip)
        if str(quant.get("version", "gemm")).lower() != "gemm":
            raise _refuse(method, f"in the {quant.get('version')} packing (GEMM only)")
        return CheckpointQuantization(method, INT4, group, bool(quant.get("zero_point", True)), skip)
    raise _refuse(method, "is not read")


# ------------------------------------------------------------------------------------------------ readers
Reader = Callable[[str], torch.Tensor]  # a tensor of the checkpoint by its full name


def _nibbles_low_first(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit fields along a new last dim, lowest bits first, moved to `dim` (x8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    fields = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., 8]
    fields = fields.movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(words.shape)
    shape[dim] *= 8
    return fields.reshape(shape).to(torch.uint8)


def _gptq(read: Reader, prefix: str, zero_point: bool) -> QuantizedWeight:
    qweight, qzeros, scales = read(f"{prefix}.qweight"), read(f"{prefix}.qzeros"), read(f"{prefix}.scales")
    codes = _nibbles_low_first(qweight, 0)  # [K, N]: packed along K
    zeros = _nibbles_low_first(qzeros, 1).to(torch.int32) + 1  # [G, N]: packed along N; stored zero - 1
    return _int4(codes.t(), scales.t(), zeros.t(), zero_point, prefix)


def _awq(read: Reader, prefix: str, zero_point: bool) -> QuantizedWeight:
    qweight, qzeros, scales = read(f"{prefix}.qweight"), read(f"{prefix}.qzeros"), read(f"{prefix}.scales")
    order = torch.tensor(AWQ_ORDER)
    inverse = torch.argsort(order)

    def unpack(words: torch.Tensor) -> torch.Tensor:  # [R, N/8] -> [R, N] in column order
        fields = _nibbles_low_first(words, 1).unflatten(1, (-1, 8))  # field j holds column order[j]
        return fields[:, :, inverse].flatten(1)

    codes, zeros = unpack(qweight), unpack(qzeros).to(torch.int32)  # [K, N], [G, N]
    return _int4(codes.t(), scales.t(), zeros.t(), zero_point, prefix)


def _int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, zero_point: bool, where: str
) -> QuantizedWeight:
    """codes [N, K], scales / zeros [N, K/G] -> the op's int4 weight."""
    if zeros.min() < 0 or zeros.max() > 255:
        raise MoetrtError(
            f"{where}: zero points outside 0..255", "the checkpoint is not a 4-bit GPTQ/AWQ one"
        )
    if not zero_point and bool((zeros != INT4_SYMMETRIC_ZERO).any()):
        raise MoetrtError(
            f"{where}: a symmetric checkpoint whose zero points are not {INT4_SYMMETRIC_ZERO}",
            "mark it asymmetric (sym: false) in quantization_config",
        )
    return QuantizedWeight(
        pack_nibbles(codes.contiguous()),
        scales.float().contiguous(),
        zeros.to(torch.uint8).contiguous() if zero_point else None,
    )


def _fp8(read: Reader, prefix: str) -> QuantizedWeight:
    weight = read(f"{prefix}.weight")
    if weight.dtype != torch.float8_e4m3fn:
        raise MoetrtError(
            f"{prefix}.weight is {weight.dtype}, not float8_e4m3fn", "re-save the FP8 checkpoint"
        )
    return QuantizedWeight(weight.view(torch.uint8).contiguous(), read(f"{prefix}.weight_scale_inv").float())


def _linear(quant: CheckpointQuantization, read: Reader, prefix: str) -> QuantizedWeight:
    if quant.method == "fp8":
        return _fp8(read, prefix)
    if quant.method == "gptq":
        return _gptq(read, prefix, quant.zero_point)
    return _awq(read, prefix, quant.zero_point)


def _stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
    zero = None if weights[0].zero is None else torch.stack([w.zero for w in weights])  # type: ignore[misc]
    return QuantizedWeight(
        torch.stack([w.codes for w in weights]), torch.stack([w.scale for w in weights]), zero
    )


def _cat_rows(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    zero = None if a.zero is None else torch.cat([a.zero, b.zero], dim=-2)  # type: ignore[list-item]
    return QuantizedWeight(torch.cat([a.codes, b.codes], dim=-2), torch.cat([a.scale, b.scale], dim=-2), zero)


@dataclass(frozen=True)
class QuantizedExperts:
    """One MoE layer's routed experts in the op's layouts: gate_up [E, 2I, H], down [E, H, I]."""

    gate_up: QuantizedWeight
    down: QuantizedWeight


def expert_layers(names: list[str]) -> dict[str, int]:
    """MoE layer prefix (the module holding `experts`) -> number of experts, from the checkpoint's names."""
    layers: dict[str, set[int]] = {}
    for name in names:
        match = re.match(r"(.+)\.experts\.(\d+)\.", name)
        if match:
            layers.setdefault(match.group(1), set()).add(int(match.group(2)))
            continue
        match = re.match(r"(.+)\.experts\.gate_up_proj_blocks$", name)
        if match:
            layers.setdefault(match.group(1), set())
    return {prefix: len(ids) for prefix, ids in layers.items()}


def _linear_name(names: set[str], prefix: str, choices: tuple[str, ...], leaf: str) -> str:
    """The stored name of an expert's linear (gate_proj or Mixtral's w1, ...), by the tensor it must hold."""
    for choice in choices:
        if f"{prefix}.{choice}.{leaf}" in names:
            return f"{prefix}.{choice}"
    raise MoetrtError(
        f"{prefix} has none of {', '.join(choices)} ({leaf})",
        "the checkpoint's expert layout is not a known one",
    )


def read_experts(
    quant: CheckpointQuantization, read: Reader, names: set[str], layer: str, num_experts: int
) -> QuantizedExperts:
    """The routed experts of MoE layer `layer` (e.g. 'model.layers.3.mlp') as stored, in the op's layouts."""
    if quant.method == "mxfp4":
        return _gpt_oss_mxfp4(read, layer)
    leaf = "weight" if quant.method == "fp8" else "qweight"
    gate_up, down = [], []
    for e in range(num_experts):
        expert = f"{layer}.experts.{e}"
        gate = _linear(quant, read, _linear_name(names, expert, GATE_NAMES, leaf))
        up = _linear(quant, read, _linear_name(names, expert, UP_NAMES, leaf))
        if quant.weight_format == FP8_BLOCK and gate.codes.shape[0] % quant.block:
            raise MoetrtError(
                f"{expert}: {gate.codes.shape[0]} gate rows are not whole {quant.block}-row blocks, so gate and up "
                "cannot share the op's scale grid",
                "quantize the bf16 checkpoint with `moetrt build --weights fp8` instead",
            )
        gate_up.append(_cat_rows(gate, up))
        down.append(_linear(quant, read, _linear_name(names, expert, DOWN_NAMES, leaf)))
    return QuantizedExperts(_stack(gate_up), _stack(down))


def _gpt_oss_mxfp4(read: Reader, layer: str) -> QuantizedExperts:
    def weight(which: str, interleaved: bool) -> QuantizedWeight:
        blocks, scales = read(f"{layer}.experts.{which}_blocks"), read(f"{layer}.experts.{which}_scales")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != MXFP4_GROUP // 2:
            raise MoetrtError(
                f"{layer}.experts.{which}_blocks/_scales are not MXFP4 (uint8 [E, N, K/32, 16] and [E, N, K/32])",
                "re-save the GPT-OSS checkpoint",
            )
        # [E, N, K/2]: 32 values a group, byte j holding k = 2j and 2j + 1 -> the op's runs (a byte reorder)
        codes = pairs_to_runs(blocks.flatten(-2))
        if interleaved:  # rows gate 0, up 0, gate 1, ... -> gate rows, then up rows
            codes = torch.cat([codes[:, 0::2], codes[:, 1::2]], dim=1)
            scales = torch.cat([scales[:, 0::2], scales[:, 1::2]], dim=1)
        return QuantizedWeight(codes.contiguous(), scales.contiguous())

    return QuantizedExperts(weight("gate_up_proj", True), weight("down_proj", False))


# ------------------------------------------------------------------------------------- the whole checkpoint
class StoredCheckpoint:
    """A stored-quantized checkpoint directory: its tensors by name (read one at a time from the safetensors
    shards) and its MoE layers' experts in the op's layouts."""

    def __init__(self, path: Any, quant: CheckpointQuantization) -> None:
        import json
        from pathlib import Path

        self.path, self.quant = Path(path), quant
        self._file: dict[str, Path] = {}
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            for name, file in json.loads(index.read_text())["weight_map"].items():
                self._file[name] = self.path / file
        else:
            from safetensors import safe_open

            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self._file.update(dict.fromkeys(handle.keys(), file))
        self.names = set(self._file)
        self.layers = expert_layers(sorted(self.names))

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file[name]), "pt") as handle:
            return handle.get_tensor(name)

    def experts(self, layer: str) -> QuantizedExperts:
        return read_experts(self.quant, self.read, self.names, layer, self.layers[layer])

    def tables(self, layer: str) -> tuple[QuantizedWeight, QuantizedWeight]:
        """MoE layer `layer`'s (gate_up, down) in the op's layouts (`passes.stored_experts.LayerReader`)."""
        experts = self.experts(layer)
        return experts.gate_up, experts.down

    def layers_in_order(self) -> list[str]:
        """The MoE layers by layer index: the order the exported graph runs them in."""

        def order(layer: str) -> tuple[int, str]:
            index = _layer_index(layer)
            return (-1 if index is None else index, layer)

        return sorted(self.layers, key=order)

    def layer_for(self, module_prefix: str) -> str:
        """The checkpoint's MoE layer for a model's MoE module (same name, or the same `layers.N` index: Mixtral
        stores `block_sparse_moe` where transformers names the module `mlp`)."""
        if module_prefix in self.layers:
            return module_prefix
        index = _layer_index(module_prefix)
        if index is not None:
            same = [layer for layer in self.layers if _layer_index(layer) == index]
            if len(same) == 1:
                return same[0]
        raise MoetrtError(
            f"the checkpoint has no experts for the model's MoE module {module_prefix!r}",
            f"its expert layers are {', '.join(sorted(self.layers)[:4])}...",
        )


def _layer_index(name: str) -> int | None:
    """N of the `layers.N` a tensor or module name lies in (None outside the layer stack)."""
    found = re.search(r"layers\.(\d+)\.", name + ".")
    return int(found.group(1)) if found else None


_EXPERT_PARAM = re.compile(r"(.+)\.experts\.(gate_up_proj|down_proj)$")


class StoredWeights:
    """The values of a meta-device model's parameters from a stored-quantized checkpoint, by parameter name: the
    `weights_map` accelerate's offload hooks read while the model runs (one module at a time), and the source
    of the export's lazy initializers (`export.offloaded`).

    Non-expert tensors are read as stored (FP8 linears dequantized with their block scales: only the experts
    stay quantized). Expert tables are dequantized into the model's own parameter layout only when something
    reads them — a forward of the traced module, a fusion's numeric check — one MoE layer at a time; the build
    puts the stored codes, not these values, in the fused nodes."""

    def __init__(
        self, stored: StoredCheckpoint, params: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    ) -> None:
        self.stored, self.params = stored, dict(params)
        self.all_keys = list(self.params)
        self._layer: tuple[str, dict[str, torch.Tensor]] | None = None
        missing = [name for name in self.params if not self._resolvable(name)]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise MoetrtError(
                f"the checkpoint in {str(stored.path)!r} has no values for {len(missing)} parameter(s) ({shown})",
                "use the complete checkpoint (every *.safetensors shard and its index) saved with this config",
            )

    def _checkpoint_name(self, name: str) -> str | None:
        if name in self.stored.names:
            return name
        for prefix in self.stored.layers:  # a renamed MoE module (Mixtral's block_sparse_moe)
            index = _layer_index(prefix)
            if index is None:
                continue
            model_prefix = re.match(rf"(.*layers\.{index}\.[^.]+)\.", name)
            if model_prefix and self.stored.layer_for(model_prefix.group(1)) == prefix:
                renamed = prefix + name[len(model_prefix.group(1)) :]
                if renamed in self.stored.names:
                    return renamed
        return None

    def _resolvable(self, name: str) -> bool:
        match = _EXPERT_PARAM.match(name)
        if match:
            try:
                self.stored.layer_for(match.group(1))
            except MoetrtError:
                return False
            return True
        return self._checkpoint_name(name) is not None

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def keys(self) -> list[str]:
        return self.all_keys

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype = self.params[name]
        match = _EXPERT_PARAM.match(name)
        if match:
            return self._expert_table(match.group(1), match.group(2), shape).to(dtype)
        stored_name = self._checkpoint_name(name)
        assert stored_name is not None
        tensor = self.stored.read(stored_name)
        if tensor.dtype == torch.float8_e4m3fn and f"{stored_name}_scale_inv" in self.stored.names:
            block = self.stored.quant.block
            scale = self.stored.read(f"{stored_name}_scale_inv").float()
            grid = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            tensor = tensor.float() * grid[: tensor.shape[0], : tensor.shape[1]]
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _expert_table(self, module: str, which: str, shape: tuple[int, ...]) -> torch.Tensor:
        from moetrt.op.quant import dequantize

        if self._layer is None or self._layer[0] != module:
            experts = self.stored.experts(self.stored.layer_for(module))
            fmt, block = self.stored.quant.weight_format, self.stored.quant.block
            hidden = experts.down.codes.shape[-2]  # the gate/up reduction: the down table's rows
            intermediate = experts.gate_up.codes.shape[-2] // 2  # the down reduction
            self._layer = (
                module,
                {
                    "gate_up_proj": dequantize(fmt, block, experts.gate_up, hidden),
                    "down_proj": dequantize(fmt, block, experts.down, intermediate),
                },
            )
        table = self._layer[1][which]  # the op's layout: [E, 2I, H] gate rows then up rows, [E, H, I]
        if (
            self.stored.quant.method == "mxfp4"
        ):  # GPT-OSS's own: [E, H, 2I] with gate / up interleaved, [E, I, H]
            if which == "gate_up_proj":
                half = table.shape[1] // 2
                table = torch.stack([table[:, :half], table[:, half:]], dim=2).flatten(1, 2)
            table = table.transpose(1, 2).contiguous()
        if tuple(table.shape) == tuple(shape):
            return table
        raise MoetrtError(
            f"the model's {module}.experts.{which} is {list(shape)}, the checkpoint's experts give {list(table.shape)}",
            "the checkpoint's expert layout is not a known one",
        )
