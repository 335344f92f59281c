"""Rule `moe_gather_experts`: recognise an MoE block in the gather form (see block.py) as one fused op."""

from moetrt.passes.moe_rule.block import match_moe_block
from moetrt.passes.moe_rule.core import expert_gathers, is_expert_gather
from moetrt.passes.moe_rule.results import (
    RULE_BLOCK,
    RULE_CORE,
    RULE_NUMERIC,
    RULE_ROUTING,
    MoEMatch,
    Refusal,
    RuleRefused,
)

__all__ = [
    "RULE_BLOCK",
    "RULE_CORE",
    "RULE_NUMERIC",
    "RULE_ROUTING",
    "MoEMatch",
    "Refusal",
    "RuleRefused",
    "expert_gathers",
    "is_expert_gather",
    "match_moe_block",
]
