"""A cached decoder's inputs as a caller passes them: the state tensors read from the artifact, and the check that
every state tensor matches the batch and the past the other inputs imply (a wrong one is named before a
backend sees it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from moetrt.core.artifacts import ATTENTION_MASK, INPUT_IDS, META_STATE, StateTensor
from moetrt.core.errors import MoetrtError


def state_from_metadata(metadata: Mapping[str, str]) -> list[StateTensor] | None:
    """The state tensors an exported decoder lists in its ONNX metadata; None for any other model."""
    text = metadata.get(META_STATE)
    if text is None:
        return None
    return [StateTensor.from_json(entry) for entry in json.loads(text)]


def state_from_manifest(manifest: Mapping[str, Any]) -> list[StateTensor] | None:
    decoder = manifest.get("decoder")
    if not decoder:
        return None
    return [StateTensor.from_json(entry) for entry in decoder["state"]]


def check_decoder_feeds(state: Sequence[StateTensor], shapes: Mapping[str, Sequence[int]]) -> None:
    """Batch from input_ids, past from attention_mask minus the new tokens; each state tensor must match."""
    ids, mask = shapes.get(INPUT_IDS), shapes.get(ATTENTION_MASK)
    if ids is None or mask is None or len(ids) != 2 or len(mask) != 2:
        return  # the plain input checks name these
    batch, seq = int(ids[0]), int(ids[1])
    past = int(mask[1]) - seq
    if int(mask[0]) != batch or past < 0:
        raise MoetrtError(
            f"{ATTENTION_MASK} has shape {list(mask)} for {INPUT_IDS} {list(ids)}",
            f"pass {ATTENTION_MASK} as [batch, past + seq] = [{batch}, past + {seq}]",
        )
    for tensor in state:
        got = shapes.get(tensor.past)
        if got is None:
            raise MoetrtError(f"state input {tensor.past} is missing", "pass every past_key_values.* tensor")
        want = [batch if d == "batch" else past if d == "past" else int(d) for d in tensor.shape]
        if list(got) != want:
            raise MoetrtError(
                f"state input {tensor.past} has shape {list(got)}, expected {want} (batch {batch}, past {past} "
                f"from {ATTENTION_MASK})",
                "pass the present.* tensors of the previous step of the same batch (zeros with past 0 to start)",
            )
