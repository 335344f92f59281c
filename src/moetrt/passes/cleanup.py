"""Pass `cleanup`: onnxscript rewrite rules that remove no-op view pairs the exporter leaves behind.

Cases rewritten:
    Squeeze(Unsqueeze(x, axes), axes) -> x      (transformers' batched_mm bias path under torch.export)
    Unsqueeze(Squeeze(x, axes), axes) -> x      when x's size along `axes` is statically 1
    Einsum("th,tkih->tki", x, W) -> Squeeze(MatMul(W, Unsqueeze(x)))   (and every "Q r, P m r -> P m")
    Gather(x, 0 | -1, axis=a) -> Squeeze(x, [a]) when x's size along `a` is statically 1 (`y[:, 0]` after a
                                                 batched matmul, as user code writes it)
Fewer no-op views make the graph smaller and the MoE pattern (and any later pass) easier to read.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult

from moetrt.passes.base import CountedPass, CountedPassResult


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


class SelectOfSingletonAxis(RewriteRuleClassBase):
    """Gather(x, scalar 0 | -1, axis=a) -> Squeeze(x, [a]) when x has size 1 along a: a view, not a gather."""

    def pattern(self, op, x, index, axis):  # type: ignore[no-untyped-def]
        return op.Gather(x, index, axis=axis)

    def check(self, context, x, index, axis) -> MatchResult:  # type: ignore[no-untyped-def]
        result = MatchResult()
        tensor = ir.convenience.get_const_tensor(index)
        if tensor is None or tensor.shape.rank() != 0 or int(tensor.numpy()) not in (0, -1):
            return result.fail("index is not the constant scalar 0 or -1")
        if x.shape is None:
            return result.fail("x has no shape")
        a = axis.as_int()
        a = a + len(x.shape) if a < 0 else a
        if not 0 <= a < len(x.shape) or x.shape[a] != 1:
            return result.fail("the gathered axis is not statically 1")
        return result

    def rewrite(self, op, x, index, axis):  # type: ignore[no-untyped-def]
        a = axis.as_int()
        a = a + len(x.shape) if a < 0 else a
        return op.Squeeze(x, op.Constant(value=ir.tensor(np.array([a], dtype=np.int64))))


def _batched_matvec(equation: str) -> tuple[list[int], int] | None:
    """For `x, W -> y` equations of the form "Q r, P m r -> P m" (Q a subsequence of the batch letters P):
    the axes of y where x needs an Unsqueeze to broadcast against W, and len(P). None for anything else."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if not arrow or len(operands) != 2 or "." in equation:
        return None
    x, w = operands
    if len(w) < 3 or len(set(w)) != len(w) or out != w[:-1] or not x or x[-1] != w[-1]:
        return None
    batch = w[:-2]
    x_batch = x[:-1]
    if len(set(x_batch)) != len(x_batch) or not set(x_batch) <= set(batch):
        return None
    if [c for c in batch if c in x_batch] != list(x_batch):
        return None  # x's batch letters out of order: a transpose, not a broadcast
    return [i for i, c in enumerate(batch) if c not in x_batch], len(batch)


class EinsumBatchedMatVec(RewriteRuleClassBase):
    """Einsum("th,tkih->tki", x, W) -> Squeeze(MatMul(W, Unsqueeze(x, [1, 3])), [3]): experts written as
    einsum over gathered [T, k, out, in] tables become the batched MatMuls the MoE rule reads."""

    def pattern(self, op, x, w, equation):  # type: ignore[no-untyped-def]
        return op.Einsum(x, w, equation=equation)

    def check(self, context, x, w, equation) -> MatchResult:  # type: ignore[no-untyped-def]
        result = MatchResult()
        if _batched_matvec(equation.as_string()) is None:
            return result.fail("not a batched matrix-vector product 'Q r, P m r -> P m'")
        return result

    def rewrite(self, op, x, w, equation):  # type: ignore[no-untyped-def]
        missing, num_batch = _batched_matvec(equation.as_string())  # type: ignore[misc]
        axes = [*missing, num_batch + 1]  # broadcast batch axes, then the trailing vector axis
        column = op.Unsqueeze(x, op.Constant(value=ir.tensor(np.array(axes, dtype=np.int64))))
        product = op.MatMul(w, column)
        return op.Squeeze(product, op.Constant(value=ir.tensor(np.array([num_batch + 1], dtype=np.int64))))


CLEANUP_RULES = RewriteRuleSet(
    [
        SqueezeOfUnsqueeze.rule(),
        UnsqueezeOfSqueeze.rule(),
        SelectOfSingletonAxis.rule(),
        EinsumBatchedMatVec.rule(),
    ]
)


class CleanupPass(CountedPass):
    name = "cleanup"

    def call(self, model: ir.Model) -> CountedPassResult:
        count = CLEANUP_RULES.apply_to_model(model)
        if count:
            common_passes.IdentityEliminationPass()(model)
            common_passes.RemoveUnusedNodesPass()(model)
        return CountedPassResult(model, count > 0, count)
