"""Text generation over a cached decoder (`export.cached`): prefill, then one token per step, the state of every
layer kept on the device between steps.

- `OrtDecoder`: onnxruntime with I/O binding. Each step's present state stays an OrtValue where onnxruntime
  put it and is bound as the next step's past; only the logits leave the session.
- `EngineDecoder`: a TensorRT / TensorRT-RTX engine with the build's prefill and decode profiles; the state
  lives in CUDA buffers the engine writes and reads back the next step.

Batches hold prompts of different lengths left-padded (attention mask 0, position ids `cumsum(mask) - 1`) as
transformers' generate does; a sequence that produced a stop token stops (its later slots get the pad id).
Sampling, on the host: temperature, then top-k, then top-p (transformers' order), one seeded generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moetrt.core.artifacts import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, StateTensor
from moetrt.core.dtypes import precision
from moetrt.core.errors import MoetrtError
from moetrt.export.cached import positions


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 keep every token."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MoetrtError(f"temperature {self.temperature} is negative", "use 0 (greedy) or more")
        if self.top_k < 0:
            raise MoetrtError(f"top-k {self.top_k} is negative", "use 0 (off) or a positive count")
        if not 0 < self.top_p <= 1:
            raise MoetrtError(f"top-p {self.top_p} is outside (0, 1]", "use e.g. 0.9, or 1 (off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """What `generate` produced: the new ids of each sequence (through its stop token), timings."""

    ids: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    stopped: list[bool] = field(default_factory=list)
    #: last-position logits of every step, float32 [batch, vocab] (kept when asked)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_lengths) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class StateDecoder(Protocol):
    """One step of a cached decoder, its state kept inside between calls."""

    state: Sequence[StateTensor]

    def reset(self, batch: int) -> None: ...

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Run new tokens; return the logits (torch, [batch, seq or 1, vocab]) and keep the present state."""
        ...


StepCallback = Callable[[int, list[int | None]], None]


