"""Kernel bundles for planning tests: every variant and config of a real bundle, each cubin a one-byte
placeholder (planning and argument packing never read a cubin; GPU tests use compiled bundles)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetrt.kernels import configs as tuning
from moetrt.kernels import plan
from moetrt.kernels.aot import CompiledKernel, KernelBundle
from moetrt.op.spec import MoEAttributes

SCRATCH_PARAMS = 2  # what Triton 3.6 appends (global and profile scratch)
#: an op with every optional input and output (grouped sigmoid routing, biases, gated shared expert, logits)
EVERY_OPTION = MoEAttributes(
    16,
    4,
    64,
    48,
    scoring="sigmoid",
    has_score_correction_bias=True,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    has_router_bias=True,
    has_expert_bias=True,
    shared_intermediate_size=32,
    has_shared_gate=True,
    output_router_logits=True,
)


def planning_bundle(
    attrs: MoEAttributes,
    dtype: str,
    sm: int = 90,
    configs: Mapping[int | None, dict[str, Any]] | None = None,
    buckets: tuple[int | None, ...] = plan.BUCKETS,
) -> KernelBundle:
    bundle = KernelBundle(attrs.to_onnx_attributes(), dtype, sm, "planning-only")
    for bound in buckets:
        cfg = (configs or {}).get(bound) or tuning.select_config(attrs, dtype, sm, bound)
        variants = plan.bucket_variants(attrs, dtype, bound, cfg)
        for v in variants.values():
            types = plan.param_types(v.kernel, dtype, plan.variant_weight_format(dict(v.constexprs)))
            bundle.kernels[v.key] = CompiledKernel(
                v.key, v.kernel, f"{v.kernel}_entry", b"\0", v.num_warps, 0, tuple(types), SCRATCH_PARAMS
            )
        bundle.buckets[plan.bucket_name(bound)] = {
            "bound": bound,
            "config": cfg,
            "variants": {stage: v.key for stage, v in variants.items()},
            "constexprs": {v.key: dict(v.constexprs) for v in variants.values()},
        }
    return bundle
