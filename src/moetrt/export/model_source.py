"""Resolve a MODEL spec to a `LoadedModel`.

MODEL is one of:
    demo:<family>[:block]          a built-in tiny demo (see `moetrt.export.demo_models.DEMO_FAMILIES`)
    <dir>                          a local Hugging Face model directory (config.json + safetensors weights)
    module:path/to/file.py:factory a Python file whose `factory()` returns a module and example inputs
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetrt.core.dtypes import precision
from moetrt.core.errors import MoetrtError
from moetrt.core.progress import quiet_loggers
from moetrt.export.loaded import (
    CACHED,
    DecoderForm,
    LoadedModel,
    causal_lm,
    count_moe_blocks,
)
from moetrt.export.quantized_checkpoint import (
    CheckpointQuantization,
    StoredCheckpoint,
    StoredWeights,
    checkpoint_quantization,
)

__all__ = ["LoadedModel", "load_model"]

_SPEC_HELP = "MODEL is demo:<family>[:block], a Hugging Face model directory, or module:file.py:factory"


def load_model(
    spec: str,
    dtype: torch.dtype | str = torch.float32,
    offload_dir: Path | None = None,
    form: DecoderForm = CACHED,
) -> LoadedModel:
    """Load the model named by `spec` in eval mode, cast to `dtype`.

    `offload_dir` (Hugging Face directories only): load nothing into memory; the module comes back on the meta
    device, its weights converted into `offload_dir` where they need converting (`export.offloaded`).
    `form`: how a causal LM is wrapped (cached decoder by default); other models ignore it."""
    dtype = precision(dtype).torch
    if spec.startswith("demo:") or spec == "demo":
        return _load_demo(spec, dtype, form)
    if spec.startswith("module:"):
        return _load_module(spec, dtype)
    return _load_hf_dir(spec, dtype, offload_dir, form)


def checkpoint_bytes(spec: str) -> int | None:
    """The size of a Hugging Face directory's safetensors weights; None for other MODEL specs."""
    if spec.startswith(("demo:", "module:")) or spec == "demo":
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def loads_from_disk(spec: str) -> bool:
    """Whether `spec` is a Hugging Face checkpoint too large to hold whole (over
    `offloaded.STREAM_MIN_BYTES`), which is then loaded with `offload_dir` and read from disk."""
    from moetrt.export import offloaded

    size = checkpoint_bytes(spec)
    return size is not None and size > offloaded.STREAM_MIN_BYTES


def _load_demo(spec: str, dtype: torch.dtype, form: DecoderForm) -> LoadedModel:
    from moetrt.export.demo_models import DEFAULT_DEMO, DEMO_FAMILIES, build_demo

    parts = spec.split(":")[1:]
    family = parts[0] if parts and parts[0] else DEFAULT_DEMO
    block = False
    if len(parts) == 2 and parts[1] == "block":
        block = True
    elif len(parts) > 1:
        raise MoetrtError(
            f"cannot parse demo spec {spec!r}",
            f"write demo:<family> or demo:<family>:block with family one of {', '.join(DEMO_FAMILIES)}",
        )
    return build_demo(family, block=block, dtype=dtype, form=form)


def _load_hf_dir(
    spec: str, dtype: torch.dtype, offload_dir: Path | None = None, form: DecoderForm = CACHED
) -> LoadedModel:
    path = Path(spec).expanduser()
    if not path.exists():
        raise MoetrtError(f"model path {spec!r} does not exist", _SPEC_HELP)
    if not path.is_dir():
        raise MoetrtError(
            f"{spec!r} is a file, not a model directory",
            f"pass the directory holding config.json; {_SPEC_HELP}",
        )
    if not (path / "config.json").is_file():
        raise MoetrtError(
            f"{spec!r} has no config.json",
            "pass a Hugging Face model directory (config.json + *.safetensors)",
        )
    try:
        raw_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise MoetrtError(
            f"{path / 'config.json'} is not valid JSON ({err})", "fix or re-download it"
        ) from None
    quant = checkpoint_quantization(raw_config)  # refuses a quantization it cannot read, by name
    if not any(path.glob("*.safetensors")):
        raise MoetrtError(
            f"{spec!r} has no *.safetensors weights",
            "save the model with save_pretrained(..., safe_serialization=True)",
        )

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many types for unknown or broken configs
        raise MoetrtError(
            f"transformers cannot read {path / 'config.json'}: {_first_line(err)}",
            "check model_type and the transformers version",
        ) from None
    config._experts_implementation = "batched_mm"  # export-friendly experts (no data-dependent loop)
    config._attn_implementation = "eager"
    if quant is not None:
        return _load_stored_quantized(
            path, spec, config, quant, dtype, form, offloaded=offload_dir is not None
        )
    offload: dict[str, Any] = {}
    if offload_dir is not None:
        offload = {"device_map": {"": "disk"}, "offload_folder": str(offload_dir)}
    try:
        with _no_progress_bars():
            model, loading = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype=dtype,
                local_files_only=True,
                experts_implementation="batched_mm",
                output_loading_info=True,
                **offload,
            )
    except ImportError as err:
        raise MoetrtError(
            f"cannot load the model in {spec!r} from disk: {_first_line(err)}", "pip install accelerate"
        ) from None
    except Exception as err:
        raise MoetrtError(
            f"cannot load the model in {spec!r}: {_first_line(err)}",
            "check that the weights match config.json and are a causal LM",
        ) from None
    _check_checkpoint_keys(spec, loading)
    offloaded = None
    if offload_dir is not None:
        from moetrt.export.offloaded import offload_to_meta

        offloaded = offload_to_meta(model)
    else:
        model = model.to(dtype)
    vocab_size = int(config.get_text_config().vocab_size)
    loaded = causal_lm(
        model.eval(), vocab_size, str(path.resolve()), dtype, f"{config.model_type} from {path}", form=form
    )
    loaded.offloaded = offloaded
    return loaded


