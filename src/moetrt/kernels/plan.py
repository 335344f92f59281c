"""What to launch for T tokens: kernel variants, workspace layout and the launch list (pure Python).

Shared by the AOT compiler (which variants exist), the CUDA-driver launcher (grids and arguments at run time)
and the Triton JIT path used in CPU tests, so all three run exactly the same sequence.

Four paths, chosen by token bucket (the router-logits kernel also zeroes the counters: no memset):
  routed  (T <= 16, when the config says `routed`): router logits · routed_experts (routing, gate_up, down
          and the sum over k in one launch: no sort, no block table)                    — 2 kernels
  gemv    (T <= 16, when the config says `gemv`): router logits · topk_group · gemv_gate_up ·
          gemv_down(+reduce) — no sort, no block table (kernels/triton_decode.py)     — 4 kernels
  decode  (T <= 64): router logits · top-k(+align) · gate_up · down_rows(+reduce)       — 4 kernels
          or, when the config table says `fused`: router logits · top-k(+align) · experts (gate_up + down,
          fp32 atomics; its last program casts the sum)                                — 3 kernels
  prefill (T > 64):  router logits · top-k · align · gate_up · down_rows · reduce         — 6 kernels
With `pdl` in the config (SM90+), every launch uses programmatic dependent launch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moetrt.core.dtypes import precision
from moetrt.op.spec import ACTIVATIONS, INT4, MXFP4, NATIVE, WEIGHT_FORMATS, MoEAttributes

TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Upper token bound of each bucket; the last bucket has no bound. Decode buckets fuse align into top-k.
DECODE_BUCKETS = (1, 16, 64)
GEMV_MAX_TOKENS = 16  # the expert-group (gemv) path serves buckets up to this bound
ROUTED_MAX_TOKENS = 16  # the routed path serves buckets up to this bound
PREFILL_BUCKETS = (512, None)
BUCKETS: tuple[int | None, ...] = DECODE_BUCKETS + PREFILL_BUCKETS
ALIGN_MAX_PROGRAMS = 128
ALIGN_SLOT_CHUNK = 256  # slots per program per align-loop step

# The expert-block table the top-k/align kernels write and the expert kernels read, in signature order.
_BLOCK_TABLE: tuple[tuple[str, str], ...] = (
    ("offsets_ptr", "i32"),
    ("nblocks_ptr", "i32"),
    ("block_expert_ptr", "i32"),
    ("block_row0_ptr", "i32"),
    ("sorted_slot_ptr", "i32"),
)
# The expert-group table of the gemv path (topk_group writes it, the gemv kernels read it).
_GROUP_TABLE: tuple[tuple[str, str], ...] = (
    ("ngroups_ptr", "i32"),
    ("group_expert_ptr", "i32"),
    ("expert_slots_ptr", "i32"),
)
# Runtime (non-constexpr) parameters of each kernel, in signature order, with their kind:
#   x: pointer to the op's dtype · f32 / i32: pointer to that type · T: the token count (i32 scalar)
#   w / s / z: expert weight codes, their scales, their zero points: the op's dtype when the experts are native,
#   else uint8 codes, float32 scales (uint8 e8m0 for mxfp4) and uint8 zero points (`param_types`)
#   q: e4m3 codes (fp8 activations, quantized once per call) as uint8
#   int: a host-computed i32 (loop trip counts, program counts), given per launch in Launch.args
# Router programs whose weight slice (BE x the slice of H, padded to a power of two) has at most this many
# elements load it whole before their programmatic-dependent-launch wait (triton_moe._router_weights_first):
# 16 KB of bf16, 32 registers a thread at 4 warps. Larger slices (prefill tiles) stream in the K loop.
ROUTER_PRELOAD_ELEMENTS = 8192


# The router kernels' pointers (both compute partial logits through triton_moe._router_partials).
_ROUTER_POINTERS: tuple[tuple[str, str], ...] = (
    ("x_ptr", "x"),
    ("router_w_ptr", "x"),
    ("shared_gate_w_ptr", "x"),
    ("logits_ws_ptr", "f32"),
    ("gate_part_ptr", "f32"),
    ("zero_ptr", "i32"),
    ("xq_ptr", "q"),
    ("xs_ptr", "f32"),
)
KERNEL_PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "router": (
        *_ROUTER_POINTERS,
        ("T", "T"),
        ("zero_words", "int"),
    ),
    "router_topk": (
        *_ROUTER_POINTERS,
        ("router_b_ptr", "x"),
        ("logits_out_ptr", "x"),
        ("gate_ws_ptr", "f32"),
        ("corr_bias_ptr", "x"),
        ("topk_ids_ptr", "i32"),
        ("topk_w_ptr", "f32"),
        *_BLOCK_TABLE,
        ("ticket_ptr", "i32"),
        ("T", "T"),
        ("zero_words", "int"),
    ),
    "topk": (
        ("logits_ws_ptr", "f32"),
        ("router_b_ptr", "x"),
        ("logits_out_ptr", "x"),
        ("gate_part_ptr", "f32"),
        ("gate_ws_ptr", "f32"),
        ("corr_bias_ptr", "x"),
        ("topk_ids_ptr", "i32"),
        ("topk_w_ptr", "f32"),
        ("rank_ptr", "i32"),
        ("counts_ptr", "i32"),
        ("tickets_ptr", "i32"),
        *_BLOCK_TABLE,
        ("T", "T"),
        ("block_iters", "int"),
        ("slot_iters", "int"),
    ),
    "align": (
        ("counts_ptr", "i32"),
        ("topk_ids_ptr", "i32"),
        ("rank_ptr", "i32"),
        *_BLOCK_TABLE,
        ("T", "T"),
        ("block_iters", "int"),
        ("slot_iters", "int"),
        ("nprog", "int"),
    ),
    "gate_up": (
        ("x_ptr", "x"),
        ("w_gu_ptr", "w"),
        ("b_gu_ptr", "x"),
        ("shared_w_gu_ptr", "x"),
        ("act_ptr", "x"),
        ("w_gu_scale_ptr", "s"),
        ("w_gu_zero_ptr", "z"),
        ("gu_part_ptr", "f32"),
        ("gu_tickets_ptr", "i32"),
        ("xq_ptr", "q"),
        ("xs_ptr", "f32"),
        ("actq_ptr", "q"),
        ("acts_ptr", "f32"),
        *_BLOCK_TABLE,
        ("T", "T"),
    ),
    "down_rows": (
        ("w_down_ptr", "w"),
        ("b_down_ptr", "x"),
        ("shared_w_down_ptr", "x"),
        ("act_ptr", "x"),
        ("topk_w_ptr", "f32"),
        ("gate_ws_ptr", "f32"),
        ("yw_ptr", "x"),
        ("out_ptr", "x"),
        ("htickets_ptr", "i32"),
        ("w_down_scale_ptr", "s"),
        ("w_down_zero_ptr", "z"),
        ("actq_ptr", "q"),
        ("acts_ptr", "f32"),
        *_BLOCK_TABLE,
        ("T", "T"),
    ),
    "reduce": (("yw_ptr", "x"), ("out_ptr", "x"), ("T", "T")),
    "experts": (
        ("x_ptr", "x"),
        ("w_gu_ptr", "x"),
        ("b_gu_ptr", "x"),
        ("shared_w_gu_ptr", "x"),
        ("w_down_ptr", "x"),
        ("b_down_ptr", "x"),
        ("shared_w_down_ptr", "x"),
        ("topk_w_ptr", "f32"),
        ("gate_ws_ptr", "f32"),
        ("acc_ptr", "f32"),
        ("out_ptr", "x"),
        ("tickets_ptr", "i32"),
        *_BLOCK_TABLE,
        ("T", "T"),
    ),
    "routed_experts": (
        ("x_ptr", "x"),
        ("logits_ws_ptr", "f32"),
        ("router_b_ptr", "x"),
        ("logits_out_ptr", "x"),
        ("gate_part_ptr", "f32"),
        ("gate_ws_ptr", "f32"),
        ("corr_bias_ptr", "x"),
        ("w_gu_ptr", "w"),
        ("b_gu_ptr", "x"),
        ("shared_w_gu_ptr", "x"),
        ("w_gu_scale_ptr", "s"),
        ("w_gu_zero_ptr", "z"),
        ("w_down_ptr", "w"),
        ("b_down_ptr", "x"),
        ("shared_w_down_ptr", "x"),
        ("w_down_scale_ptr", "s"),
        ("w_down_zero_ptr", "z"),
        ("topk_ids_ptr", "i32"),
        ("topk_w_ptr", "f32"),
        ("act_ptr", "x"),
        ("out_ptr", "x"),
        ("units_ptr", "i32"),
        ("acc_ptr", "f32"),
        ("T", "T"),
    ),
    "topk_group": (
        ("logits_ws_ptr", "f32"),
        ("router_b_ptr", "x"),
        ("logits_out_ptr", "x"),
        ("gate_part_ptr", "f32"),
        ("gate_ws_ptr", "f32"),
        ("corr_bias_ptr", "x"),
        ("topk_ids_ptr", "i32"),
        ("topk_w_ptr", "f32"),
        ("counts_ptr", "i32"),
        *_GROUP_TABLE,
        ("T", "T"),
    ),
    "gemv_gate_up": (
        ("x_ptr", "x"),
        ("w_gu_ptr", "x"),
        ("b_gu_ptr", "x"),
        ("shared_w_gu_ptr", "x"),
        ("act_ptr", "x"),
        ("counts_ptr", "i32"),
        ("ngroups_ptr", "i32"),
        ("group_expert_ptr", "i32"),
        ("expert_slots_ptr", "i32"),
        ("T", "T"),
        ("gmax", "int"),
    ),
    "gemv_down": (
        ("w_down_ptr", "x"),
        ("b_down_ptr", "x"),
        ("shared_w_down_ptr", "x"),
        ("act_ptr", "x"),
        ("topk_w_ptr", "f32"),
        ("gate_ws_ptr", "f32"),
        ("yw_ptr", "x"),
        ("out_ptr", "x"),
        ("htickets_ptr", "i32"),
        ("counts_ptr", "i32"),
        ("ngroups_ptr", "i32"),
        ("group_expert_ptr", "i32"),
        ("expert_slots_ptr", "i32"),
        ("T", "T"),
        ("gmax", "int"),
    ),
}

# Which op tensor or workspace region feeds each pointer parameter.
_SOURCES: dict[str, tuple[str, str]] = {
    "x_ptr": ("in", "hidden_states"),
    "router_w_ptr": ("in", "router_weight"),
    "router_b_ptr": ("in", "router_bias"),
    "corr_bias_ptr": ("in", "score_correction_bias"),
    "shared_gate_w_ptr": ("in", "shared_gate_weight"),
    "w_gu_ptr": ("in", "expert_gate_up_weight"),
    "b_gu_ptr": ("in", "expert_gate_up_bias"),
    "shared_w_gu_ptr": ("in", "shared_gate_up_weight"),
    "w_down_ptr": ("in", "expert_down_weight"),
    "w_gu_scale_ptr": ("in", "expert_gate_up_scale"),
    "w_gu_zero_ptr": ("in", "expert_gate_up_zero"),
    "w_down_scale_ptr": ("in", "expert_down_scale"),
    "w_down_zero_ptr": ("in", "expert_down_zero"),
    "b_down_ptr": ("in", "expert_down_bias"),
    "shared_w_down_ptr": ("in", "shared_down_weight"),
    "logits_out_ptr": ("out", "router_logits"),
    "out_ptr": ("out", "output"),
    "logits_ws_ptr": ("ws", "logits"),
    "gate_ws_ptr": ("ws", "gate"),
    "gate_part_ptr": ("ws", "gate_part"),
    "topk_ids_ptr": ("ws", "topk_ids"),
    "topk_w_ptr": ("ws", "topk_w"),
    "rank_ptr": ("ws", "rank"),
    "counts_ptr": ("ws", "counts"),
    "zero_ptr": ("ws", "counts"),  # counts, tickets and htickets: one zeroed span
    "tickets_ptr": ("ws", "tickets"),
    "htickets_ptr": ("ws", "htickets"),
    "gu_tickets_ptr": ("ws", "gu_tickets"),
    "gu_part_ptr": ("ws", "gu_part"),
    "units_ptr": ("ws", "units"),
    "offsets_ptr": ("ws", "offsets"),
    "nblocks_ptr": ("ws", "nblocks"),
    "block_expert_ptr": ("ws", "block_expert"),
    "block_row0_ptr": ("ws", "block_row0"),
    "sorted_slot_ptr": ("ws", "sorted_slot"),
    "act_ptr": ("ws", "act"),
    "xq_ptr": ("ws", "xq"),
    "xs_ptr": ("ws", "xs"),
    "actq_ptr": ("ws", "actq"),
    "acts_ptr": ("ws", "acts"),
    "yw_ptr": ("ws", "yw"),
    "acc_ptr": ("ws", "acc"),
    "ngroups_ptr": ("ws", "ngroups"),
    "group_expert_ptr": ("ws", "group_expert"),
    "expert_slots_ptr": ("ws", "expert_slots"),
    "ticket_ptr": ("state", "router_ticket"),
}

# Memory a launcher keeps per stream across calls ('state' arguments), zeroed once when it is allocated; each
# call leaves it zero again. The router kernel that routes (router_topk) counts its programs there: a ticket
# that must be zero before the call's first kernel starts cannot live in the per-call workspace, which holds
# garbage (TensorRT shares it with other layers).
STATE_REGIONS: dict[str, tuple[int, int]] = {"router_ticket": (0, 4)}  # name -> (byte offset, bytes)
STATE_BYTES = 256


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bucket_of(num_tokens: int, available: Sequence[int | None] = BUCKETS) -> int | None:
    """The smallest of `available` buckets (upper token bound, None = unbounded) that serves `num_tokens`."""
    bounded = sorted(b for b in available if b is not None and num_tokens <= b)
    if bounded:
        return bounded[0]
    if None in available:
        return None
    raise ValueError(f"no bucket serves {num_tokens} tokens")


def bucket_name(bound: int | None) -> str:
    return "inf" if bound is None else str(bound)


def is_decode(bound: int | None) -> bool:
    return bound is not None and bound <= DECODE_BUCKETS[-1]


def is_routed(cfg: dict[str, Any], bound: int | None) -> bool:
    """Whether the bucket runs the routed path (routing, expert GEMMs and the sum over k in one launch after
    the router): small T, and the config enables it. It takes precedence over the other decode paths."""
    return bound is not None and bound <= ROUTED_MAX_TOKENS and bool(cfg.get("routed", {}).get("enabled", 0))


def is_fused(cfg: dict[str, Any], bound: int | None) -> bool:
    """Whether the decode bucket runs the fused experts kernel (gate_up + down in one launch); the routed
    and expert-group paths, where enabled, take precedence."""
    return (
        is_decode(bound)
        and bool(cfg.get("fused", {}).get("enabled", 0))
        and not is_gemv(cfg, bound)
        and not is_routed(cfg, bound)
    )


def is_gemv(cfg: dict[str, Any], bound: int | None) -> bool:
    """Whether the bucket runs the expert-group (gemv) path: small T, and the config enables it (the routed
    path, where enabled, takes precedence)."""
    return (
        bound is not None
        and bound <= GEMV_MAX_TOKENS
        and bool(cfg.get("gemv", {}).get("enabled", 0))
        and not is_routed(cfg, bound)
    )


def decode_path(cfg: dict[str, Any], bound: int | None) -> str:
    """The path a bucket runs under `cfg`: routed, gemv, fused, sorted (decode buckets) or prefill."""
    if is_routed(cfg, bound):
        return "routed"
    if is_gemv(cfg, bound):
        return "gemv"
    if is_fused(cfg, bound):
        return "fused"
    return "sorted" if is_decode(bound) else "prefill"


#: Slots a one-program routing sorts in registers (slot pairs compared: this many squared); beyond it the top-k
#: kernel's counters, a ticket and _align do the work (triton_moe._align_in_registers).
LOCAL_SORT_MAX_SLOTS = 32


def routes_in_router(attrs: MoEAttributes, cfg: dict[str, Any], bound: int | None) -> bool:
    """Whether the router kernel's last program routes (`router_topk`, config `topk.in_router`), so that the
    bucket has no top-k launch: decode buckets of the sorted and fused paths whose every slot fits the
    one-program sort in registers (next_pow2(bound) * top_k slots, rounded to a power of two, at most
    LOCAL_SORT_MAX_SLOTS; no expert with more rows than one block)."""
    if bound is None or decode_path(cfg, bound) not in ("sorted", "fused"):
        return False
    rows = next_pow2(bound)
    return (
        bool(cfg["topk"].get("in_router", 0))
        and next_pow2(rows * attrs.top_k) <= LOCAL_SORT_MAX_SLOTS
        and bound <= cfg["gate_up"]["BM"]
    )


def routed_units(attrs: MoEAttributes, cfg: dict[str, Any], num_tokens: int) -> int:
    """Programs of the routed_experts kernel: the routing unit, then per token its gate_up N tiles (routed
    slots and the shared expert) and, unless fused, its output's H tiles."""
    rc = cfg["routed"]
    shared_tiles = cdiv(attrs.shared_intermediate_size, rc["BN"]) if attrs.has_shared_expert else 0
    gate_up = shared_tiles + attrs.top_k * cdiv(attrs.intermediate_size, rc["BN"])
    h_tiles = 0 if routed_fused(attrs, cfg) else cdiv(attrs.hidden_size, rc["BH"])
    return 1 + num_tokens * (gate_up + h_tiles)


