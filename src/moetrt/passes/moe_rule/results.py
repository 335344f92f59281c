"""Typed results of the `moe_gather_experts` rule: what each matcher found, and why a candidate was refused.

Matchers raise `NoMatch(check)`; the rule that ran them turns it into a `Refusal(rule, check)`, which the fusion
pass records as an unfused candidate and `moetrt fuse --explain` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from moetrt.op.spec import MoEAttributes
from moetrt.passes import layout as L
from moetrt.passes.numeric_check import GluForm

RULE_CORE = "moe_gather_experts/expert_core"
RULE_ROUTING = "moe_gather_experts/routing"
RULE_BLOCK = "moe_gather_experts/block"
RULE_NUMERIC = "moe_gather_experts/numeric_check"


@dataclass(frozen=True)
class Refusal:
    """A candidate left as standard ops: the rule (or rule stage) that refused it, and the failed check."""

    rule: str
    check: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.check}"


class RuleRefused(Exception):
    """Raised by `match_moe_block` with the refusal; never parsed from text."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


@dataclass(frozen=True)
class Linear:
    """A Gemm | MatMul with a constant weight, as a canonical [out, in] layout, and the value it reads."""

    weight: L.Layout
    input: ir.Value


@dataclass(frozen=True)
class Projection:
    """One gathered expert projection: Gather(table, ids) -> MatMul with the token stream (+ gathered bias)."""

    matmul: ir.Node
    input: ir.Value  # the activations it multiplies (views skipped)
    output: ir.Value  # after views and the bias add
    weight: L.Layout  # canonical [E, out, in]
    out_dim: int
    in_dim: int
    bias_gather: ir.Node | None
    bias: L.Layout | None  # [E, out]


@dataclass(frozen=True)
class ExpertCore:
    """The expert computation selected by one TopK: projections, activation, weighting and the sum over k."""

    top_k: int
    num_experts: int
    first: tuple[Projection, ...]  # gate_up, or gate and up, in graph order
    down: Projection
    glu: GluForm
    stream: ir.Value  # the token activations the first projections read
    weights_value: ir.Value  # the routing weights [T, k] the down outputs are multiplied by
    output: ir.Value  # ReduceSum over k


@dataclass(frozen=True)
class GroupMask:
    """Grouped top-k: experts outside the `topk_group` best of `n_group` groups masked with -inf."""

    n_group: int
    topk_group: int
    group_size: int | None  # from the group reshape, when constant
    in_group_k: int  # how many top scores per group are summed to score the group


@dataclass(frozen=True)
class WeightTransforms:
    """What the routing weights went through after the scores were selected: renorm, then a scaling factor."""

    norm: bool = False
    scale: float = 1.0


@dataclass(frozen=True)
class Routing:
    """The routing variant read back from the weights to the router logits (MoEAttributes' routing fields)."""

    scoring: str  # softmax | sigmoid
    logits: ir.Value  # the router logits the scores are computed from
    topk_before_score: bool = False
    transforms: WeightTransforms = WeightTransforms()
    group: GroupMask | None = None
    correction: ir.Value | None = None  # score-correction bias added before the top-k


@dataclass(frozen=True)
class Router:
    linear: Linear
    bias: L.Layout | None
    logits: ir.Value  # the logits as computed (before views and casts)


@dataclass(frozen=True)
class SharedExpert:
    gate_up: L.Layout  # [2*Is, H]
    down: L.Layout  # [H, Is]
    gate: L.Layout | None  # [1, H]
    size: int


@dataclass
class MoEMatch:
    attrs: MoEAttributes
    hidden: ir.Value  # the block's input (any rank, last dim H)
    output: ir.Value  # the value the fused op replaces (same shape as `hidden`, or [T, H])
    router_logits: ir.Value | None  # the logits value read outside the block, when there is one
    weights: dict[str, L.Layout]  # canonical input name -> layout expression
    nodes: set[ir.Node] = field(default_factory=set)
    topk: ir.Node | None = None
    # Reshapes back to the hidden shape whose target comes from the model's input dims, and the integer
    # nodes that compute it: the numerical check reshapes to Shape(hidden) instead.
    shape_fixes: list[ir.Node] = field(default_factory=list)
    shape_only: set[ir.Node] = field(default_factory=set)
    # Set by the rewrite: the variant's function body and the (old value, new value) pairs it replaces.
    function: onnx.FunctionProto | None = None
    pairs: list[tuple[ir.Value, ir.Value]] = field(default_factory=list)