def _load_stored_quantized(
    path: Path,
    spec: str,
    config: Any,
    quant: CheckpointQuantization,
    dtype: torch.dtype,
    form: DecoderForm,
    offloaded: bool,
) -> LoadedModel:
    """A checkpoint whose experts are stored quantized; `stored` names it, so that a build puts the stored codes
    of its experts in the fused nodes (`passes.stored_experts`) and never writes them in float.

    offloaded: the model on the meta device, every value read from the checkpoint when a module runs
    (accelerate's offload hooks over `StoredWeights`) or when the export writes it — memory holds about one
    layer. Otherwise (checkpoints under the streaming bound) a real model with the experts dequantized in
    memory, so the export's self-check and `verify` run the PyTorch module itself."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built in float; the stored experts stay aside
    try:
        with init_empty_weights(include_buffers=False), _no_progress_bars():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as err:
        raise MoetrtError(
            f"cannot build the model of {spec!r}: {_first_line(err)}",
            "check config.json against transformers",
        ) from None
    stored = StoredCheckpoint(path, quant)
    params = {
        name: (tuple(p.shape), dtype if p.is_floating_point() else p.dtype)
        for name, p in model.named_parameters()
    }
    weights = StoredWeights(stored, params)
    if offloaded:
        from accelerate.hooks import attach_align_device_hook

        from moetrt.export.offloaded import offload_to_meta

        attach_align_device_hook(
            model, execution_device=torch.device("cpu"), offload=True, weights_map=weights
        )
    else:
        model.load_state_dict({name: weights[name] for name in params}, strict=False, assign=True)
        model.tie_weights()
    vocab_size = int(config.get_text_config().vocab_size)
    description = f"{config.model_type} from {path} ({quant.method} experts)"
    loaded = causal_lm(model.eval(), vocab_size, str(path.resolve()), dtype, description, form=form)
    if offloaded:
        loaded.offloaded = offload_to_meta(model)
    loaded.stored = stored
    return loaded


def _check_checkpoint_keys(spec: str, loading: dict[str, Any]) -> None:
    """transformers fills weights missing from the checkpoint with random values and drops unexpected ones,
    silently: either means the checkpoint is not the model config.json describes."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in loading.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    if problems:
        raise MoetrtError(
            f"the checkpoint in {spec!r} does not match its config.json: {'; '.join(problems)}",
            "use the complete checkpoint (every *.safetensors shard and its index) saved with this config",
        )