#: Narrowest 4-bit down slice of the routed path's fused form: 16-code slices (dequantized per weight) came
#: out wrong on the H200 (rel err 0.5-1.4; right under the CPU interpreter), so they are not run.
ROUTED_FUSED_MIN_4BIT_TILE = 32


def routed_fused(attrs: MoEAttributes, cfg: dict[str, Any]) -> bool:
    """Whether the routed path adds each unit's down products into an fp32 accumulator with atomics
    (config `routed.fused`). Not with fp8 activations (quantized per weight block, wider than an N tile),
    nor with 4-bit N tiles narrower than ROUTED_FUSED_MIN_4BIT_TILE codes: H-tile units then."""
    narrow_4bit = attrs.weight_format in (INT4, MXFP4) and cfg["routed"]["BN"] < ROUTED_FUSED_MIN_4BIT_TILE
    return bool(cfg["routed"].get("fused", 0)) and not attrs.has_fp8_activations and not narrow_4bit


def expert_tile(attrs: MoEAttributes, tile: int) -> int:
    """An expert GEMM tile along a weight-block axis (either GEMM's reduction tile, gate_up's N tile): the
    config's, or with fp8 activations exactly one weight block, so that one activation scale covers a row of
    a reduction tile (triton_moe._fp8_product) and each gate_up program quantizes whole blocks of its
    activation rows for the down GEMM (triton_moe.gate_up_kernel)."""
    return attrs.weight_block if attrs.has_fp8_activations else tile


