"""Pass `cleanup`: onnxscript rewrite rules that remove no-op view pairs the exporter leaves behind.

Cases rewritten:
    Squeeze(Unsqueeze(x, axes), axes) -> x      (transformers' batched_mm bias path under torch.export)
    Unsqueeze(Squeeze(x, axes), axes) -> x      when x's size along `axes` is statically 1
Fewer no-op views make the graph smaller and the MoE pattern (and any later pass) easier to read.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult

from moetrt.graph_passes.base import CountedPass, CountedPassResult


def _same_const_axes(first: ir.Value, second: ir.Value) -> bool:
    a, b = ir.convenience.get_const_tensor(first), ir.convenience.get_const_tensor(second)
    return a is not None and b is not None and np.array_equal(a.numpy(), b.numpy())


class SqueezeOfUnsqueeze(RewriteRuleClassBase):
    """Squeeze(Unsqueeze(x, axes), axes) -> Identity(x)."""

    def pattern(self, op, x, axes_in, axes_out):  # type: ignore[no-untyped-def]
        return op.Squeeze(op.Unsqueeze(x, axes_in), axes_out)

    def check(self, context, x, axes_in, axes_out) -> MatchResult:  # type: ignore[no-untyped-def]
        result = MatchResult()
        if not _same_const_axes(axes_in, axes_out):
            return result.fail("axes differ or are not constant")
        return result

    def rewrite(self, op, x, axes_in, axes_out):  # type: ignore[no-untyped-def]
        return op.Identity(x)


class UnsqueezeOfSqueeze(RewriteRuleClassBase):
    """Unsqueeze(Squeeze(x, axes), axes) -> Identity(x) when x has size 1 on those axes."""

    def pattern(self, op, x, axes_in, axes_out):  # type: ignore[no-untyped-def]
        return op.Unsqueeze(op.Squeeze(x, axes_in), axes_out)

    def check(self, context, x, axes_in, axes_out) -> MatchResult:  # type: ignore[no-untyped-def]
        result = MatchResult()
        if not _same_const_axes(axes_in, axes_out) or x.shape is None:
            return result.fail("axes differ, are not constant, or x has no shape")
        axes = ir.convenience.get_const_tensor(axes_in).numpy().reshape(-1)  # type: ignore[union-attr]
        if any(x.shape[int(a)] != 1 for a in axes):
            return result.fail("a squeezed axis is not statically 1")
        return result

    def rewrite(self, op, x, axes_in, axes_out):  # type: ignore[no-untyped-def]
        return op.Identity(x)


CLEANUP_RULES = RewriteRuleSet([SqueezeOfUnsqueeze.rule(), UnsqueezeOfSqueeze.rule()])


class CleanupPass(CountedPass):
    name = "cleanup"

    def call(self, model: ir.Model) -> CountedPassResult:
        count = CLEANUP_RULES.apply_to_model(model)
        if count:
            common_passes.IdentityEliminationPass()(model)
            common_passes.RemoveUnusedNodesPass()(model)
        return CountedPassResult(model, count > 0, count)
