"""`LoadedModel`: a PyTorch module ready to export, with its example inputs and input factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moetrt.core.artifacts import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, WRAPPED_PREFIX

if TYPE_CHECKING:
    from moetrt.export.cached import StateLayout
    from moetrt.export.offloaded import OffloadedWeights

#: Sequence length of the export example. >= 3 so the exporter keeps the sequence dimension symbolic.
EXAMPLE_SEQ = 8
#: Batch of the export example. >= 2: a batch-1 example specialises the graph to batch 1.
EXAMPLE_BATCH = 2
#: Past length of a cached decoder's export example: >= 2 for the same reason (0 and 1 are specialised).
EXAMPLE_PAST = 5


@dataclass(frozen=True)
class DecoderForm:
    """What a causal LM's export computes: with the state of every layer as inputs and outputs (`cached`,
    the default) or `input_ids -> logits` over the whole sequence; logits of every position or the last."""

    cached: bool = True
    last_logits: bool = False


CACHED = DecoderForm()
UNCACHED = DecoderForm(cached=False)


@dataclass
class LoadedModel:
    """A model ready for `torch.onnx.export` and for parity checks against its ONNX export.

    `make_inputs(batch, seq, seed)` returns fresh random inputs of the given shape, in the order of
    `input_names`; `module(*inputs)` returns a tensor or a tuple of tensors in the order of `output_names`.
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, dict[int, Any]] | tuple[dict[int, Any], ...]
    make_inputs: Callable[..., tuple[torch.Tensor, ...]]
    num_moe_blocks: int
    spec: str
    dtype: torch.dtype = torch.float32
    #: Smallest sequence length that crosses every internal chunk of the model (e.g. the 64-token chunks
    #: of Qwen3-Next's gated delta rule); verification always includes a sequence at least this long.
    long_seq: int = 72
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: set when the module is on the meta device and its values are on disk (`export.offloaded`)
    offloaded: OffloadedWeights | None = None
    #: a checkpoint whose experts are stored quantized (`export.quantized_checkpoint.StoredCheckpoint`)
    stored: Any = None
    #: a cached decoder's state tensors (`export.cached`); None for every other signature
    state: StateLayout | None = None
    last_logits: bool = False

    def prefixed_inputs(self, batch: int, seq: int, seed: int = 0, past: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of `batch x seq` new tokens after `past` earlier ones (cached decoders; `past` must be 0
        for every other model)."""
        if self.state is None:
            if past:
                raise ValueError(f"{self.spec} keeps no state: it has no past")
            return self.make_inputs(batch, seq, seed)
        return self.make_inputs(batch, seq, seed, past)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Run the module without autograd; always returns a tuple of output tensors."""
        with torch.inference_mode():
            out = self.module(*inputs)
        return _as_tensor_tuple(out)


def _as_tensor_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, list | tuple):
        return tuple(t for t in out if isinstance(t, torch.Tensor))
    if hasattr(out, "to_tuple"):
        return tuple(t for t in out.to_tuple() if isinstance(t, torch.Tensor))
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor or a tuple of tensors")


class CausalLMLogits(nn.Module):
    """`input_ids [batch, seq] -> logits [batch, seq, vocab]`, no KV cache: the exported signature."""

    WRAPPED_PREFIX = WRAPPED_PREFIX

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class FirstOutput(nn.Module):
    """Keeps only the first output of a module (MoE blocks that also return router logits or scores)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden_states)
        return out[0] if isinstance(out, tuple | list) else out


def is_moe_block(module: nn.Module) -> bool:
    """A module that holds stacked experts (3-D weights, or a list of >= 2 expert MLPs) plus a router.

    The router is another child holding (itself or nested, e.g. `gate.wg`) a 2-D weight whose first dimension
    is the number of experts.
    """
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return False
    num_experts = _num_experts(experts)
    if num_experts < 2:
        return False
    for name, child in module.named_children():
        if name == "experts":
            continue
        for weight in child.parameters():
            if weight.dim() == 2 and weight.shape[0] == num_experts:
                return True
    return False


def _num_experts(experts: nn.Module) -> int:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    stacked = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
    return stacked[0].shape[0] if stacked else 0


def count_moe_blocks(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_moe_block(m))


def random_token_inputs(vocab_size: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    def make_inputs(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randint(0, vocab_size, (batch, seq), generator=gen, dtype=torch.int64),)

    return make_inputs


def random_hidden_inputs(hidden_size: int, dtype: torch.dtype) -> Callable[..., tuple[torch.Tensor, ...]]:
    def make_inputs(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, seq, hidden_size, generator=gen).to(dtype),)

    return make_inputs


def token_dynamic_shapes(input_name: str) -> dict[str, dict[int, Any]]:
    """Dynamic batch (dim 0) and sequence (dim 1) for one input."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=131072)
    return {input_name: {0: batch, 1: seq}}


def causal_lm(
    model: nn.Module,
    vocab_size: int,
    spec: str,
    dtype: torch.dtype,
    description: str,
    long_seq: int | None = None,
    form: DecoderForm = CACHED,
) -> LoadedModel:
    """A causal LM as a cached decoder (`export.cached`) or as `input_ids -> logits` (no cache). Models with
    chunked linear attention export with an example longer than one chunk; `long_seq` defaults to a length
    that crosses every chunk."""
    from moetrt.export.export_friendly import CHUNKED_EXAMPLE_SEQ, has_chunked_linear_attention

    chunked = has_chunked_linear_attention(model)
    example_seq = CHUNKED_EXAMPLE_SEQ if chunked else EXAMPLE_SEQ
    long_seq = long_seq if long_seq is not None else (130 if chunked else 80)
    if form.cached:
        return _cached_causal_lm(model, vocab_size, spec, dtype, description, long_seq, example_seq, form)
    make_inputs = random_token_inputs(vocab_size)
    return LoadedModel(
        module=CausalLMLogits(model).eval(),
        example_inputs=make_inputs(EXAMPLE_BATCH, example_seq),
        input_names=[INPUT_IDS],
        output_names=[LOGITS],
        dynamic_shapes=token_dynamic_shapes(INPUT_IDS),
        make_inputs=make_inputs,
        num_moe_blocks=count_moe_blocks(model),
        spec=spec,
        dtype=dtype,
        long_seq=long_seq,
        description=description,
    )


def _cached_causal_lm(
    model: nn.Module,
    vocab_size: int,
    spec: str,
    dtype: torch.dtype,
    description: str,
    long_seq: int,
    example_seq: int,
    form: DecoderForm,
) -> LoadedModel:
    from moetrt.export.cached import CausalLMWithState, read_state_layout, state_dynamic_shapes, state_inputs

    layout = read_state_layout(model)
    tensors = layout.tensors()
    module = CausalLMWithState(model, layout, form.last_logits).eval()
    make_inputs = state_inputs(module, layout, vocab_size)
    return LoadedModel(
        module=module,
        example_inputs=make_inputs(EXAMPLE_BATCH, example_seq, 0, EXAMPLE_PAST),
        input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *(t.past for t in tensors)],
        output_names=[LOGITS, *(t.present for t in tensors)],
        dynamic_shapes=state_dynamic_shapes(layout),
        make_inputs=make_inputs,
        num_moe_blocks=count_moe_blocks(model),
        spec=spec,
        dtype=dtype,
        long_seq=long_seq,
        description=description,
        state=layout,
        last_logits=form.last_logits,
    )
