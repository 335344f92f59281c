"""GPU facts by SM number: compute capability (major, minor) -> major * 10 + minor (9.0 -> 90, 12.0 -> 120)."""

from __future__ import annotations


def sm_from_capability(major: int, minor: int) -> int:
    return major * 10 + minor


def current_sm() -> int:
    """The SM of the current CUDA device, as torch sees it."""
    import torch

    return sm_from_capability(*torch.cuda.get_device_capability())


def has_fp8_conversion(sm: int) -> bool:
    """Whether fp8 (e4m3) expert weights are converted by the SM's instructions rather than decoded from their
    bits: `cvt.rn.f16x2.e4m3x2` exists from SM 8.9, but Triton 3.6 converts on to bf16 with `cvt.bf16.f16`,
    which needs SM 9.0; so Hopper and Blackwell (SM 9.0 and later)."""
    return sm >= 90


#: The first SM with fp8 (e4m3) tensor cores (Ada); fp8 activations run there and later.
FP8_TENSOR_CORE_MIN_SM = 89


def has_fp8_tensor_cores(sm: int) -> bool:
    """Whether the SM multiplies e4m3 operands on its tensor cores (fp8 activations: SM 8.9, 9.0, 10.0, 12.0)."""
    return sm >= FP8_TENSOR_CORE_MIN_SM


#: SMs whose tensor cores multiply a whole warp group's tile (Hopper's wgmma, data-center Blackwell's
#: tcgen05): large quantized prefill tiles compile there without spilling (sm_90: 8-24 bytes, sm_100: none).
#: SM 8.x and 12.0 run per-warp mma.sync, where the same 128 x 128 gate_up tiles spilled 300-440 bytes a
#: thread (sm_80, 89, 120; bench/sass_stats.py).
WARP_GROUP_MMA_SMS = frozenset({90, 100})


def has_warp_group_mma(sm: int) -> bool:
    return sm in WARP_GROUP_MMA_SMS
