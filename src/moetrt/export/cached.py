"""The cached decoder: `input_ids, attention_mask, position_ids, past state -> logits, present state`.

One graph serves prefill (seq > 1, past >= 0) and decode (seq = 1). The state of every layer is a graph input
and output, flat and named as onnxruntime-genai and Optimum name theirs (`core.artifacts.state_names`):

- full- and sliding-attention layers: key and value `[batch, kv_heads, past, head_dim]`; the output holds
  `past + seq` positions. Sliding layers keep every position too (their mask limits what they attend to), so
  all attention state grows the same way;
- linear-attention layers (Gated DeltaNet): the convolution state `[batch, conv_dim, kernel]` and the
  recurrent state `[batch, heads, k_dim, v_dim]`, both of fixed size.

The layout is read off the model itself: one forward with the model's own cache on two tokens, whose cache
layers say what each layer keeps. The wrapper then rebuilds a cache of the same kinds from the flat inputs on
every call, so the PyTorch reference and the export run the model's own attention and state code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moetrt.core.artifacts import KV_STATE as KV
from moetrt.core.artifacts import LINEAR_STATE as LINEAR
from moetrt.core.artifacts import WRAPPED_PREFIX, StateTensor, state_names
from moetrt.core.dtypes import name_of
from moetrt.core.errors import MoetrtError
from moetrt.core.progress import quiet_loggers


@dataclass(frozen=True)
class LayerState:
    """What one decoder layer keeps between steps: its kind and each tensor's shape without batch
    (`None` marks the growing past dimension of attention state) and dtype (the recurrent state of Gated
    DeltaNet stays float32 in a bf16 model)."""

    kind: str
    shapes: tuple[tuple[int | None, ...], ...]  # per tensor, dims after batch
    dtypes: tuple[torch.dtype, ...]


@dataclass(frozen=True)
class StateLayout:
    layers: tuple[LayerState, ...]

    def tensors(self) -> list[StateTensor]:
        """Every state tensor in graph order (layer by layer), with its names, shape and dtype."""
        out = []
        for index, layer in enumerate(self.layers):
            names = state_names(index, layer.kind)
            for (past, present), shape, dtype in zip(names, layer.shapes, layer.dtypes):
                dims = ("batch", *_dims(shape))
                out.append(StateTensor(past, present, layer.kind, dims, name_of(dtype), index))
        return out

    def empty_state(self, batch: int, device: Any = "cpu") -> list[torch.Tensor]:
        """The state before the first token: zero-length attention state and zero linear-attention state."""
        return [
            torch.zeros((batch, *(0 if d is None else d for d in shape)), dtype=dtype, device=device)
            for layer in self.layers
            for shape, dtype in zip(layer.shapes, layer.dtypes)
        ]

    @property
    def has_attention(self) -> bool:
        return any(layer.kind == KV for layer in self.layers)


def positions(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Position ids of the last `seq` tokens: `cumsum(mask) - 1`, 0 at padding (as transformers' generate)."""
    ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return ids[:, attention_mask.shape[1] - seq :].contiguous()


