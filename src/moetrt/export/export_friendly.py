"""Export-friendly stand-ins for model code that `torch.export` cannot capture with a dynamic sequence.

Hugging Face's torch fallback for the chunked gated delta rule (Qwen3-Next linear attention) loops over
chunks in Python and solves each chunk's triangular system with a 63-step loop: the chunk count becomes a
constant of the graph and the sequence length is specialised. `chunk_gated_delta_rule_scan` computes the
same function with the chunk recurrence as `torch.scan` (an ONNX Scan) and the triangular inverse by
log-depth products. DeepSeek-V2's rotary embedding, computed with complex numbers (which torch.export cannot
decompose), is swapped for the same product in real arithmetic; LongCat-Flash's experts loop (data-dependent:
its router may pick zero-compute identity experts) for the gather form. The stand-ins are swapped in only while
exporting (`export_friendly`): the PyTorch reference keeps the original code, so `verify` checks one against
the other.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn


def chunk_gated_delta_rule_scan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    **_kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over `[batch, seq, heads, dim]` inputs; same contract as the Hugging Face fallback."""
    from torch._higher_order_ops.scan import scan

    out_dtype = query.dtype
    batch, seq_len, num_k_heads, k_dim = key.shape
    num_v_heads, v_dim = value.shape[-2:]
    if num_k_heads != num_v_heads:
        query = query.repeat_interleave(num_v_heads // num_k_heads, dim=2)
        key = key.repeat_interleave(num_v_heads // num_k_heads, dim=2)
    # -> [batch, heads, seq, ...] in fp32
    query, key, value, beta, g = (x.transpose(1, 2).float() for x in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    query = query * k_dim**-0.5

    # One all-padding chunk more than needed: the chunk count is then >= 2 for every sequence length, so
    # the traced graph holds for short sequences too (a count that may be 1 gets specialised by tracing).
    # Padding and un-padding are gathers, not pad / slice: their sizes are then plain products of the
    # chunk count, with no relation between padded and real length for the tracer to prove.
    # Padding has beta = 0 and decay 0 and comes after the real tokens, so it never changes their outputs.
    num_chunks = (seq_len + 2 * chunk_size - 1) // chunk_size  # = ceil(seq / chunk) + 1, one floor term
    padded_positions = torch.arange(num_chunks * chunk_size, device=query.device).clamp(max=seq_len)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [B, H, S, ...] -> [B, H, N*C, ...], zeros after S
        zero_row = torch.zeros_like(x.narrow(2, 0, 1))
        return torch.cat([x, zero_row], dim=2).index_select(2, padded_positions)

    query, key, value, beta, g = (padded(x) for x in (query, key, value, beta, g))
    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    heads = num_v_heads

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B, H, N, C, D]
        return x.reshape(batch, heads, num_chunks, chunk_size, x.shape[-1])

    query, key, k_beta, v_beta = (chunked(x) for x in (query, key, k_beta, v_beta))
    cum_decay = g.reshape(batch, heads, num_chunks, chunk_size).cumsum(-1)  # [B, H, N, C]

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).tril()
    pair_decay = (cum_decay.unsqueeze(-1) - cum_decay.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    strict_lower = -((k_beta @ key.transpose(-1, -2)) * pair_decay).masked_fill(
        torch.eye(chunk_size, dtype=torch.bool, device=query.device), 0.0
    )
    inverse = _unit_lower_inverse(strict_lower, chunk_size)
    new_values = inverse @ v_beta
    k_cumdecay = inverse @ (k_beta * cum_decay.exp().unsqueeze(-1))
    intra_attn = (query @ key.transpose(-1, -2)) * pair_decay

    query = query * cum_decay.exp().unsqueeze(-1)
    key = key * (cum_decay[..., -1:] - cum_decay).exp().unsqueeze(-1)
    chunk_decay = cum_decay[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    # The scan body sees 3-D tensors [batch*heads, ...] and only bmm / elementwise ops: a 4-D matmul in the
    # body decomposes into views over symbolic sizes, which the ONNX exporter cannot carry through a Scan.
    rows = batch * heads
    state = (
        torch.zeros(rows, k_dim, v_dim, dtype=torch.float32, device=query.device)
        if initial_state is None
        else initial_state.float().reshape(rows, k_dim, v_dim)
    )

    def step(state: torch.Tensor, chunk: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        nv, kc, q, attn, k, decay = chunk
        v_new = nv - torch.bmm(kc, state)
        out = torch.bmm(q, state) + torch.bmm(attn, v_new)
        next_state = state * decay + torch.bmm(k.transpose(1, 2), v_new)
        return next_state, out

    xs = tuple(
        x.reshape(rows, num_chunks, *x.shape[3:])
        for x in (new_values, k_cumdecay, query, intra_attn, key, chunk_decay)
    )
    final_state, out = scan(step, state, xs, dim=1)  # out: [B*H, N, C, Dv]
    out = out.reshape(batch, heads, num_chunks * chunk_size, v_dim)
    out = out.index_select(2, torch.arange(seq_len, device=out.device))
    out = out.transpose(1, 2).contiguous().to(out_dtype)
    final = final_state.reshape(batch, heads, k_dim, v_dim) if output_final_state else None
    return out, final


def _unit_lower_inverse(strict_lower: torch.Tensor, size: int) -> torch.Tensor:
    """(I - M)^-1 for strictly lower-triangular M: (I + M)(I + M^2)(I + M^4)... (M^size = 0)."""
    eye = torch.eye(size, dtype=strict_lower.dtype, device=strict_lower.device)
    result = eye + strict_lower
    power = strict_lower
    steps = 1
    while 2**steps < size:
        power = power @ power
        result = result @ (eye + power)
        steps += 1
    return result


def polar_free_rotary_forward(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's rotary embedding without complex numbers: `torch.polar(1, freqs) * scaling` as its real
    and imaginary parts, [..., dim / 2, 2] (torch.export has no complex decompositions)."""
    if getattr(self, "rope_type", "default") in ("dynamic", "longrope"):
        # frequencies updated at run time by the original's decorator: not what this computes
        raise NotImplementedError(f"{self.rope_type} rotary scaling computed with complex numbers")
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def real_apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's `apply_rotary_emb` on (cos, sin) pairs from `polar_free_rotary_forward`: the complex
    product of interleaved (real, imaginary) pairs, written out."""
    freqs = freqs_cis.unsqueeze(1).to(xq.device)  # [batch, 1, seq, dim / 2, 2]
    cos, sin = freqs[..., 0], freqs[..., 1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return rotated.flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def zero_expert_gather_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """LongCat-Flash's experts, whose router may pick zero-compute (identity) experts, in the gather form: every
    (token, slot) computes its expert (ids of identity experts clamped to a real one) and a slot that picked an
    identity expert takes the token itself instead. The original loops over the experts hit, which
    torch.export cannot trace (the loop count depends on the data). transformers 5.25 moved the identity experts
    into the MoE block (their slots reach the experts as real ids with weight 0) and renamed the count
    `num_experts`; then every slot is real here."""
    num_real = getattr(self, "num_routed_experts", None) or self.num_experts
    is_real = top_k_index < num_real
    ids = torch.where(is_real, top_k_index, torch.zeros_like(top_k_index))
    tokens = hidden_states[:, None, :].expand(-1, top_k_index.shape[1], -1)  # [T, k, H]
    gate_up = torch.einsum("tkh,tkih->tki", tokens, self.gate_up_proj[ids])
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.einsum("tki,tkhi->tkh", self.act_fn(gate) * up, self.down_proj[ids])
    out = torch.where(is_real[..., None], out, tokens)
    return (out * top_k_weights[..., None]).sum(dim=1).to(hidden_states.dtype)


# Module-level functions that Hugging Face modelling code calls by global name, and their stand-ins.
_STAND_INS = {"torch_chunk_gated_delta_rule": chunk_gated_delta_rule_scan}
# Stand-ins per modelling module ("Class.method" for methods): complex rotary embeddings rewritten in real
# arithmetic (swapped as a pair, so the embedding's form matches its one consumer); experts with zero-compute
# members in the gather form.
_MODULE_STAND_INS: dict[str, dict[str, object]] = {
    "transformers.models.deepseek_v2.modeling_deepseek_v2": {
        "DeepseekV2RotaryEmbedding.forward": polar_free_rotary_forward,
        "apply_rotary_emb": real_apply_rotary_emb,
    },
    "transformers.models.longcat_flash.modeling_longcat_flash": {
        "LongcatFlashExperts.forward": zero_expert_gather_forward,
    },
}


#: Export example length for models with chunked linear attention: two chunks, so that the chunk count is
#: not 1 in the example (a size-1 dimension would be specialised and break every longer sequence).
CHUNKED_EXAMPLE_SEQ = 72


def _modelling_modules(model: nn.Module) -> set[object]:
    return {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}


def has_chunked_linear_attention(model: nn.Module) -> bool:
    return any(hasattr(module, name) for module in _modelling_modules(model) for name in _STAND_INS)


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[list[str]]:
    """Swap in the stand-ins for every modelling module `model` uses; yields what was swapped."""
    modules = _modelling_modules(model)
    saved: list[tuple[object, str, object]] = []
    for module in modules:
        for name, stand_in in _STAND_INS.items():
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, stand_in)
        for dotted, stand_in in _MODULE_STAND_INS.get(getattr(module, "__name__", ""), {}).items():
            owner: object = module
            *path, name = dotted.split(".")
            for part in path:
                owner = getattr(owner, part)
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, stand_in)
    try:
        yield sorted({f"{getattr(m, '__name__', '?')}.{n}" for m, n, _ in saved})
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)