def _load_module(spec: str, dtype: torch.dtype) -> LoadedModel:
    """`module:path/to/file.py:factory`: factory() -> (module, example_inputs) or a dict with more fields.

    The factory may return `(module, example_inputs)` where example_inputs is a tensor or a tuple of
    tensors, or a dict with keys `module`, `example_inputs` and optionally `input_names`, `output_names`,
    `dynamic_shapes`, `make_inputs`, `long_seq`. Without `dynamic_shapes`, dims 0 and 1 of every input are
    dynamic (batch and sequence). Without `make_inputs`, random inputs are drawn like the examples: integer
    inputs uniformly below their example maximum + 1, floating inputs from N(0, 1).
    """
    body = spec[len("module:") :]
    file_part, sep, factory_name = body.rpartition(":")
    if not sep or not file_part or not factory_name:
        raise MoetrtError(f"cannot parse {spec!r}", "write module:path/to/file.py:factory")
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise MoetrtError(f"module file {file_part!r} does not exist", "write module:path/to/file.py:factory")

    module_name = f"_moetrt_user_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise MoetrtError(f"cannot import {file_part!r}", "pass a .py file")
    user_module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = user_module
    try:
        loader_spec.loader.exec_module(user_module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise MoetrtError(
            f"importing {file_part} failed: {type(err).__name__}: {_first_line(err)}", "fix the module file"
        ) from None
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        raise MoetrtError(
            f"{file_part} has no function {factory_name!r}",
            "name a function that returns (module, example_inputs)",
        )
    try:
        result = factory()
    except Exception as err:
        raise MoetrtError(
            f"{file_part}:{factory_name}() raised {type(err).__name__}: {_first_line(err)}",
            "fix the factory so it returns (module, example_inputs)",
        ) from None
    # The absolute path keeps the spec recorded in the ONNX metadata valid from any working directory.
    return _loaded_from_factory(result, f"module:{path.resolve()}:{factory_name}", dtype)


def _loaded_from_factory(result: Any, spec: str, dtype: torch.dtype) -> LoadedModel:
    fields: dict[str, Any]
    if isinstance(result, dict):
        fields = dict(result)
    elif isinstance(result, tuple | list) and len(result) == 2:
        fields = {"module": result[0], "example_inputs": result[1]}
    else:
        raise MoetrtError(
            f"{spec} returned {type(result).__name__}",
            "return (module, example_inputs) or a dict with keys module and example_inputs",
        )
    module = fields.get("module")
    if not isinstance(module, nn.Module):
        raise MoetrtError(f"{spec} did not return an nn.Module", "return (module, example_inputs)")
    examples = fields.get("example_inputs")
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if not isinstance(examples, tuple | list) or not all(isinstance(t, torch.Tensor) for t in examples):
        raise MoetrtError(
            f"{spec} returned example inputs that are not tensors", "return a tensor or a tuple of tensors"
        )
    examples = tuple(t.to(dtype) if t.is_floating_point() else t for t in examples)
    module = module.to(dtype).eval()

    input_names = list(fields.get("input_names") or _forward_arg_names(module, len(examples)))
    if len(input_names) != len(examples):
        raise MoetrtError(
            f"{spec}: {len(input_names)} input names for {len(examples)} example inputs",
            "give one name per example input",
        )
    with torch.inference_mode():
        try:
            outputs = module(*examples)
        except Exception as err:
            raise MoetrtError(
                f"{spec}: the module fails on its own example inputs: {type(err).__name__}: {_first_line(err)}",
                "return example inputs the module accepts",
            ) from None
    if not (
        isinstance(outputs, torch.Tensor)
        or (
            isinstance(outputs, tuple | list)
            and outputs
            and all(isinstance(o, torch.Tensor) for o in outputs)
        )
    ):
        raise MoetrtError(
            f"{spec}: the module's forward returns {type(outputs).__name__}, not a tensor or a tuple of tensors",
            "make forward return the output tensor(s)",
        )
    num_outputs = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
    output_names = list(
        fields.get("output_names")
        or (["output"] if num_outputs == 1 else [f"output_{i}" for i in range(num_outputs)])
    )
    dynamic_shapes = fields.get("dynamic_shapes") or _default_dynamic_shapes(input_names, examples)
    make_inputs = fields.get("make_inputs") or _inputs_like(examples, dtype)
    return LoadedModel(
        module=module,
        example_inputs=examples,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        make_inputs=make_inputs,
        num_moe_blocks=count_moe_blocks(module),
        spec=spec,
        dtype=dtype,
        long_seq=int(fields.get("long_seq", 72)),
        description=f"{type(module).__name__} from {spec}",
    )


def _forward_arg_names(module: nn.Module, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def _default_dynamic_shapes(
    names: list[str], examples: tuple[torch.Tensor, ...]
) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=131072)
    shapes: dict[str, dict[int, Any]] = {}
    for name, tensor in zip(names, examples):
        dims: dict[int, Any] = {}
        if tensor.dim() >= 1:
            dims[0] = batch
        if tensor.dim() >= 2:
            dims[1] = seq
        shapes[name] = dims
    return shapes


def _inputs_like(examples: tuple[torch.Tensor, ...], dtype: torch.dtype) -> Any:
    """Random inputs shaped like the examples, with dims 0 and 1 replaced by (batch, seq)."""

    def make_inputs(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for example in examples:
            shape = list(example.shape)
            if shape:
                shape[0] = batch
            if len(shape) >= 2:
                shape[1] = seq
            if example.is_floating_point():
                out.append(torch.randn(shape, generator=gen).to(dtype))
            else:
                high = int(example.max()) + 1 if example.numel() else 2
                out.append(torch.randint(0, max(high, 2), shape, generator=gen, dtype=example.dtype))
        return tuple(out)

    return make_inputs


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a weight-loading progress bar and logs a load report; `moetrt` reports its own
    progress and turns a key mismatch into its own one-line error."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet_loggers("transformers"):
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
