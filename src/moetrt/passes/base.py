"""Pass infrastructure: onnx-ir in-place passes that also say how much they changed, and an ordered pipeline.

Each pass is an `onnx_ir.passes.InPlacePass` whose `call` returns a `CountedPassResult` (the onnx-ir
`PassResult` plus `count` and, for the fusion, the candidates it left alone). `run_pipeline` runs an explicit
ordered list of them and records (name, count, seconds) for each, which `moetrt fuse` prints.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes


@dataclass(frozen=True)
class UnfusedCandidate:
    """Something that looked like an MoE block but was left as standard ops, and why."""

    where: str  # node name (op type) that anchors the candidate
    rule: str
    check: str  # the check that failed, in words


@dataclass
class CountedPassResult(onnx_ir.passes.PassResult):
    count: int = 0
    unfused: list[UnfusedCandidate] = field(default_factory=list)


@dataclass(frozen=True)
class PassStat:
    name: str
    count: int
    seconds: float


class CountedPass(onnx_ir.passes.InPlacePass):
    """An in-place pass with a short `name` for reports; subclasses return CountedPassResult."""

    name: str = "pass"

    def call(self, model: ir.Model) -> CountedPassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def run_pipeline(
    model: ir.Model, passes: Sequence[CountedPass]
) -> tuple[list[PassStat], list[UnfusedCandidate]]:
    """Run `passes` in order on `model` (in place); per-pass stats and every unfused candidate."""
    stats: list[PassStat] = []
    unfused: list[UnfusedCandidate] = []
    for pass_ in passes:
        start = time.perf_counter()
        result = pass_(model)
        elapsed = time.perf_counter() - start
        count = result.count if isinstance(result, CountedPassResult) else int(result.modified)
        if isinstance(result, CountedPassResult):
            unfused.extend(result.unfused)
        stats.append(PassStat(pass_.name, count, elapsed))
    return stats, unfused


def node_order(graph: ir.Graph) -> dict[ir.Node, int]:
    return {node: i for i, node in enumerate(graph)}


def opset_imports(model: ir.Model) -> dict[str, int]:
    return dict(model.opset_imports)


__all__ = [
    "CountedPass",
    "CountedPassResult",
    "PassStat",
    "UnfusedCandidate",
    "node_order",
    "opset_imports",
    "run_pipeline",
]