def quantizes_x_once(attrs: MoEAttributes, cfg: dict[str, Any], bound: int | None) -> bool:
    """Whether the router kernel quantizes x to e4m3 for the expert GEMMs, and gate_up their activation (fp8
    activations on the sorted path; the routed path quantizes its tiles in registers)."""
    return attrs.has_fp8_activations and not is_routed(cfg, bound)


QUANTIZE_MAX_COLUMNS = 8


def quantize_columns(attrs: MoEAttributes, cfg: dict[str, Any], bound: int | None) -> int:
    """Columns of router programs (grid axis 1, after the expert blocks) that quantize x when
    `quantizes_x_once`: with the SPLIT slices, about one weight block of a token block each, at most
    QUANTIZE_MAX_COLUMNS (two blocks each at prefill for H = 2048); none otherwise."""
    if not quantizes_x_once(attrs, cfg, bound):
        return 0
    blocks = cdiv(attrs.hidden_size, attrs.weight_block)
    return min(QUANTIZE_MAX_COLUMNS, cdiv(blocks, cfg["router"]["SPLIT"]))


def shared_gate_column(attrs: MoEAttributes, cfg: dict[str, Any]) -> int:
    """1 where the router's shared gate is a column of programs of its own (grid axis 1, after the expert blocks
    and before the quantizing columns; config `router.GATE_COL`), 0 where each logits program sums it in its
    loop (the default) or the op has no shared gate."""
    return int(attrs.has_shared_gate and bool(cfg["router"].get("GATE_COL", 0)))


def gate_up_splits(cfg: dict[str, Any], bound: int | None) -> int:
    """Splits of the reduction (H) per gate_up tile: decode buckets of the sorted path, where one program
    per tile leaves too few weight bytes in flight (config `gate_up.SK`, default 1); 1 elsewhere."""
    if not is_decode(bound) or is_fused(cfg, bound) or is_gemv(cfg, bound) or is_routed(cfg, bound):
        return 1
    return int(cfg["gate_up"].get("SK", 1))


def gemv_rows(bound: int) -> int:
    """Rows per expert group in the gemv kernels: every token of the bucket may pick one expert, and
    tensor cores take 16 rows at least (measured: FMA rows streamed the weights at half the rate)."""
    return max(16, next_pow2(bound))


def gemv_groups(attrs: MoEAttributes, num_tokens: int) -> int:
    """Most experts T tokens can hit (the routed groups; the shared expert is one more)."""
    return min(attrs.num_experts, num_tokens * attrs.top_k)