def state_inputs(module: nn.Module, layout: StateLayout, vocab_size: int) -> Any:
    """`make_inputs(batch, seq, seed, past=0)` of a cached decoder: random tokens after `past` random earlier
    ones, whose state is what `module` computed for them (from the second sequence on, the first two earlier
    positions are left padding). A module on the meta device (exported from disk) gets random state of the
    right shapes: only its shapes are traced."""

    def make_inputs(batch: int, seq: int, seed: int = 0, past: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        earlier = torch.randint(0, vocab_size, (batch, past), generator=gen, dtype=torch.int64)
        ids = torch.randint(0, vocab_size, (batch, seq), generator=gen, dtype=torch.int64)
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        mask[1:, : min(2, past)] = 0
        state = layout.empty_state(batch)
        if past and _on_meta(module):
            state = [
                torch.randn((batch, *(past if d is None else d for d in shape)), generator=gen).to(dtype)
                for layer in layout.layers
                for shape, dtype in zip(layer.shapes, layer.dtypes)
            ]
        elif past:
            with torch.inference_mode():
                out = module(earlier, mask[:, :past], positions(mask[:, :past], past), *state)
            state = [t.clone() for t in out[1:]]
        return (ids, mask, positions(mask, seq), *state)

    return make_inputs


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def state_dynamic_shapes(layout: StateLayout) -> tuple[Any, ...]:
    """torch.export dynamic shapes of (input_ids, attention_mask, position_ids, (*past)): batch, the new
    tokens, the past (0 allowed: the first prefill) and the mask's past + new."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=131072)
    past = torch.export.Dim("past", min=0, max=131072)
    total = torch.export.Dim("total", min=1, max=262144)
    state = tuple(
        {0: batch, **{i + 1: past for i, d in enumerate(shape) if d is None}}
        for layer in layout.layers
        for shape in layer.shapes
    )
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, state)


def _dims(shape: Sequence[int | None]) -> tuple[int | str, ...]:
    return tuple("past" if d is None else d for d in shape)


def read_state_layout(model: nn.Module) -> StateLayout:
    """Run the model once with its own cache on two tokens and read what each layer kept."""
    # offloaded parameters sit on the meta device (hooks load them per module): inputs go where computing is
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = torch.zeros(1, 2, dtype=torch.int64, device=device)
    cache = _cache_classes()[0](model.config, 0)  # transformers' own, except for linear-only models
    with torch.inference_mode(), quiet_loggers("transformers"):
        out = model(input_ids=ids, cache=cache, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise MoetrtError(
            f"{type(model).__name__} returned no layered cache with use_cache=True",
            "export it without a cache (--no-cache)",
        )
    return StateLayout(tuple(_layer_state(i, layer) for i, layer in enumerate(cache.layers)))


def _layer_state(index: int, layer: Any) -> LayerState:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

    kind = type(layer).__name__
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        keys, values = layer.keys, layer.values
        shapes = ((keys.shape[1], None, keys.shape[3]), (values.shape[1], None, values.shape[3]))
        return LayerState(KV, shapes, (keys.dtype, values.dtype))
    if type(layer) is LinearAttentionLayer and layer.number_of_states == 1:
        conv, recurrent = layer.conv_states[0], layer.recurrent_states[0]
        if conv is None or recurrent is None:
            raise MoetrtError(
                f"layer {index} ({kind}) keeps no convolution or no recurrent state",
                "export it without a cache (--no-cache)",
            )
        return LayerState(
            LINEAR, (tuple(conv.shape[1:]), tuple(recurrent.shape[1:])), (conv.dtype, recurrent.dtype)
        )
    raise MoetrtError(
        f"layer {index} keeps a {kind} cache, which the cached export does not carry "
        "(it carries attention key/value and linear-attention conv/recurrent state)",
        "export it without a cache (--no-cache)",
    )


class CausalLMWithState(nn.Module):
    """`(input_ids, attention_mask, position_ids, *past) -> (logits, *present)` around a Hugging Face causal LM.

    `attention_mask [batch, past + seq]` marks real tokens (1) and left padding (0); `position_ids
    [batch, seq]` are the positions of the new tokens (`cumsum(mask) - 1`, as transformers' generate makes
    them). `last_logits` returns `[batch, 1, vocab]` for the last position only.
    """

    WRAPPED_PREFIX = WRAPPED_PREFIX

    def __init__(self, model: nn.Module, layout: StateLayout, last_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.last_logits = last_logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past_length = attention_mask.shape[1] - input_ids.shape[1]
        cache = _state_cache(self.model.config, self.layout, past, past_length)
        extra = {"logits_to_keep": 1} if self.last_logits else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **extra,
        )
        return (out.logits, *_flat_state(cache, self.layout))


def _state_cache(config: Any, layout: StateLayout, past: Sequence[torch.Tensor], past_length: Any) -> Any:
    state_cache, kv_state, linear_state = _cache_classes()
    cache = state_cache(config, past_length)
    tensors = iter(past)
    layers = []
    for layer in layout.layers:
        first, second = next(tensors), next(tensors)
        if layer.kind == KV:
            layers.append(kv_state(first, second))
        else:  # the model's one-token decode updates the conv state in place: never the caller's tensor
            layers.append(linear_state(first.clone(), second))
    cache.layers = layers
    return cache


def _flat_state(cache: Any, layout: StateLayout) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for layer, state in zip(layout.layers, cache.layers):
        if layer.kind == KV:
            out += [state.keys, state.values]
        else:
            out += [state.conv_states[0], state.recurrent_states[0]]
    return out


@functools.cache
def _cache_classes() -> tuple[type, type, type]:
    """The cache and its layers, made on first use (transformers is imported only then)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer

    class StateCache(DynamicCache):
        """transformers' cache, knowing its past length when no attention layer holds one (a model of linear
        layers only: transformers' own cache then has no length to give its mask code)."""

        def __init__(self, config: Any, past_length: Any) -> None:
            super().__init__(config=config)
            self.past_length = past_length

        def _linear_only(self) -> bool:
            return not any(isinstance(layer, DynamicLayer) for layer in self.layers)

        def get_seq_length(self, layer_idx: int = 0) -> Any:
            return self.past_length if self._linear_only() else super().get_seq_length(layer_idx)

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[Any, int]:
            if self._linear_only():  # a mask no layer reads: sized as a full-attention one would be
                return self.past_length + query_length, 0
            return super().get_mask_sizes(query_length, layer_idx)

    class KVState(DynamicLayer):
        """Key/value state given as tensors; its length is the past dimension itself (DynamicLayer tests
        `numel() == 0`, a guard on a dynamic size the exporter cannot keep)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    class LinearState(LinearAttentionLayer):
        """Conv and recurrent state given as tensors, always 'previous': a zero state is the start state.
        New state is assigned, never copied into the given tensors (they are graph inputs)."""

        def __init__(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
            super().__init__(number_of_states=1)
            self.conv_states[0], self.recurrent_states[0] = conv, recurrent
            self.conv_kernel_size[0] = conv.shape[-1]
            self.device, self.dtype = conv.device, conv.dtype
            self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
            self.has_previous_state[0] = True

        def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **_: Any) -> torch.Tensor:
            full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
            self.conv_states[state_idx] = full[..., -self.conv_kernel_size[state_idx] :]
            return full

        def update_recurrent_state(
            self, recurrent_states: torch.Tensor, state_idx: int = 0, **_: Any
        ) -> torch.Tensor:
            self.recurrent_states[state_idx] = recurrent_states.to(self.recurrent_states[state_idx].dtype)
            return self.recurrent_states[state_idx]

    return StateCache, KVState, LinearState
