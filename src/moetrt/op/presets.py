"""The benchmark's MoE shapes (BENCH.md) by name: `moetrt aot --preset`, `moetrt tune --preset`, bench and tests."""

from __future__ import annotations

from moetrt.op.spec import MoEAttributes

# The benchmark's shapes (BENCH.md), by name, for `moetrt aot --preset` / `moetrt tune --preset`.
PRESETS: dict[str, MoEAttributes] = {
    "qwen3_next": MoEAttributes(
        512, 10, 2048, 512, norm_topk_prob=True, shared_intermediate_size=512, has_shared_gate=True
    ),
    "qwen3_30b": MoEAttributes(128, 8, 2048, 768, norm_topk_prob=True),
    "mixtral": MoEAttributes(8, 2, 4096, 14336, norm_topk_prob=True),
    "deepseek_v3": MoEAttributes(
        256,
        8,
        7168,
        2048,
        scoring="sigmoid",
        has_score_correction_bias=True,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        shared_intermediate_size=2048,
    ),
    "gpt_oss_20b": MoEAttributes(
        32,
        4,
        2880,
        2880,
        topk_before_score=True,
        activation="swiglu_clamped",
        has_expert_bias=True,
        has_router_bias=True,
    ),
}


def like(
    preset: str, num_experts: int, top_k: int, hidden: int, intermediate: int, **changes: object
) -> MoEAttributes:
    """A preset's routing and expert variant at other sizes (tests, small benchmarks). A shared expert, when the
    preset has one, takes `intermediate` unless `shared_intermediate_size` is given; `changes` override any
    other field (n_group, output_router_logits, ...)."""
    import dataclasses

    base = PRESETS[preset]
    fields: dict[str, object] = {
        "num_experts": num_experts,
        "top_k": top_k,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
    }
    if base.shared_intermediate_size:
        fields["shared_intermediate_size"] = intermediate
    return dataclasses.replace(base, **{**fields, **changes})  # type: ignore[arg-type]