def param_types(kernel: str, dtype: str, weight_format: str = NATIVE) -> list[str]:
    """Triton signature types of a kernel's runtime parameters (what the cubin's entry point takes)."""
    x = "*" + TRITON_DTYPE[dtype]
    quantized = weight_format != NATIVE
    kinds = {
        "x": x,
        "f32": "*fp32",
        "i32": "*i32",
        "q": "*u8",
        "T": "i32",
        "int": "i32",
        "w": "*u8" if quantized else x,
        "s": ("*u8" if weight_format == MXFP4 else "*fp32") if quantized else x,
        "z": "*u8" if weight_format == INT4 else x,
    }
    return [kinds[kind] for _, kind in KERNEL_PARAMS[kernel]]


def param_sources(kernel: str) -> list[tuple[str, str]]:
    """Where each runtime parameter of `kernel` comes from: ('in' | 'out', tensor name), ('ws', region),
    ('state', region of STATE_REGIONS), ('T', '') or ('int', host value name). Kernel bundles carry this list, so a launcher in any language
    resolves arguments without its own copy of these tables; an absent optional tensor resolves to
    hidden_states (never read: a constexpr flag disables it)."""
    out: list[tuple[str, str]] = []
    for name, kind in KERNEL_PARAMS[kernel]:
        if kind == "T":
            out.append(("T", ""))
        elif kind == "int":
            out.append(("int", name))
        else:
            out.append(_SOURCES[name])
    return out


def variant_weight_format(constexprs: Mapping[str, Any]) -> str:
    """The expert weight format a variant was compiled for (its WFMT constexpr; native without one)."""
    return WEIGHT_FORMATS[int(constexprs.get("WFMT", 0))]


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: Triton function, its constexpr values and launch options."""

    kernel: str
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @property
    def key(self) -> str:
        text = json.dumps([self.kernel, list(self.constexprs), self.num_warps, self.num_stages])
        return f"{self.kernel}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# Constexprs the single-launch expert kernels (fused experts, routed) take from the gate_up stage's, and those
# every routing kernel (top-k, topk_group, routed) takes from the top-k stage's, in signature order.
_EXPERT_CONSTEXPRS = ("E", "K", "H", "I", "IS", "NMAX", "ACTIVATION", "ALPHA", "LIMIT", "HAS_BIAS", "IEEE")
_ROUTING_CONSTEXPRS = (
    "SCORING_SIGMOID",
    "TOPK_BEFORE",
    "NORM_TOPK",
    "N_GROUP",
    "TOPK_GROUP",
    "SCALE",
    "HAS_CORR_BIAS",
    "HAS_ROUTER_BIAS",
    "HAS_SHARED",
    "HAS_SHARED_GATE",
    "OUT_LOGITS",
    "SPLIT",
)


def scales_on_product(wfmt: int, wb: int, bk: int, per_weight: int) -> bool:
    """Whether quantized tiles of BK reduction elements are multiplied as their codes' values, each tile's
    product then scaled per output column (instead of every weight dequantized): they must lie in one scale
    group (WB % BK == 0), 4-bit tiles hold at least 32 codes, and the config has not asked for per-weight
    dequantization (`dequant.per_weight`, a tuning candidate: a per-tile product keeps Hopper's asynchronous
    wgmma of large tiles from accumulating in place). WFMT as spec.WEIGHT_FORMATS' index."""
    return wfmt != 0 and not per_weight and wb % bk == 0 and (wfmt == 1 or bk >= 32)


def weights_first(wfmt: int, scaled: bool, xq: int, ieee: int, bm: int, bn: int) -> bool:
    """Whether a quantized GEMM loop computes W @ x.T (the weight tile as the first operand, the product
    transposed once after the loop) instead of x @ W.T: tiles dequantized per weight, of prefill blocks
    (BM and the weight tile's BN rows at least 64) on the 16-bit tensor cores. Hopper's wgmma takes its first
    operand from registers, so the tile dequantized in registers feeds it with no shared-memory store and the
    products stay asynchronous (sm_90 TTGIR: as the second operand, each tile was stored to shared memory and
    every product waited for, pendings = 0; first, the waits allow 7 in flight)."""
    return wfmt != 0 and not scaled and not xq and not ieee and bm >= 64 and bn >= 64


#: Rows a warp group may hold of a 4-bit weight tile that spans several scale groups and is multiplied weights
#: first. With more (128: Qwen3-30B's T = 4096 down rows, 128 rows at 4 warps; Qwen3-Next's, 256 at 8) the
#: sm_90 kernels of Triton 3.6 wrote NaN and inf for int4 in groups of 32 and for mxfp4, while the same tiles
#: at twice the warps, and int4 tiles inside one group of 128, were right
#: (bench/results/2026-12-04-h200-mxfp4-folded-scales, tests/gpu/test_gpu_kernels.py); such configs are refused.
WEIGHTS_FIRST_GROUPED_MAX_ROWS = 64


def check_weights_first_rows(
    stage: str, weights: Mapping[str, int], bm: int, rows: int, bk: int, num_warps: int, ieee: int
) -> None:
    """Refuse (ValueError, one line) a stage config whose 4-bit weight tile of `rows` x `bk`, across several
    scale groups and multiplied weights first, holds more than WEIGHTS_FIRST_GROUPED_MAX_ROWS rows a warp
    group."""
    wfmt, wb = weights["WFMT"], weights["WB"]
    if WEIGHT_FORMATS[wfmt] not in (INT4, MXFP4) or wb % bk == 0:
        return
    scaled = scales_on_product(wfmt, wb, bk, weights["PER_WEIGHT"])
    if not weights_first(wfmt, scaled, weights["ACT_FP8"], ieee, bm, rows):
        return
    per_warp_group = rows * 4 // num_warps
    if per_warp_group > WEIGHTS_FIRST_GROUPED_MAX_ROWS:
        raise ValueError(
            f"{stage}: a {rows} x {bk} 4-bit weight tile across scale groups multiplied weights first holds "
            f"{per_warp_group} rows a warp group at {num_warps} warps, more than {WEIGHTS_FIRST_GROUPED_MAX_ROWS} (wrong "
            f"results on sm_90); use {rows * 4 // WEIGHTS_FIRST_GROUPED_MAX_ROWS} warps or "
            f"{WEIGHTS_FIRST_GROUPED_MAX_ROWS * num_warps // 4} rows"
        )


def _nmax(attrs: MoEAttributes) -> int:
    return max(attrs.intermediate_size, attrs.shared_intermediate_size)


def _align_constexprs(attrs: MoEAttributes, cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "E": attrs.num_experts,
        "K": attrs.top_k,
        "BM": cfg["gate_up"]["BM"],
        "HAS_SHARED": int(attrs.has_shared_expert),
        "EP_PAD": next_pow2(attrs.num_experts + 2),
        "CS": ALIGN_SLOT_CHUNK,
    }


def uses_fp8_conversion(cfg: dict[str, Any]) -> bool:
    """fp8 expert weights converted by the SM's e4m3 instructions (core.devices.has_fp8_conversion) rather
    than decoded from their bits."""
    return bool(cfg.get("dequant", {}).get("fp8_cvt", 0))


