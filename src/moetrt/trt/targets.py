"""Deployment targets: a product name (or ``sm_XX``) → the SM the engine and its cubins are built for.

The table is the single place that knows which GPU a name means, which precisions its tensor cores run, and
which TensorRT-RTX compute capability (if any) it maps to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moetrt.core.errors import MoetrtError

PRECISIONS = ("fp16", "bf16", "fp32")
#: TensorRT dimensions are int32.
MAX_DIM = 2**31 - 1
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")

# TensorRT 10 dropped everything before Turing; the Triton kernels need Ampere-style MMA for bf16.
MIN_SM = 75
BF16_MIN_SM = 80

# Compute capabilities TensorRT-RTX 1.7 can build for (its `ComputeCapability` enum, without NONE/CURRENT).
RTX_SMS = (75, 80, 86, 89, 120, 121)

NAMED_TARGETS: dict[str, tuple[int, str]] = {
    "orin": (87, "Jetson AGX Orin (Ampere, SM 8.7)"),
    "thor": (110, "Jetson Thor (Blackwell, SM 11.0; SM 10.1 before CUDA 13)"),
    "rtx40": (89, "GeForce RTX 40 / RTX Ada (Ada Lovelace, SM 8.9)"),
    "rtx50": (120, "GeForce RTX 50 / RTX PRO Blackwell (SM 12.0)"),
    "a100": (80, "A100 (Ampere, SM 8.0)"),
    "h100": (90, "H100 (Hopper, SM 9.0)"),
    "h200": (90, "H200 (Hopper, SM 9.0)"),
    "b200": (100, "B200 (Blackwell, SM 10.0)"),
}
DEFAULT_TARGET = {"tensorrt": "h100", "tensorrt-rtx": "rtx40"}

_SM_PATTERN = re.compile(r"^sm_?(\d{2,3})[a-z]?$")


@dataclass(frozen=True)
class Target:
    """One resolved target: its name as given, the SM number (e.g. 90 for 9.0) and a description."""

    name: str
    sm: int
    description: str

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p != "bf16" or self.sm >= BF16_MIN_SM)

    @property
    def compute_capability(self) -> tuple[int, int]:
        return divmod(self.sm, 10)

    @property
    def rtx_buildable(self) -> bool:
        return self.sm in RTX_SMS

    def check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise MoetrtError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            raise MoetrtError(
                f"target {self.name} (SM {self.sm}) has no {precision} tensor cores",
                f"use --precision {' or '.join(self.precisions[:2])}, or a target with SM >= {BF16_MIN_SM}",
            )

    def check_backend(self, backend: str) -> None:
        if backend not in ENGINE_BACKENDS:
            raise MoetrtError(
                f"unknown engine backend {backend!r}", f"use one of {', '.join(ENGINE_BACKENDS)}"
            )
        if backend == "tensorrt-rtx" and not self.rtx_buildable:
            raise MoetrtError(
                f"TensorRT-RTX cannot build for target {self.name} (SM {self.sm})",
                f"use --engine-backend tensorrt, or a TensorRT-RTX target: SM {', '.join(map(str, RTX_SMS))}",
            )


def resolve_target(name: str | None, backend: str = "tensorrt") -> Target:
    """`h100`, `rtx50`, `sm_90`, `sm90`, `90` → Target; None → the backend's default target."""
    if name is None:
        name = DEFAULT_TARGET.get(backend, "h100")
    key = name.strip().lower()
    if key in NAMED_TARGETS:
        sm, description = NAMED_TARGETS[key]
        return Target(key, sm, description)
    match = _SM_PATTERN.match(key) or re.match(r"^(\d{2,3})$", key)
    if match:
        sm = int(match.group(1))
        if sm < MIN_SM:
            raise MoetrtError(
                f"target {name!r} (SM {sm}) is older than TensorRT 10 supports",
                f"use a target with SM >= {MIN_SM}",
            )
        return Target(f"sm_{sm}", sm, f"SM {sm // 10}.{sm % 10}")
    raise MoetrtError(
        f"unknown target {name!r}",
        f"use one of {', '.join(NAMED_TARGETS)} or sm_XX (e.g. sm_90)",
    )


@dataclass(frozen=True)
class DimRange:
    """MIN:OPT:MAX of one dynamic dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max <= MAX_DIM:
            raise MoetrtError(
                f"dimension range {self} is not MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX <= {MAX_DIM}",
                "e.g. 1:128:4096",
            )

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"
