"""Factories for `module:tests/data/custom_moe.py:<factory>` in the export / verify tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, gen: torch.Generator) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) * hidden**-0.5
        )
        self.down_proj = nn.Parameter(
            torch.randn(num_experts, hidden, intermediate, generator=gen) * intermediate**-0.5
        )


class TinyMoE(nn.Module):
    """Softmax top-k MoE written with gathers (export-friendly), [batch, seq, hidden] -> same."""

    def __init__(
        self, hidden: int = 32, num_experts: int = 8, top_k: int = 2, intermediate: int = 16
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(num_experts, hidden, generator=gen) * hidden**-0.5)
        self.experts = StackedExperts(num_experts, hidden, intermediate, gen)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        gate_up = torch.einsum("th,tkih->tki", x, self.experts.gate_up_proj[ids])
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, self.experts.down_proj[ids])
        return (y * weights.unsqueeze(-1)).sum(1).reshape(batch, seq, hidden)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(hidden_states)))


class FailsToExport(nn.Module):
    """Runs eagerly but raises while being exported."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise NotImplementedError("custom kernel without an export path")
        return hidden_states * 2.0


def _example(hidden: int = 32) -> torch.Tensor:
    return torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(0))


def make_moe() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return TinyMoE(), (_example(),)


def make_dense() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return DenseMLP(), (_example(),)


def make_fails_to_export() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return FailsToExport(), (_example(),)


def make_raises() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    raise RuntimeError("weights file not found")


def make_not_a_module() -> tuple[object, tuple[torch.Tensor, ...]]:
    return "not a module", (_example(),)


def make_near_tie_moe() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A linear layer, then a TinyMoE with 64 experts, top-8: over a few thousand tokens some meet two experts
    at the top-k boundary within what the linear layer's half-precision rounding moves their scores."""
    torch.manual_seed(5)
    hidden = 64
    model = nn.Sequential(nn.Linear(hidden, hidden), TinyMoE(hidden=hidden, num_experts=64, top_k=8))
    return model, (_example(hidden),)


class Cancellation(nn.Module):
    """(a + 100) - a with |a| in the thousands: half precision loses the 100's digits in any implementation."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        big = self.lin(hidden_states) * 4096.0
        return (big + 100.0) - big


def make_cancellation() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(3)
    return Cancellation(), (_example(),)