# Tensor-memory-accelerator tiles (gate_up.TMA / down.TMA): the grouped GEMMs build their descriptors on the
# device, one CUtensorMap (128 bytes) per descriptor and program in Triton's global scratch, which the launch's
# last argument points at (the tma_scratch region). aot.compile_variant checks the compiled size against these.
TMA_DESCRIPTOR_BYTES = 128
# per program: gate_up's over its expert's weight; down_rows' over act and over its expert's weight; persistent
# programs (persistent_programs) add one over the shared expert's weight, where the op has one
TMA_DESCRIPTORS = {"gate_up": 1, "down_rows": 2}
TMA_STAGE_CONFIG = {"gate_up": "gate_up", "down_rows": "down"}  # the config section that asks for each
# a launch's argument past the kernel's own parameters: Triton's global-scratch pointer, in the cubin's ABI
TMA_SCRATCH_ARG = (("ws", "tma_scratch"),)


def uses_tma(attrs: MoEAttributes, dtype: str, cfg: dict[str, Any], bound: int | None, stage: str) -> bool:
    """Whether grouped GEMM `stage` ('gate_up' | 'down_rows') loads its tiles by TMA: the config asks for it (a
    tuning candidate, for SM 9.0 and later), the bucket runs the grouped GEMMs, and the tiles are native
    weights (quantized codes are decoded from pointer loads; fp8 activations have their own loop) whose rows
    TMA can address: every row stride a multiple of 16 bytes. down_rows also multiplies act by TMA, so its
    reduction (I, and the shared expert's) must be whole BK tiles: a partial tile would read act columns past
    the expert's, which hold another expert's values (only the weights would load as zeros)."""
    if not cfg[TMA_STAGE_CONFIG[stage]].get("TMA", 0) or decode_path(cfg, bound) not in ("sorted", "prefill"):
        return False
    if attrs.weight_format != NATIVE or attrs.has_fp8_activations:
        return False
    esize = precision(dtype).itemsize
    if stage == "gate_up":
        return attrs.hidden_size * esize % 16 == 0
    bk = expert_tile(attrs, cfg["down"]["BK"])
    reductions = [attrs.intermediate_size]
    if attrs.has_shared_expert:
        reductions.append(attrs.shared_intermediate_size)
    strides = [*reductions, _nmax(attrs)]  # the weights' rows, and act's
    return all(n % bk == 0 for n in reductions) and all(n * esize % 16 == 0 for n in strides)


def tma_descriptors(stage: str, constexprs: Mapping[str, Any]) -> int:
    """Descriptors a program of TMA grouped GEMM `stage` builds (128 bytes each of Triton's global scratch),
    from its variant's constexprs: a persistent program also builds one over the shared expert's weight."""
    shared = int(constexprs.get("IS", 0) > 0 and bool(constexprs.get("PERSIST", 0)))
    return TMA_DESCRIPTORS[stage] + shared


def persistent_programs(
    attrs: MoEAttributes, dtype: str, cfg: dict[str, Any], bound: int | None, stage: str
) -> int:
    """Programs of a persistent grouped GEMM (`gate_up.PERSIST` / `down.PERSIST`, a tuning candidate: about the
    SM count), or 0 for one program per tile: prefill buckets whose stage loads its tiles by TMA (the
    persistent loops are that form's, `triton_moe._gate_up_persistent`), gate_up unsplit over H."""
    programs = int(cfg[TMA_STAGE_CONFIG[stage]].get("PERSIST", 0))
    if programs <= 0 or is_decode(bound) or not uses_tma(attrs, dtype, cfg, bound, stage):
        return 0
    if stage == "gate_up" and gate_up_splits(cfg, bound) > 1:
        return 0
    return programs


# Programmatic dependent launch modes (config `pdl.enabled`, the kernels' PDL constexpr): 0 off (stream order);
# 1 each kernel waits for the previous one, then lets the next one launch at once, whose programs then wait
# on the GPU beside its own; 2 each kernel waits, and the next one launches as its programs exit. On the H200
# mode 2 was the fastest for Qwen3-30B T = 1 and Qwen3-Next T = 512, mode 1 for Qwen3 T = 2-8
# (bench/results/2026-12-04-h200-sums-and-timing-order, step 10).
PDL_MODES = (0, 1, 2)


def pdl_mode(cfg: dict[str, Any]) -> int:
    """The config's programmatic-dependent-launch mode (PDL_MODES)."""
    mode = int(cfg.get("pdl", {}).get("enabled", 0))
    if mode not in PDL_MODES:
        raise ValueError(f"pdl.enabled is {mode}; it takes {', '.join(map(str, PDL_MODES))} (PDL_MODES)")
    return mode


def uses_pdl(cfg: dict[str, Any]) -> bool:
    """Programmatic dependent launch (SM90+): each kernel's launch overlaps the previous kernel's tail."""
    return pdl_mode(cfg) > 0


def bucket_variants(
    attrs: MoEAttributes, dtype: str, bound: int | None, cfg: dict[str, Any]
) -> dict[str, Variant]:
    """Stage name -> kernel variant for one token bucket under config `cfg` (see configs.default_config)."""
    pdl = ("PDL", pdl_mode(cfg))
    return {
        stage: Variant(v.kernel, (*v.constexprs, pdl), v.num_warps, v.num_stages)
        for stage, v in _stage_variants(attrs, dtype, bound, cfg).items()
    }