def generate(
    decoder: StateDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    max_context: int | None = None,
    on_step: StepCallback | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Prefill `prompts` (one per sequence, left-padded to one length), then decode up to `max_new_tokens`.

    `on_step(step, tokens)` is called after each step with each sequence's new token (None once it stopped).
    """
    check_generation_request(prompts, max_new_tokens, max_context)
    batch = len(prompts)
    ids, mask = left_padded(prompts, pad_id)
    longest = ids.shape[1]
    result = Generation(ids=[[] for _ in prompts], prompt_lengths=[len(p) for p in prompts])
    finished = torch.zeros(batch, dtype=torch.bool)
    stops = torch.tensor(list(stop_ids), dtype=torch.int64)
    generator = torch.Generator().manual_seed(sampling.seed)

    decoder.reset(batch)
    start = time.perf_counter()
    logits = decoder.step(ids, mask, positions(mask, longest))
    last = logits[:, -1].float().cpu()
    result.prefill_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        if keep_logits:
            result.logits.append(last)
        chosen = choose_tokens(last, sampling, generator)
        chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        reported: list[int | None] = []
        for row in range(batch):
            if finished[row]:
                reported.append(None)
                continue
            token = int(chosen[row])
            result.ids[row].append(token)
            reported.append(token)
            if step > 0:
                result.decode_tokens += 1
        finished |= torch.isin(chosen, stops)
        if on_step is not None:
            on_step(step, reported)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
        logits = decoder.step(chosen[:, None], mask, positions(mask, 1))
        last = logits[:, -1].float().cpu()
    result.decode_seconds = time.perf_counter() - decode_start if result.decode_tokens else 0.0
    result.stopped = [bool(f) for f in finished]
    return result


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [batch, longest] of prompts of any lengths, left-padded as transformers pads."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), longest), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.int64)
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


def check_generation_request(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, max_context: int | None
) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MoetrtError("a prompt is empty", "give every sequence at least one token")
    if max_new_tokens < 1:
        raise MoetrtError(f"--max-new-tokens is {max_new_tokens}", "ask for at least 1 new token")
    longest = max(len(p) for p in prompts)
    if max_context is not None and longest + max_new_tokens - 1 > max_context:
        raise MoetrtError(
            f"the prompt ({longest} tokens) and {max_new_tokens} new tokens need a context of "
            f"{longest + max_new_tokens - 1}, over this artifact's {max_context}",
            "shorten the prompt or --max-new-tokens, or rebuild with a larger --max-context",
        )


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row of float32 `[batch, vocab]` logits."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the ones before it already hold top_p; the most likely always stays
        drop = (cumulative - ordered.softmax(dim=-1)) >= sampling.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _state_dtype(tensor: StateTensor) -> torch.dtype:
    return precision(tensor.dtype).torch


def _empty_state(tensor: StateTensor, batch: int, device: str) -> torch.Tensor:
    shape = [batch if d == "batch" else 0 if d == "past" else int(d) for d in tensor.shape]
    return torch.zeros(shape, dtype=_state_dtype(tensor), device=device)


class OrtDecoder:
    """A cached decoder run by onnxruntime with I/O binding (CPU, or CUDA with onnxruntime-gpu)."""

    def __init__(self, path: str | Path, state: Sequence[StateTensor], threads: int | None = None) -> None:
        import onnxruntime as ort

        from moetrt.runtime.session import Session

        self.session = Session(path, threads=threads)  # checks the file, names a missing bf16 kernel
        self._ort = ort
        self._inner = self.session._session
        self.state = list(state)
        self.device = "cuda" if self.session.device.type == "cuda" else "cpu"
        self._past: list[Any] = []
        self._keep: list[torch.Tensor] = []

    def reset(self, batch: int) -> None:
        self._keep = [_empty_state(t, batch, self.device) for t in self.state]
        self._past = [self._ort.OrtValue.from_dlpack(t) for t in self._keep]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
        binding = self._inner.io_binding()
        for name, tensor in (
            (INPUT_IDS, input_ids),
            (ATTENTION_MASK, attention_mask),
            (POSITION_IDS, position_ids),
        ):
            binding.bind_cpu_input(name, tensor.numpy())
        for tensor, value in zip(self.state, self._past):
            binding.bind_ortvalue_input(tensor.past, value)
        binding.bind_output(LOGITS, self.device)
        for tensor in self.state:
            binding.bind_output(tensor.present, self.device)
        try:
            self._inner.run_with_iobinding(binding)
        except Exception as err:  # onnxruntime's errors carry the op and the shapes; keep the first line
            raise MoetrtError(
                f"onnxruntime failed: {str(err).strip().splitlines()[0]}",
                "check the artifact with `moetrt verify`",
            ) from err
        outputs = binding.get_outputs()
        self._past = list(outputs[1:])  # the present state, where onnxruntime put it, is the next past
        return torch.from_dlpack(outputs[0]._ortvalue.to_dlpack())


class EngineDecoder:
    """A cached decoder run by a TensorRT engine (`runtime.engine.Engine`): state in CUDA tensors the engine
    writes as present and reads as past; the engine picks the prefill or decode profile for each step."""

    def __init__(self, engine: Any, state: Sequence[StateTensor]) -> None:
        self.engine = engine
        self.state = list(state)
        self._past: list[torch.Tensor] = []

    def reset(self, batch: int) -> None:
        self._past = [_empty_state(t, batch, "cuda") for t in self.state]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
        feeds = {
            INPUT_IDS: input_ids.cuda(),
            ATTENTION_MASK: attention_mask.cuda(),
            POSITION_IDS: position_ids.cuda(),
            **{t.past: value for t, value in zip(self.state, self._past)},
        }
        outputs = self.engine(feeds)
        self._past = [outputs[t.present] for t in self.state]
        return outputs[LOGITS]
