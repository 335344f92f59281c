"""The SM number of a GPU: compute capability (major, minor) -> major * 10 + minor (9.0 -> 90, 12.0 -> 120)."""

from __future__ import annotations


def sm_from_capability(major: int, minor: int) -> int:
    return major * 10 + minor


def current_sm() -> int:
    """The SM of the current CUDA device, as torch sees it."""
    import torch

    return sm_from_capability(*torch.cuda.get_device_capability())