def _stage_variants(
    attrs: MoEAttributes, dtype: str, bound: int | None, cfg: dict[str, Any]
) -> dict[str, Variant]:
    e, h, k = attrs.num_experts, attrs.hidden_size, attrs.top_k
    ieee = int(dtype == "float32")
    decode = is_decode(bound)
    rc, gc, dc = cfg["router"], cfg["gate_up"], cfg["down"]
    xq = quantizes_x_once(attrs, cfg, bound)
    router = {
        "E": e,
        "H": h,
        "HAS_SHARED_GATE": int(attrs.has_shared_gate),
        "IEEE": ieee,
        "SPLIT": rc["SPLIT"],
        "BT": rc["BT"],
        "BE": rc["BE"],
        "BK": rc["BK"],
        "ACT_FP8": int(xq),
        "WB": attrs.weight_block if xq else 1,
        "QCOLS": quantize_columns(attrs, cfg, bound),
        "GATE_COL": shared_gate_column(attrs, cfg),
    }
    tc = cfg["topk"]
    align = _align_constexprs(attrs, cfg)
    topk = {
        "E": e,
        "K": k,
        "SCORING_SIGMOID": int(attrs.scoring == "sigmoid"),
        "TOPK_BEFORE": int(attrs.topk_before_score),
        "NORM_TOPK": int(attrs.norm_topk_prob),
        "N_GROUP": attrs.n_group,
        "TOPK_GROUP": attrs.topk_group,
        "SCALE": float(attrs.routed_scaling_factor),
        "HAS_CORR_BIAS": int(attrs.has_score_correction_bias),
        "HAS_ROUTER_BIAS": int(attrs.has_router_bias),
        "HAS_SHARED": int(attrs.has_shared_expert),
        "HAS_SHARED_GATE": int(attrs.has_shared_gate),
        "OUT_LOGITS": int(attrs.output_router_logits),
        "SPLIT": rc["SPLIT"],
        "FUSE_ALIGN": int(decode),
        # no more rows per program than the bucket has tokens: a one-token step routes [1, E] tiles
        "RT": min(tc["RT"], next_pow2(bound)) if decode and bound is not None else tc["RT"],
        "E_PAD": next_pow2(e),
        "K_PAD": next_pow2(k),
        "G_PAD": next_pow2(attrs.n_group),
        **{name: align[name] for name in ("BM", "EP_PAD", "CS")},
    }
    dims = {
        "E": e,
        "K": k,
        "H": h,
        "I": attrs.intermediate_size,
        "IS": attrs.shared_intermediate_size,
        "NMAX": _nmax(attrs),
    }
    gate_up = {
        **dims,
        "ACTIVATION": ACTIVATIONS.index(attrs.activation),
        "ALPHA": float(attrs.swiglu_alpha),
        "LIMIT": float(attrs.swiglu_limit),
        "HAS_BIAS": int(attrs.has_expert_bias),
        "IEEE": ieee,
        "BM": gc["BM"],
        "BN": expert_tile(attrs, gc["BN"]),
        "BK": expert_tile(attrs, gc["BK"]),
    }
    # the routed experts' weight format (spec.WEIGHT_FORMATS index), its block and zero points
    weights = {
        "WFMT": WEIGHT_FORMATS.index(attrs.weight_format),
        "WB": attrs.weight_block or 1,
        "HAS_ZERO": int(attrs.has_weight_zero_point),
        "FP8_CVT": int(uses_fp8_conversion(cfg)),
        "PER_WEIGHT": int(cfg.get("dequant", {}).get("per_weight", 0) and not attrs.has_fp8_activations),
        "ACT_FP8": int(attrs.has_fp8_activations),
    }
    if is_routed(cfg, bound):
        rd = cfg["routed"]
        routed = {
            **{name: gate_up[name] for name in _EXPERT_CONSTEXPRS},
            **{name: topk[name] for name in (*_ROUTING_CONSTEXPRS, "RT", "E_PAD", "K_PAD", "G_PAD")},
            "BM": 16,  # one token row per unit, padded to the mma minimum
            "BN": rd["BN"],
            "BK": expert_tile(attrs, rd["BK"]),
            "BH": rd["BH"],
            "BKD": expert_tile(attrs, rd["BKD"]),
            "FUSED": int(routed_fused(attrs, cfg)),
            **weights,
        }
        return {
            "router": Variant("router", tuple(router.items()), rc["num_warps"], rc["num_stages"]),
            "routed_experts": Variant(
                "routed_experts", tuple(routed.items()), rd["num_warps"], rd["num_stages"]
            ),
        }
    if is_gemv(cfg, bound):
        assert bound is not None
        gv = cfg["gemv"]
        tm = gemv_rows(bound)
        topk_group = {name: topk[name] for name in ("E", "K", *_ROUTING_CONSTEXPRS)}
        topk_group.update(
            {
                "RT": topk["RT"],
                "TM": tm,
                "E_PAD": topk["E_PAD"],
                "K_PAD": topk["K_PAD"],
                "G_PAD": topk["G_PAD"],
            }
        )
        shared = {"HAS_SHARED": int(attrs.has_shared_expert)}
        gemv_gate_up = {
            **{
                name: gate_up[name]
                for name in ("E", "K", "H", "I", "IS", "NMAX", "ACTIVATION", "ALPHA", "LIMIT")
            },
            "HAS_BIAS": int(attrs.has_expert_bias),
            **shared,
            "IEEE": ieee,
            "TM": tm,
            "BN": gv["BN"],
            "BK": gv["BK"],
        }
        gemv_down = {
            **dims,
            "HAS_BIAS": int(attrs.has_expert_bias),
            **shared,
            "IEEE": ieee,
            "TM": tm,
            "BH": gv["BH"],
            "BK": gv["BKD"],
            "BT": tm,
        }
        return {
            "router": Variant("router", tuple(router.items()), rc["num_warps"], rc["num_stages"]),
            "topk_group": Variant("topk_group", tuple(topk_group.items()), tc["num_warps"], 1),
            "gemv_gate_up": Variant(
                "gemv_gate_up", tuple(gemv_gate_up.items()), gv["num_warps"], gv["num_stages"]
            ),
            "gemv_down": Variant("gemv_down", tuple(gemv_down.items()), gv["down_warps"], gv["down_stages"]),
        }
    # the router kernel routes too (no top-k launch) where the config asks and every slot fits its registers
    routing_stages = {
        "router": Variant("router", tuple(router.items()), rc["num_warps"], rc["num_stages"]),
        "topk": Variant("topk", tuple(topk.items()), tc["num_warps"], 1),
    }
    if routes_in_router(attrs, cfg, bound):
        assert bound is not None
        router_topk = {  # signature order: the router's, then the routing's it does not have
            **router,
            **{name: topk[name] for name in ("K", *_ROUTING_CONSTEXPRS) if name not in router},
            "RT": next_pow2(bound),  # one program routes every token of the bucket
            **{name: topk[name] for name in ("E_PAD", "K_PAD", "G_PAD")},
        }
        routing_stages = {
            "router": Variant("router_topk", tuple(router_topk.items()), rc["num_warps"], rc["num_stages"])
        }
    if is_fused(cfg, bound):
        if attrs.is_quantized:  # configs.select_config never enables it there; a hand-made config may
            raise ValueError(
                "the fused experts kernel takes native weights, and this op's experts are quantized"
            )
        experts = {
            **{name: gate_up[name] for name in (*_EXPERT_CONSTEXPRS, "BM", "BN", "BK")},
            "BH": cfg["fused"]["BH"],
        }
        return {
            **routing_stages,
            "experts": Variant("experts", tuple(experts.items()), gc["num_warps"], gc["num_stages"]),
        }
    down = {
        **dims,
        "HAS_BIAS": int(attrs.has_expert_bias),
        "HAS_SHARED": int(attrs.has_shared_expert),
        "FUSE_REDUCE": int(decode),
        "IEEE": ieee,
        "BM": gc["BM"],
        "BH": dc["BH"],
        "BK": expert_tile(attrs, dc["BK"]),
        "BT": cfg["reduce"]["BT"],
        "GM": dc.get("GM", 1),
        **weights,
        "TMA": int(uses_tma(attrs, dtype, cfg, bound, "down_rows")),
        "PERSIST": persistent_programs(attrs, dtype, cfg, bound, "down_rows"),
    }
    variants = {
        **routing_stages,
        "gate_up": Variant(
            "gate_up",
            tuple(
                {
                    **gate_up,
                    "SK": gate_up_splits(cfg, bound),
                    "GM": gc.get("GM", 1),
                    **weights,
                    "TMA": int(uses_tma(attrs, dtype, cfg, bound, "gate_up")),
                    "PERSIST": persistent_programs(attrs, dtype, cfg, bound, "gate_up"),
                }.items()
            ),
            gc["num_warps"],
            gc["num_stages"],
        ),
    }
    variants["down_rows"] = Variant("down_rows", tuple(down.items()), dc["num_warps"], dc["num_stages"])
    check_weights_first_rows(
        "gate_up", weights, gc["BM"], gate_up["BN"], gate_up["BK"], gc["num_warps"], ieee
    )
    check_weights_first_rows("down", weights, gc["BM"], down["BH"], down["BK"], dc["num_warps"], ieee)
    if not decode:
        variants["align"] = Variant("align", tuple(align.items()), 4, 1)
        red = cfg["reduce"]
        reduce = {
            "K": k,
            "H": h,
            "HAS_SHARED": int(attrs.has_shared_expert),
            "BT": red["BT"],
            "BH": red["BH"],
        }
        variants["reduce"] = Variant("reduce", tuple(reduce.items()), red["num_warps"], 1)
    return variants


