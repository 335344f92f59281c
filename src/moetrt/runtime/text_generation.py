"""`moetrt generate`: open a cached decoder artifact with its tokenizer, turn prompts into ids, generate, report.

The artifact is a `moetrt build` directory (its engine, or its model.onnx with `backend="onnxruntime"`; the
tokenizer, generation_config.json and the context limit come from beside it and its manifest) or a cached
decoder .onnx (ids only: no tokenizer travels with a bare file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrt.core.artifacts import GENERATION_CONFIG_NAME, MANIFEST_NAME
from moetrt.core.errors import MoetrtError
from moetrt.runtime.generation import EngineDecoder, Generation, OrtDecoder, Sampling, StateDecoder, generate
from moetrt.runtime.loading import resolve_artifact
from moetrt.runtime.manifest import read_manifest


@dataclass
class Generator:
    """A loaded decoder with what travels beside it."""

    path: Path
    decoder: StateDecoder
    backend: str
    tokenizer: Any | None
    max_context: int | None
    stop_ids: list[int]
    pad_id: int


@dataclass(frozen=True)
class PromptRequest:
    """What to generate: prompts as text (needs a tokenizer) or as ids; `batch` repeats one prompt."""

    texts: Sequence[str] = ()
    #: each text is one user message, rendered with the tokenizer's chat template
    chat: bool = False
    ids: Sequence[Sequence[int]] = ()
    batch: int | None = None
    max_new_tokens: int = 32
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: Sequence[int] = ()


def open_generator(artifact: str | Path, backend: str | None = None, check: bool = True) -> Generator:
    """Load a cached decoder; refuses an artifact without state with how to rebuild it."""
    from moetrt.runtime.decoder_io import state_from_metadata

    path = resolve_artifact(artifact, backend)
    manifest_path = path.parent / MANIFEST_NAME
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    if check and manifest is not None and path.suffix == ".onnx":
        from moetrt.runtime.loading import check_against_manifest

        check_against_manifest(path)
    if path.suffix == ".plan" and backend != "onnxruntime":
        from moetrt.runtime.engine import Engine
        from moetrt.trt.trt_build import current_device_sm

        if current_device_sm() is None:  # before TensorRT is imported: say how to generate here instead
            raise MoetrtError(
                f"{path} is a TensorRT engine and no CUDA GPU is visible",
                "generate with its portable model on the CPU: add --backend onnxruntime",
            )
        engine = Engine(path, manifest)
        state = engine.state
        decoder: StateDecoder | None = EngineDecoder(engine, state) if state is not None else None
        used = engine.backend
    else:
        import onnx

        header = onnx.load(str(path), load_external_data=False)
        state = state_from_metadata({p.key: p.value for p in header.metadata_props})
        decoder = OrtDecoder(path, state) if state is not None else None
        used = "onnxruntime"
    if decoder is None or state is None:
        raise MoetrtError(
            f"{path} is not a cached decoder (it has no KV cache / state inputs), so every new token would "
            "recompute the whole prefix",
            "rebuild it as one: `moetrt build MODEL -o OUTDIR` (without --no-cache)",
        )
    decoder_entry = (manifest or {}).get("decoder") or {}
    tokenizer = _tokenizer(path.parent) if decoder_entry.get("tokenizer") else None
    stop_ids = _generation_stop_ids(path.parent) if decoder_entry.get("generation_config") else []
    pad_id = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = int(tokenizer.pad_token_id)
    return Generator(
        path=path,
        decoder=decoder,
        backend=used,
        tokenizer=tokenizer,
        max_context=decoder_entry.get("max_context"),
        stop_ids=stop_ids,
        pad_id=pad_id,
    )


def prompt_ids(generator: Generator, request: PromptRequest) -> list[list[int]]:
    """Token ids per sequence; `batch` repeats a single prompt."""
    if request.texts and request.ids:
        raise MoetrtError("both --prompt and --prompt-ids given", "pass one of them")
    if request.texts:
        if generator.tokenizer is None:
            raise MoetrtError(
                f"{generator.path} has no tokenizer, so --prompt cannot be turned into ids",
                "pass --prompt-ids 1,2,3, or generate from a `moetrt build` directory of a model with one",
            )
        prompts = [_encode(generator, text, request.chat) for text in request.texts]
    elif request.chat:
        raise MoetrtError("--chat renders text prompts", "pass --prompt TEXT with --chat (not --prompt-ids)")
    elif request.ids:
        prompts = [list(p) for p in request.ids]
    else:
        raise MoetrtError("no prompt given", "pass --prompt TEXT or --prompt-ids 1,2,3")
    if request.batch is not None:
        if len(prompts) == 1:
            prompts = prompts * request.batch
        elif len(prompts) != request.batch:
            raise MoetrtError(
                f"--batch {request.batch} with {len(prompts)} prompts",
                "give one prompt (repeated --batch times) or leave out --batch",
            )
    vocab = _vocab_limit(generator)
    for prompt in prompts:
        bad = [i for i in prompt if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise MoetrtError(f"prompt ids {bad[:5]} are outside the vocabulary 0..{vocab}", "pass valid ids")
    return prompts


def _encode(generator: Generator, text: str, chat: bool) -> list[int]:
    tokenizer = generator.tokenizer
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise MoetrtError(
            f"{generator.path.parent} has no chat template (chat_template.jinja or tokenizer_config.json's)",
            "leave out --chat to send the prompt as plain text",
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def run_generation(generator: Generator, request: PromptRequest, on_step: Any = None) -> Generation:
    prompts = prompt_ids(generator, request)
    return generate(
        generator.decoder,
        prompts,
        request.max_new_tokens,
        request.sampling,
        stop_ids=[*generator.stop_ids, *request.stop_ids],
        pad_id=generator.pad_id,
        max_context=generator.max_context,
        on_step=on_step,
    )


def decode_text(generator: Generator, ids: Sequence[int]) -> str | None:
    if generator.tokenizer is None:
        return None
    return str(generator.tokenizer.decode(list(ids), skip_special_tokens=False))


def generation_json(generator: Generator, result: Generation) -> dict[str, Any]:
    out: dict[str, Any] = {"ids": result.ids}
    if generator.tokenizer is not None:
        out["text"] = [decode_text(generator, ids) for ids in result.ids]
    out |= {
        "prompt_tokens": result.prompt_lengths,
        "stopped": result.stopped,
        "backend": generator.backend,
        "prefill_seconds": round(result.prefill_seconds, 6),
        "decode_seconds": round(result.decode_seconds, 6),
        "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
    }
    return out


def _vocab_limit(generator: Generator) -> int | None:
    session = getattr(generator.decoder, "session", None)
    if session is None:
        return None
    for output in session._session.get_outputs():
        if output.name == "logits" and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
    return None


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises many types for broken tokenizer files
        raise MoetrtError(
            f"the tokenizer files in {directory} do not load: {str(err).strip().splitlines()[0]}",
            "rebuild the directory with `moetrt build`, or pass --prompt-ids",
        ) from None


def _generation_stop_ids(directory: Path) -> list[int]:
    try:
        config = json.loads((directory / GENERATION_CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise MoetrtError(
            f"{directory / GENERATION_CONFIG_NAME} does not read as JSON ({err})",
            "rebuild with `moetrt build`",
        ) from None
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
