"""Optimization profiles: which shapes an engine accepts, made from the ONNX inputs' dims and the build's ranges.

A profile entry is `{"input", "axes": {axis: role}, "min", "opt", "max", "profile": index, "name"}`; the entries
with one index form one TensorRT optimization profile.

- Any model: one profile. The last dynamic dim of each input is `tokens`, an earlier one `batch` (the
  exporter's [batch, seq] ids or [batch, seq, hidden] states, the fused op's [T, H]).
- A cached decoder (inputs with a `past` dim, `export.cached`): two profiles.
  `prefill` takes seq in the --tokens range after up to `max_context - tokens.max` earlier tokens (chunked
  prefill); `decode` takes one token after up to `max_context - 1`. The mask's `total` dim is past + seq.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moetrt.core.errors import MoetrtError
from moetrt.trt.targets import DimRange

#: Names of the cached decoder's dynamic dims in the exported graph (`export.cached.state_dynamic_shapes`).
BATCH_DIM, SEQ_DIM, PAST_DIM, TOTAL_DIM = "batch", "seq", "past", "total"
PREFILL, DECODE = "prefill", "decode"
#: Context a cached decoder's engine accepts unless --max-context says otherwise.
DEFAULT_MAX_CONTEXT = 4096
_FLAG = {"tokens": "--tokens", "batch": "--batch", "past": "--max-context", "context": "--max-context"}


def is_decoder(inputs: Sequence[tuple[str, Sequence[int | str]]]) -> bool:
    return any(PAST_DIM in dims for _, dims in inputs)


def make_profiles(
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    tokens: DimRange,
    batch: DimRange,
    max_context: int = DEFAULT_MAX_CONTEXT,
) -> list[dict[str, Any]]:
    """The profile entries of a model's inputs (see the module docstring)."""
    if is_decoder(inputs):
        return _decoder_profiles(inputs, tokens, batch, max_context)
    profiles = []
    for name, dims in inputs:
        dynamic = [axis for axis, d in enumerate(dims) if isinstance(d, str)]
        if not dynamic:
            continue
        if len(dynamic) > 2:
            raise MoetrtError(
                f"input {name} has {len(dynamic)} dynamic dims {list(dims)}; moetrt profiles batch and tokens only",
                "export with at most a dynamic batch and a dynamic sequence dimension",
            )
        roles = {dynamic[-1]: ("tokens", tokens)}
        if len(dynamic) == 2:
            roles[dynamic[0]] = ("batch", batch)
        shape = {
            key: [getattr(roles[a][1], key) if a in roles else int(d) for a, d in enumerate(dims)]
            for key in ("min", "opt", "max")
        }
        profiles.append({"input": name, "axes": {str(a): role for a, (role, _) in roles.items()}, **shape})
    return profiles


def _decoder_profiles(
    inputs: Sequence[tuple[str, Sequence[int | str]]], tokens: DimRange, batch: DimRange, max_context: int
) -> list[dict[str, Any]]:
    if max_context < tokens.max:
        raise MoetrtError(
            f"--max-context {max_context} is below the longest prefill (--tokens max {tokens.max})",
            f"pass --max-context {tokens.max} or more, or a smaller --tokens",
        )
    ranges = {
        PREFILL: {
            BATCH_DIM: ("batch", (batch.min, batch.opt, batch.max)),
            SEQ_DIM: ("tokens", (tokens.min, tokens.opt, tokens.max)),
            PAST_DIM: ("past", (0, 0, max_context - tokens.max)),
            TOTAL_DIM: ("context", (tokens.min, tokens.opt, max_context)),
        },
        DECODE: {
            BATCH_DIM: ("batch", (batch.min, batch.opt, batch.max)),
            SEQ_DIM: ("tokens", (1, 1, 1)),
            PAST_DIM: ("past", (0, max_context // 2, max_context - 1)),
            TOTAL_DIM: ("context", (1, max_context // 2 + 1, max_context)),
        },
    }
    profiles = []
    for index, (profile_name, roles) in enumerate(ranges.items()):
        for name, dims in inputs:
            unknown = [d for d in dims if isinstance(d, str) and d not in roles]
            if unknown:
                raise MoetrtError(
                    f"input {name} has dynamic dims {unknown} beside the decoder's {list(roles)}",
                    "export the model again with `moetrt export` (cached decoders name their dims)",
                )
            if not any(isinstance(d, str) for d in dims):
                continue
            shape = {
                key: [roles[d][1][i] if isinstance(d, str) else int(d) for d in dims]
                for i, key in enumerate(("min", "opt", "max"))
            }
            axes = {str(a): roles[d][0] for a, d in enumerate(dims) if isinstance(d, str)}
            profiles.append({"input": name, "axes": axes, **shape, "profile": index, "name": profile_name})
    return profiles


def profile_count(profiles: Sequence[dict[str, Any]]) -> int:
    return 1 + max((int(p.get("profile", 0)) for p in profiles), default=0)


def check_in_profile(profiles: Sequence[dict[str, Any]], shapes: dict[str, Sequence[int]]) -> int:
    """The index of the profile for these input shapes: the decode profile for one new token, else the first
    that accepts them. Shapes no profile accepts are refused, naming the dim and the range of the profile
    meant (decode for one new token, prefill otherwise)."""
    one_token = any(
        role == "tokens" and list(shapes.get(p["input"], []))[int(axis) : int(axis) + 1] == [1]
        for p in profiles
        for axis, role in p.get("axes", {}).items()
    )
    indices = list(range(profile_count(profiles)))
    decode = next((int(p.get("profile", 0)) for p in profiles if p.get("name") == DECODE), None)
    if one_token and decode is not None:
        indices.remove(decode)
        indices.insert(0, decode)
    problems: list[MoetrtError] = []
    for index in indices:
        entries = [p for p in profiles if int(p.get("profile", 0)) == index]
        try:
            _check_one(entries, shapes)
        except MoetrtError as err:
            problems.append(err)
            continue
        return index
    if not problems:  # no profile at all: nothing is dynamic
        return 0
    raise problems[0]  # the decode profile's for one token, the prefill profile's otherwise


def _check_one(entries: Sequence[dict[str, Any]], shapes: dict[str, Sequence[int]]) -> None:
    for profile in entries:
        name = profile["input"]
        if name not in shapes:
            continue
        shape = list(shapes[name])
        if len(shape) != len(profile["min"]):
            raise MoetrtError(
                f"input {name} has rank {len(shape)}, the engine expects {len(profile['min'])}",
                f"pass {name} with shape like {profile['opt']}",
            )
        for axis, (lo, hi, got) in enumerate(zip(profile["min"], profile["max"], shape)):
            if not lo <= got <= hi:
                role = profile.get("axes", {}).get(str(axis), f"dim {axis}")
                flag = _FLAG.get(role, "the export")
                which = f"{profile['name']} profile" if "name" in profile else "profile"
                raise MoetrtError(
                    f"input {name} {role} = {got} is outside the engine's {which} {lo}..{hi}",
                    f"use {role} in {lo}..{hi}, or rebuild with a wider {flag} range",
                )


def add_profiles(builder: Any, config: Any, network: Any, profiles: Sequence[dict[str, Any]]) -> None:
    """Give a TensorRT builder config one optimization profile per profile index."""
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for index in range(profile_count(profiles) if profiles else 0):
        profile = builder.create_optimization_profile()
        for entry in profiles:
            if int(entry.get("profile", 0)) == index and entry["input"] in names:
                profile.set_shape(entry["input"], entry["min"], entry["opt"], entry["max"])
        config.add_optimization_profile(profile)