@dataclass(frozen=True)
class StageRef:
    """What the launch list needs of a compiled variant (a Variant, or one restored from a bundle)."""

    key: str
    constexprs: tuple[tuple[str, Any], ...]


# Workspace regions of counters (and the fused path's accumulator) inside the span the router kernel zeroes,
# 16-byte aligned; every other region starts on 256 bytes.
COUNTER_REGIONS = ("tickets", "htickets", "ngroups", "gu_tickets", "units", "acc")


@dataclass(frozen=True)
class Region:
    offset: int
    nbytes: int


def _max_blocks(attrs: MoEAttributes, num_tokens: int, bm: int) -> int:
    slots = num_tokens * attrs.top_k
    shared = cdiv(num_tokens, bm) if attrs.has_shared_expert else 0
    # sum_e cdiv(c_e, BM) <= slots / BM + (experts hit), each hit expert wasting < 1 block
    return cdiv(slots, bm) + min(attrs.num_experts, slots) + shared


def grid_blocks(cfg: dict[str, Any], bound: int | None, max_blocks: int) -> int:
    """Row blocks the grouped GEMMs' grids cover: on the paths that run gate_up and down_rows, max_blocks
    rounded up to whole groups of both kernels' GM blocks (triton_moe.grouped_tile); the block tables and
    tickets are sized alike, so the last group's extra programs read in bounds (and exit)."""
    if decode_path(cfg, bound) not in ("sorted", "prefill"):
        return max_blocks
    group = math.lcm(cfg["gate_up"].get("GM", 1), cfg["down"].get("GM", 1))
    return cdiv(max_blocks, group) * group


def tma_scratch_bytes(
    attrs: MoEAttributes, dtype: str, cfg: dict[str, Any], bound: int | None, blocks: int
) -> int:
    """Bytes of the tma_scratch region: the descriptors of every program of the larger of the grouped GEMMs
    that use TMA (they run one after the other, so they share it; under programmatic dependent launch a
    kernel builds its descriptors only after its wait, when the previous one has finished)."""
    tiles = {
        "gate_up": blocks
        * cdiv(_nmax(attrs), expert_tile(attrs, cfg["gate_up"]["BN"]))
        * gate_up_splits(cfg, bound),
        "down_rows": blocks * cdiv(attrs.hidden_size, cfg["down"]["BH"]),
    }
    sizes = []
    for stage in TMA_DESCRIPTORS:
        if not uses_tma(attrs, dtype, cfg, bound, stage):
            continue
        constexprs = {
            "IS": attrs.shared_intermediate_size,
            "PERSIST": persistent_programs(attrs, dtype, cfg, bound, stage),
        }
        programs = persistent_grid(constexprs, tiles[stage])
        sizes.append(programs * tma_descriptors(stage, constexprs) * TMA_DESCRIPTOR_BYTES)
    return max(sizes, default=0)


def workspace_layout(
    attrs: MoEAttributes, dtype: str, num_tokens: int, cfg: dict[str, Any], bound: int | None
) -> dict[str, Region]:
    """Byte regions of the workspace for `num_tokens` in bucket `bound` (config `cfg`); 'total' spans all."""
    t, k, e, h = num_tokens, attrs.top_k, attrs.num_experts, attrs.hidden_size
    rows = t * k + (t if attrs.has_shared_expert else 0)
    max_blocks = grid_blocks(cfg, bound, _max_blocks(attrs, t, cfg["gate_up"]["BM"]))
    esize = precision(dtype).itemsize
    fused = is_fused(cfg, bound)
    gemv = is_gemv(cfg, bound)
    groups = gemv_groups(attrs, t) if gemv else 0
    tm = gemv_rows(bound) if gemv and bound is not None else 0
    tile_h = cfg["gemv"]["BH"] if gemv else cfg["down"]["BH"]
    splits = gate_up_splits(cfg, bound)
    gate_up_tiles = (
        max_blocks * cdiv(_nmax(attrs), expert_tile(attrs, cfg["gate_up"]["BN"])) if splits > 1 else 0
    )
    routed = is_routed(cfg, bound)
    routed_acc = routed and routed_fused(attrs, cfg)
    xq, block = quantizes_x_once(attrs, cfg, bound), attrs.weight_block
    shared_rows = t if attrs.has_shared_expert else 0
    sizes = [
        ("counts", 4 * (e + 2)),
        ("tickets", 16),  # counts ... acc: one span the router-logits kernel zeroes
        ("htickets", 4 * cdiv(h, tile_h)),
        ("ngroups", 16 if gemv else 0),
        ("gu_tickets", 4 * gate_up_tiles),
        # routed path: unit counter, routing flag, fused ticket, then gate_up tiles done per token
        ("units", 4 * (3 + t) if routed else 0),
        (
            "acc",
            4 * t * h if fused or routed_acc else 0,
        ),  # fused decode: fp32 output accumulator, zeroed with the counters
        ("group_expert", 4 * groups),
        ("expert_slots", 4 * e * tm),
        ("logits", 4 * cfg["router"]["SPLIT"] * t * e),
        ("gate_part", 4 * cfg["router"]["SPLIT"] * t),
        ("gate", 4 * t),
        ("topk_ids", 4 * t * k),
        ("topk_w", 4 * t * k),
        ("rank", 4 * t * k),
        ("offsets", 4 * (e + 2)),
        ("nblocks", 4),
        ("block_expert", 4 * max_blocks),
        ("block_row0", 4 * max_blocks),
        ("sorted_slot", 4 * rows),
        # with fp8 activations the routed rows' activation is actq: act keeps the shared expert's T rows only
        ("act", 0 if fused else esize * (shared_rows if xq else rows) * _nmax(attrs)),
        # fp8 activations: x and the routed rows' activation as e4m3 codes and block scales (quantizes_x_once)
        ("xq", t * h if xq else 0),
        ("xs", 4 * t * cdiv(h, block) if xq else 0),
        # the routed rows only (the first T·K of the sorted order): the shared expert's activation is in act
        ("actq", t * k * attrs.intermediate_size if xq else 0),
        ("acts", 4 * t * k * cdiv(attrs.intermediate_size, block) if xq else 0),
        # split gate_up: fp32 gate | up partial sums per split and row (rows of the shared expert included)
        ("gu_part", 4 * splits * (t * k + t) * 2 * _nmax(attrs) if splits > 1 else 0),
        ("yw", 0 if fused or routed else esize * rows * h),
        ("tma_scratch", tma_scratch_bytes(attrs, dtype, cfg, bound, max_blocks)),
    ]
    layout: dict[str, Region] = {}
    offset = 0
    for name, nbytes in sizes:
        align = 16 if name in COUNTER_REGIONS else 256
        offset = cdiv(offset, align) * align
        layout[name] = Region(offset, nbytes)
        offset += nbytes
    layout["total"] = Region(0, cdiv(offset, 256) * 256)
    return layout


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the variant key, its grid, and where each runtime argument comes from.

    args: ('in', name) | ('out', name) | ('ws', region) | ('state', region) | ('T', '') | ('int', decimal) — absent optional tensors resolve
    to the hidden_states pointer (never read: a constexpr flag disables their use).
    """

    stage: str
    variant_key: str
    grid: tuple[int, int, int]
    args: tuple[tuple[str, str], ...]
    pdl: bool = False  # launch with programmatic stream serialization (the kernel waits with griddepcontrol)


def launch_sequence(
    attrs: MoEAttributes,
    dtype: str,
    num_tokens: int,
    variants: Mapping[str, Variant | StageRef],
    cfg: dict[str, Any],
    bound: int | None,
) -> list[Launch]:
    """The ordered operations for `num_tokens` tokens served by bucket `bound` (empty for T = 0)."""
    t = num_tokens
    if t <= 0:
        return []
    if bound is not None and t > bound:
        raise ValueError(f"{t} tokens do not fit bucket {bound}")
    layout = workspace_layout(attrs, dtype, t, cfg, bound)
    e, h, k = attrs.num_experts, attrs.hidden_size, attrs.top_k
    const = {name: dict(v.constexprs) for name, v in variants.items()}
    bm = cfg["gate_up"]["BM"]
    max_blocks = _max_blocks(attrs, t, bm)
    present_in = set(attrs.present_inputs())
    present_out = set(attrs.present_outputs())

    def args_for(kernel: str, **ints: int) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        for src, ref in param_sources(kernel):
            if src == "int":
                out.append(("int", str(ints[ref])))
            elif (src == "in" and ref not in present_in) or (src == "out" and ref not in present_out):
                out.append(("in", "hidden_states"))
            else:
                out.append((src, ref))
        return tuple(out)

    zero_end = layout["acc"].offset + layout["acc"].nbytes
    ops: list[Launch] = []
    r = const["router"]
    routing_launch = not routes_in_router(attrs, cfg, bound)  # else the router kernel routes (router_topk)
    ops.append(
        Launch(
            "router",
            variants["router"].key,
            (cdiv(t, r["BT"]), cdiv(e, r["BE"]) + r["GATE_COL"] + r["QCOLS"], r["SPLIT"]),
            args_for("router" if routing_launch else "router_topk", zero_words=zero_end // 4),
        )
    )
    if is_routed(cfg, bound):
        ops.append(
            Launch(
                "routed_experts",
                variants["routed_experts"].key,
                (routed_units(attrs, cfg, t), 1, 1),
                args_for("routed_experts"),
            )
        )
        return _with_pdl(ops, const)
    if is_gemv(cfg, bound):
        groups = gemv_groups(attrs, t) + int(attrs.has_shared_expert)
        rt = const["topk_group"]["RT"]
        ops.append(
            Launch("topk_group", variants["topk_group"].key, (cdiv(t, rt), 1, 1), args_for("topk_group"))
        )
        gu = const["gemv_gate_up"]
        ops.append(
            Launch(
                "gemv_gate_up",
                variants["gemv_gate_up"].key,
                (groups * cdiv(_nmax(attrs), gu["BN"]), 1, 1),
                args_for("gemv_gate_up", gmax=gemv_groups(attrs, t)),
            )
        )
        dn = const["gemv_down"]
        ops.append(
            Launch(
                "gemv_down",
                variants["gemv_down"].key,
                (groups * cdiv(h, dn["BH"]), 1, 1),
                args_for("gemv_down", gmax=gemv_groups(attrs, t)),
            )
        )
        return _with_pdl(ops, const)
    blocks_per_expert = cdiv(t, bm)  # a token picks an expert at most once (the shared expert: every token)
    if routing_launch:
        tk = const["topk"]
        chunk = tk["CS"]
        if is_decode(bound):
            topk_ints = {"block_iters": blocks_per_expert, "slot_iters": cdiv(t * k, chunk)}
        else:
            topk_ints = {"block_iters": 0, "slot_iters": 0}
        ops.append(
            Launch("topk", variants["topk"].key, (cdiv(t, tk["RT"]), 1, 1), args_for("topk", **topk_ints))
        )
    if not is_decode(bound):
        chunk = const["topk"]["CS"]
        programs = max(1, min(ALIGN_MAX_PROGRAMS, max(cdiv(t * k, chunk), blocks_per_expert)))
        iters = {
            "block_iters": cdiv(blocks_per_expert, programs),
            "slot_iters": cdiv(t * k, chunk * programs),
            "nprog": programs,
        }
        ops.append(Launch("align", variants["align"].key, (programs, 1, 1), args_for("align", **iters)))
    if is_fused(cfg, bound):
        ex = const["experts"]
        ops.append(
            Launch(
                "experts",
                variants["experts"].key,
                (max_blocks * cdiv(_nmax(attrs), ex["BN"]), 1, 1),
                args_for("experts"),
            )
        )
        return _with_pdl(ops, const)
    g = const["gate_up"]
    blocks = grid_blocks(cfg, bound, max_blocks)  # whole groups of row blocks, for both grouped GEMMs
    ops.append(
        Launch(
            "gate_up",
            variants["gate_up"].key,
            (persistent_grid(g, blocks * cdiv(_nmax(attrs), g["BN"]) * g["SK"]), 1, 1),
            args_for("gate_up") + (TMA_SCRATCH_ARG if g.get("TMA", 0) else ()),
        )
    )
    d = const["down_rows"]
    ops.append(
        Launch(
            "down_rows",
            variants["down_rows"].key,
            (persistent_grid(d, blocks * cdiv(h, d["BH"])), 1, 1),
            args_for("down_rows") + (TMA_SCRATCH_ARG if d.get("TMA", 0) else ()),
        )
    )
    if not is_decode(bound):
        red = const["reduce"]
        ops.append(
            Launch(
                "reduce",
                variants["reduce"].key,
                (cdiv(t, red["BT"]), cdiv(h, red["BH"]), 1),
                args_for("reduce"),
            )
        )
    return _with_pdl(ops, const)


def device_grid(
    grid: tuple[int, int, int], constexprs: Mapping[str, Any], sm_count: int
) -> tuple[int, int, int]:
    """The grid a launcher uses on a GPU of `sm_count` SMs: a persistent grouped GEMM's programs are at most one
    per SM, as the tuner counts them on the GPU it ran on, so a table tuned on a larger GPU (the H200's 132 SMs)
    leaves no program waiting for a second round on a smaller one (114 on an H100 PCIe); its programs loop over
    all tiles whatever their number, and the planned tma_scratch covers the larger grid. Other grids as
    planned. The native launcher does the same (native/src/plan.cpp device_grid)."""
    if int(constexprs.get("PERSIST", 0)) > 0 and sm_count > 0:
        return (min(grid[0], sm_count), grid[1], grid[2])
    return grid


def persistent_grid(constexprs: Mapping[str, Any], tiles: int) -> int:
    """A grouped GEMM's programs: one per tile, or with PERSIST at most that many, each looping over tiles."""
    persist = int(constexprs.get("PERSIST", 0))
    return min(persist, tiles) if persist else tiles


def _with_pdl(ops: list[Launch], const: dict[str, dict[str, Any]]) -> list[Launch]:
    return [dataclasses.replace(op, pdl=bool(const[op.stage].get("PDL", 0))) for op in ops]
