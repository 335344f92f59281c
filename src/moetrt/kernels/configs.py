"""Kernel-config table: block sizes per (shape, dtype, SM, token bucket), with tuned entries and defaults.

Tables live in kernels/configs/sm{SM}.json: {"entries": {key: config}}, key = `shape_key(attrs)/dtype/bucket`.
A missing entry falls back to `default_config`, so every shape works on every SM; tuned entries only make it
faster. The tuner (`moetrt.tune`, command `moetrt tune`, docs/kernels.md) measures candidates and writes a table.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from moetrt.core.devices import has_fp8_conversion, has_warp_group_mma
from moetrt.core.errors import MoetrtError
from moetrt.core.files import write_text_atomic
from moetrt.kernels.plan import (
    DECODE_BUCKETS,
    GEMV_MAX_TOKENS,
    PDL_MODES,
    ROUTED_FUSED_MIN_4BIT_TILE,
    ROUTED_MAX_TOKENS,
    TMA_STAGE_CONFIG,
    bucket_name,
    expert_tile,
    is_decode,
    next_pow2,
    pdl_mode,
    routes_in_router,
    uses_tma,
)
from moetrt.op.spec import FP8_BLOCK, MoEAttributes

CONFIG_DIR = Path(__file__).parent / "configs"
#: A folder of sm<SM>.json tables (as `moetrt tune -o FOLDER/sm<SM>.json` writes them) whose entries take
#: precedence over the package's: a GPU's own tuning used wherever kernels are compiled (build, aot) without
#: editing the package.
KERNEL_CONFIGS_ENV = "MOETRT_KERNEL_CONFIGS"
# Buckets up to this bound take the expert-group (gemv) path unless a tuned entry turns it off. None: on
# the H200 it streamed no faster than the sorted path (docs/kernels.md), so it is a tuning candidate only.
GEMV_DEFAULT_MAX = 0
# Row blocks per group that the tuner tries at prefill (`gate_up.GM`; 1, the default, runs a block's column
# tiles together): many column tiles and several blocks per expert (Mixtral) re-read the weights per block
GROUP_OPTIONS = (2, 4, 8)
GROUPED_MIN_TILES = 32
# Splits of gate_up's reduction the tuner tries at decode (`gate_up.SK`; 1, the default, does not split)
SPLIT_K_OPTIONS = (2, 4)
# Decode tiles of more than 16 rows per expert block (gate_up BM, BN, BK, warps, stages), tried where an expert
# averages a full 16-row block at the bucket's largest T (`wide_decode_blocks`)
WIDE_DECODE_GATE_UP = ((32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3))


def shape_key(attrs: MoEAttributes) -> str:
    return (
        f"E{attrs.num_experts}_K{attrs.top_k}_H{attrs.hidden_size}_I{attrs.intermediate_size}"
        f"_S{attrs.shared_intermediate_size}"
    )


def weights_key(attrs: MoEAttributes) -> str:
    """The routed experts' format in an entry key: empty for native weights (keys as before formats existed),
    else `+fp8_block128`, `+int4g128z` (z: zero points), `+mxfp4g32`."""
    if not attrs.is_quantized:
        return ""
    block = f"{attrs.weight_block}" if attrs.weight_format == FP8_BLOCK else f"g{attrs.weight_block}"
    zero = "z" if attrs.has_weight_zero_point else ""
    return f"+{attrs.weight_format}{block}{zero}{'a8' if attrs.has_fp8_activations else ''}"


def entry_key(attrs: MoEAttributes, dtype: str, bound: int | None) -> str:
    return f"{shape_key(attrs)}{weights_key(attrs)}/{dtype}/{bucket_name(bound)}"


def scale_group_tile(attrs: MoEAttributes) -> int:
    """The reduction tile quantized experts' tiles are narrowed to, so that a tile lies inside one scale group
    and the scales multiply its product instead of every weight (plan.scales_on_product): the largest
    power of two dividing the weight block, where that is at least 16 codes (fp8) or 32 (4-bit); 0 (no
    narrowing) for native experts and smaller groups."""
    if not attrs.is_quantized:
        return 0
    tile = attrs.weight_block & -attrs.weight_block
    return tile if tile >= (16 if attrs.weight_format == FP8_BLOCK else 32) else 0


# The unbounded (prefill) bucket's gate_up tiles of weight-only quantized experts, dequantized per weight and
# multiplied weights first (plan.weights_first): the tiles `moetrt tune` chose for all 15 such entries of
# the H200 table (five shapes x fp8 / int4 / mxfp4). Against the narrow scaled tiles the default had, at
# T = 4096 they are within 0-10 % of each shape's tuned entry where those were 1.2-3.1x slower
# (bench/results/2026-12-04-h200-quantized-tables, step 18). The AOT step drops stages on SMs with less
# shared memory (aot.MAX_SHARED_BYTES).
QUANTIZED_PREFILL_GATE_UP = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def quantized_prefill_tiles(attrs: MoEAttributes, dtype: str, bound: int | None, sm: int | None) -> bool:
    """Whether the default config of this bucket takes QUANTIZED_PREFILL_GATE_UP: the unbounded bucket of
    weight-only quantized experts (fp8 activations multiply fp8 tiles one weight block wide) in 16-bit
    kernels (float32 tiles take twice the shared memory), on an SM with warp-group MMA (elsewhere those
    tiles spill: core.devices.WARP_GROUP_MMA_SMS)."""
    return (
        bound is None
        and sm is not None
        and has_warp_group_mma(sm)
        and attrs.is_quantized
        and not attrs.has_fp8_activations
        and dtype != "float32"
    )


def wide_decode_blocks(attrs: MoEAttributes, bound: int | None) -> bool:
    """Whether the tuner tries decode blocks wider than 16 rows: few experts, so that at the bucket's largest
    T an expert averages a full 16-row block (Mixtral at T = 64: 16 slots per expert on average, about half
    of the experts past 16 rows). A 16-row block table then gives such an expert two blocks or more, and
    each block streams the expert's whole weights again."""
    return is_decode(bound) and bound is not None and bound * attrs.top_k >= 16 * attrs.num_experts


def grouped_blocks_pay(attrs: MoEAttributes, bound: int | None) -> bool:
    """Whether the tuner tries row blocks grouped per weight tile (`gate_up.GM`): prefill, with at least
    GROUPED_MIN_TILES gate_up column tiles of 128, so that the next block of an expert reads a weight tile
    after the L2 has let it go (Mixtral: 112 tiles, 8 % faster at T = 512; Qwen3, DeepSeek-V3, GPT-OSS with
    4-23 tiles: no gain, measured on the H200, docs/kernels.md)."""
    return not is_decode(bound) and attrs.intermediate_size >= 128 * GROUPED_MIN_TILES


def tma_candidates(
    attrs: MoEAttributes, dtype: str, bound: int | None, base: dict[str, Any]
) -> list[dict[str, Any]]:
    """base with the grouped GEMMs' tiles loaded by TMA (`gate_up.TMA`, `down.TMA`; plan.uses_tma), and that with
    one more gate_up pipeline stage (the TMA loads of a stage cost no registers, so a deeper pipeline fits):
    native experts in 16-bit types, for SM 9.0 and later (the tuner's "tma" round), on every bucket that runs
    the grouped GEMMs. Measured on the H200: 3.5-12 % faster at T = 4096 for Mixtral, DeepSeek-V3, Qwen3-Next,
    Qwen3-30B and GPT-OSS; at T = 512 Mixtral and GPT-OSS (with larger tiles) only; at decode 5-15 % slower
    (docs/kernels.md)."""
    if attrs.is_quantized or attrs.has_fp8_activations or dtype == "float32":
        return []
    tma = copy.deepcopy(base)
    tma["gate_up"]["TMA"] = tma["down"]["TMA"] = 1
    deeper = copy.deepcopy(tma)
    deeper["gate_up"]["num_stages"] = base["gate_up"]["num_stages"] + 1
    return [tma, deeper]


#: Row blocks grouped per weight tile (GM) tried with persistent programs: programs drift apart as they loop, so
#: an expert's blocks meet its weight tile in L2 only when neighbouring tiles share it (Mixtral at T = 4096, one
#: program per tile 4332 µs, persistent down with GM 1 5071; with GM 4 the tuner kept one program per tile
#: there too, and took it for Qwen3-30B's persistent down).
PERSISTENT_GROUP = 4


def persistent_candidates(
    attrs: MoEAttributes, dtype: str, bound: int | None, base: dict[str, Any], sm_count: int
) -> list[dict[str, Any]]:
    """base with persistent programs (`gate_up.PERSIST`, `down.PERSIST`: one per SM, each looping over tiles,
    plan.persistent_programs) for gate_up, for down, and for both, each with the base's row order and with
    PERSISTENT_GROUP blocks per weight tile: the tuner's "persist" round, on prefill buckets whose grouped
    GEMMs load by TMA (the form the persistent loops take)."""
    stages = [s for s in ("gate_up", "down_rows") if uses_tma(attrs, dtype, base, bound, s)]
    if is_decode(bound) or not stages or sm_count <= 0:
        return []
    out = []
    for chosen in [[s] for s in stages] + ([stages] if len(stages) > 1 else []):
        for group in (None, PERSISTENT_GROUP):
            cfg = copy.deepcopy(base)
            for stage in chosen:
                cfg[TMA_STAGE_CONFIG[stage]]["PERSIST"] = sm_count
                if group is not None:
                    cfg[TMA_STAGE_CONFIG[stage]]["GM"] = group
            if cfg not in out:
                out.append(cfg)
    return out


#: Keys a table entry may carry that the default config leaves out; absent means the default form
#: (`router.GATE_COL`: without it the shared gate is summed in every logits program's loop).
OPTIONAL_KEYS: dict[str, frozenset[str]] = {"router": frozenset({"GATE_COL"})}


def default_config(
    attrs: MoEAttributes, dtype: str, bound: int | None, sm: int | None = None
) -> dict[str, Any]:
    """Block sizes that are correct for any shape and reasonable on SM80-SM120 (`sm`, where given, picks
    SM-specific defaults: `quantized_prefill_tiles`)."""
    fp32 = dtype == "float32"
    e_pad = 1 << max(0, (attrs.num_experts - 1).bit_length())
    # top-k: about 2048 scores per program keeps the [RT, E] tiles in registers (no spills)
    topk = {"RT": max(1, min(16, 2048 // e_pad)), "num_warps": 4}
    if is_decode(bound):
        assert bound is not None
        # decode: spread the router weight over many programs; GEMV-like expert tiles (BM=16 is the mma minimum)
        bk = 64 if fp32 else 128
        # split H so that about 128 programs stream the router weight (a few slices: top-k sums them)
        split = max(1, min(16, 128 // -(-attrs.num_experts // 16), attrs.hidden_size // bk))
        router = {"BT": 16, "BE": 16, "BK": bk, "SPLIT": split, "num_warps": 4, "num_stages": 3}
        gate_up = {
            "BM": 16,
            "BN": 16 if fp32 else 32,
            "BK": 64 if fp32 else 128,
            "SK": 1,
            "GM": 1,
            "TMA": 0,
            "num_warps": 4,
            "num_stages": 3,
        }
        # long rows (large I) in few H tiles would leave SMs idle: narrower H tiles, more programs
        down = {
            "BH": 16 if fp32 or attrs.intermediate_size >= 8192 else 64,
            "BK": 64,
            "GM": 1,
            "TMA": 0,
            "num_warps": 4,
            "num_stages": 3,
        }
        reduce = {"BT": 16, "BH": 128, "num_warps": 4}
    else:
        big = bound is None
        # H split 4 ways and 128-wide K steps: one split over all of H left the GPU idle at T <= 512 or with
        # few experts (tuned on the H200, every shape's prefill buckets took 2-8 splits; router + top-k
        # 25.0 -> 13.1 us at Qwen3-30B T = 512, 100.5 -> 78.1 at DeepSeek-V3 T = 4096)
        router = {
            "BT": 64,
            "BE": min(e_pad, 64) if e_pad >= 16 else 16,
            "BK": 32 if fp32 else 128,
            "SPLIT": 1 if fp32 else 4,
            "num_warps": 4,
            "num_stages": 3,
        }
        bm = 64 if big else 32
        gate_up = {
            "BM": bm,
            "BN": 32 if fp32 else 64,
            "BK": 32 if fp32 else 64,
            "GM": 1,  # row blocks per weight tile (triton_moe.grouped_tile)
            "TMA": 0,  # tiles by the tensor-memory accelerator (plan.uses_tma; a tuning candidate, SM 9.0+)
            "PERSIST": 0,  # persistent programs (plan.persistent_programs; with TMA, a tuning candidate)
            "num_warps": 4,
            "num_stages": 2 if fp32 else 3,
        }
        down = {
            "BH": 32 if fp32 else 64,
            "BK": 32 if fp32 else 64,
            "GM": 1,
            "TMA": 0,
            "PERSIST": 0,
            "num_warps": 4,
            "num_stages": 2 if fp32 else 3,
        }
        reduce = {"BT": 16, "BH": 128, "num_warps": 4}
    # the fused decode experts kernel is a tuning candidate, off by default (float atomics: not bitwise
    # reproducible from run to run)
    fused = {"enabled": 0, "BH": 64}
    # programmatic dependent launch (SM90+) is a tuning candidate too: off unless measured faster
    pdl = {"enabled": 0}
    # the expert-group path of small T (kernels/triton_decode.py): (group, N tile) programs
    gemv = {
        "enabled": int(bound is not None and bound <= GEMV_DEFAULT_MAX),
        "BN": 16,
        "BK": 64 if fp32 else 128,
        "num_warps": 4,
        "num_stages": 3,
        "BH": 16,
        "BKD": 64 if fp32 else 128,
        "down_warps": 4,
        "down_stages": 3,
    }
    # the routed path of small T (triton_moe.routed_experts_kernel): one launch after the router, (token,
    # N tile) gate_up units and (token, H tile) down units; a tuning candidate, off by default
    routed = {
        "enabled": 0,
        "fused": 0,  # down products added with fp32 atomics by the gate_up units (plan.routed_fused)
        "BN": 16 if fp32 else 32,
        "BK": 64 if fp32 else 128,
        "BH": 16,
        "BKD": 64 if fp32 else 128,
        "num_warps": 4,
        "num_stages": 3,
    }
    # fp8 weights: decoded from their bits here (every SM); select_config turns on the SM's conversion.
    # per_weight: quantized tiles dequantized weight by weight even where the scales could multiply each
    # tile's product instead (plan.scales_on_product), a tuning candidate
    dequant = {"fp8_cvt": 0, "per_weight": 0}
    if attrs.is_quantized:  # quantized experts: no gemv or fused path (those kernels take native weights)
        gemv["enabled"] = 0
        group_tile = scale_group_tile(attrs)
        if quantized_prefill_tiles(attrs, dtype, bound, sm):
            gate_up.update(QUANTIZED_PREFILL_GATE_UP)
            dequant["per_weight"] = 1
        elif group_tile:
            gate_up["BK"] = min(gate_up["BK"], group_tile)
        if group_tile:
            down["BK"] = min(down["BK"], group_tile)
            routed["BK"] = min(routed["BK"], group_tile)
            routed["BKD"] = min(routed["BKD"], group_tile)
    return {
        "router": router,
        "topk": topk,
        "gate_up": gate_up,
        "down": down,
        "reduce": reduce,
        "fused": fused,
        "pdl": pdl,
        "gemv": gemv,
        "routed": routed,
        "dequant": dequant,
    }


@cache
def _load_table(sm: int) -> dict[str, Any]:
    """The SM's entries: the package's table, overlaid by the one in $MOETRT_KERNEL_CONFIGS if it has one."""
    entries: dict[str, Any] = {}
    for _, path in _table_paths(sm):
        entries.update(_table_entries(path))
    return entries


def table_sources(sm: int) -> list[str]:
    """The tables the SM's configs come from, in the order they are applied (a build's manifest lists them):
    the package's, then $MOETRT_KERNEL_CONFIGS's (its absolute path); those that exist."""
    return [name for name, path in _table_paths(sm) if path.is_file()]


def _table_paths(sm: int) -> list[tuple[str, Path]]:
    """(name, path) of the SM's tables in the order they apply: the package's, then $MOETRT_KERNEL_CONFIGS's
    (refused in one line when that is not a folder); a path need not exist."""
    paths = [(f"moetrt/kernels/configs/sm{sm}.json", CONFIG_DIR / f"sm{sm}.json")]
    folder = os.environ.get(KERNEL_CONFIGS_ENV)
    if folder:
        if not Path(folder).is_dir():
            raise MoetrtError(
                f"{KERNEL_CONFIGS_ENV}={folder} is not a folder",
                f"point it at the folder that holds sm{sm}.json (moetrt tune -o FOLDER/sm{sm}.json), or unset it",
            )
        overlay = Path(folder) / f"sm{sm}.json"
        paths.append((str(overlay.resolve()), overlay))
    return paths


def _table_entries(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text())["entries"])
    except (ValueError, KeyError, TypeError) as err:
        raise MoetrtError(
            f"kernel-config table {path} is not valid ({err})",
            "regenerate it with `moetrt tune` or delete it to use defaults",
        ) from err


#: The stages whose kernels read the routed experts' weights: a quantized op's own entry tunes these; the
#: others (router, top-k, PDL) run the same kernels as the native op and take the native entry's tiles.
QUANTIZED_STAGES = ("gate_up", "down", "routed", "dequant")


def _tuned_entry(table: dict[str, Any], key_prefix: str, dtype: str, bound: int | None) -> dict[str, Any]:
    """The table's entry for `key_prefix` (shape and format) in this bucket, or for a decode bucket newer
    than the table, the next decode bucket's tiles (its own path switch kept); {} when there is none."""
    tuned = table.get(f"{key_prefix}/{dtype}/{bucket_name(bound)}")
    if tuned is None and bound is not None and bound < DECODE_BUCKETS[1]:
        tuned = {
            stage: values
            for stage, values in table.get(
                f"{key_prefix}/{dtype}/{bucket_name(DECODE_BUCKETS[1])}", {}
            ).items()
            if stage != "gemv"
        }
    return tuned or {}


def select_config(attrs: MoEAttributes, dtype: str, sm: int, bound: int | None) -> dict[str, Any]:
    """Tuned entry for this shape / format / dtype / SM / bucket if the table has one, else the default.

    Quantized experts: the native entry of the shape gives the stages that do not read the experts, the
    format's own entry (if tuned) the expert GEMM tiles; bf16 tiles are not used for quantized GEMMs (the
    dequantization changes what fits in registers)."""
    cfg = copy.deepcopy(default_config(attrs, dtype, bound, sm))
    table = _load_table(sm)
    layers = []
    if attrs.is_quantized:
        native = _tuned_entry(table, shape_key(attrs), dtype, bound)
        layers.append({stage: v for stage, v in native.items() if stage in ("router", "topk", "pdl")})
    layers.append(_tuned_entry(table, shape_key(attrs) + weights_key(attrs), dtype, bound))
    for tuned in layers:
        for stage, values in tuned.items():
            if stage in cfg:
                cfg[stage].update(values)
    if attrs.is_quantized:  # the fused and gemv kernels take native weights
        cfg["gemv"]["enabled"] = 0
        cfg["fused"]["enabled"] = 0
    cfg["dequant"]["fp8_cvt"] = int(attrs.weight_format == FP8_BLOCK and has_fp8_conversion(sm))
    return cfg


def candidate_configs(
    attrs: MoEAttributes, dtype: str, bound: int | None, base: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """A small search space around `base` (default: the default config): the GEMM stages' tiles (router
    kept). Quantized experts: gate_up tiles with base's down tiles, then down tiles with base's gate_up
    (the two kernels are timed together, and are independent), on the sorted path only; with fp8
    activations at prefill every pair of them."""
    base = copy.deepcopy(base or default_config(attrs, dtype, bound))
    out = [base]
    fp32 = dtype == "float32"
    # (BM, BN, BK, warps, stages) of gate_up x (BH, BK, warps, stages) of down; BM is shared by both
    if is_decode(bound):
        gate_up_opts = [
            (16, 32, 128, 4, 3),
            (16, 16, 128, 4, 3),
            (16, 64, 64, 4, 3),
            (16, 32, 256, 8, 3),
            (16, 16, 256, 4, 2),
            (16, 32, 128, 4, 4),
        ]
        down_opts = [(64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3), (64, 128, 8, 3), (16, 128, 4, 3)]
        if attrs.is_quantized:  # decoding costs instructions: more warps per tile; mxfp4's 32-wide groups
            gate_up_opts += [(16, 64, 128, 8, 3), (16, 32, 64, 4, 4), (16, 32, 32, 4, 4), (16, 64, 32, 4, 4)]
            down_opts += [(32, 64, 4, 4), (64, 64, 8, 3), (64, 32, 4, 4)]
        if wide_decode_blocks(attrs, bound):
            gate_up_opts += list(WIDE_DECODE_GATE_UP)
    else:
        gate_up_opts = [
            (64, 64, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (64, 128, 64, 8, 4),
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (128, 128, 32, 8, 4),
        ]
        down_opts = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3)]
    base_gate_up = tuple(base["gate_up"][k] for k in ("BM", "BN", "BK", "num_warps", "num_stages"))
    base_down = tuple(base["down"][k] for k in ("BH", "BK", "num_warps", "num_stages"))
    # quantized: base's tiles as option tuples, each stage varied with the other kept; fp8 activations at
    # prefill pair every option (tiles one weight block wide leave few distinct ones)
    if attrs.is_quantized and not (attrs.has_fp8_activations and not is_decode(bound)):
        pairs = [(g, base_down) for g in gate_up_opts] + [(base_gate_up, d) for d in down_opts]
    else:
        pairs = [(g, d) for g in gate_up_opts for d in down_opts]
    # decode: gate_up split over H (SK programs per tile, plan.gate_up_splits) with base's down tiles
    triples = [(g, d, base["gate_up"].get("SK", 1)) for g, d in pairs]
    if is_decode(bound):
        triples += [(g, base_down, sk) for sk in SPLIT_K_OPTIONS for g in gate_up_opts]
    for (bm, bn, bk, warps, stages), (bh, dbk, dwarps, dstages), sk in triples:
        if fp32 and (bk > 64 or dbk > 64 or bn > 64 or bh > 64 or bm > 64):
            continue  # fp32 tiles take twice the bytes: keep shared memory in bounds
        # the plan's tiles (one weight block wide with fp8 activations): repeats are left out below
        bn, bk, dbk = expert_tile(attrs, bn), expert_tile(attrs, bk), expert_tile(attrs, dbk)
        # scales per weight against scales on the product: a switch of the unsplit tiles
        per_weight_apart = attrs.is_quantized and sk == 1 and not attrs.has_fp8_activations
        pw_opts = (0, 1) if per_weight_apart else (base["dequant"]["per_weight"],)
        for per_weight in pw_opts:
            cfg = copy.deepcopy(base)
            cfg["gate_up"].update({"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages})
            cfg["gate_up"]["SK"] = sk
            cfg["down"].update({"BH": bh, "BK": dbk, "num_warps": dwarps, "num_stages": dstages})
            cfg["gemv"]["enabled"] = 0  # these tiles are the sorted path's
            cfg["dequant"]["per_weight"] = per_weight
            if cfg not in out:
                out.append(cfg)
    if grouped_blocks_pay(attrs, bound):  # base's tiles, row blocks grouped per weight tile (grouped_tile)
        for gm in GROUP_OPTIONS:
            cfg = copy.deepcopy(base)
            cfg["gate_up"]["GM"] = gm
            if cfg not in out:
                out.append(cfg)
    if bound is not None and bound <= ROUTED_MAX_TOKENS:
        out.extend(c for c in routed_candidates(attrs, base, dtype) if c not in out)
    if attrs.is_quantized:
        return out
    if bound is not None and bound <= GEMV_MAX_TOKENS:
        out.extend(c for c in gemv_candidates(base, dtype) if c not in out)
    if is_decode(bound):
        for bm, bn, bk, warps, stages in gate_up_opts:
            for bh in (64, 128) if not fp32 else (32,):
                cfg = copy.deepcopy(base)
                cfg["gate_up"].update(
                    {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
                )
                cfg["fused"] = {"enabled": 1, "BH": bh}
                cfg["gemv"]["enabled"] = 0
                if cfg not in out:
                    out.append(cfg)
    return out


def routed_candidates(attrs: MoEAttributes, base: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    """The routed path's tiles (BN, BK of gate_up; BH, BKD of down; warps, stages), with H-tile units and
    fused (the down products added with atomics by the gate_up units, `plan.routed_fused`); quantized
    reduction tiles no wider than the largest power of two dividing the weight block, as in `default_config`."""
    fp32 = dtype == "float32"
    opts = [
        (32, 128, 16, 128, 4, 3),
        (16, 128, 16, 128, 4, 3),
        (32, 128, 32, 128, 4, 3),
        (32, 256, 16, 256, 4, 3),
        (64, 128, 16, 256, 8, 3),
        (16, 256, 16, 256, 4, 4),
        (32, 128, 16, 256, 4, 4),
        (32, 64, 16, 128, 4, 4),
    ]
    fused_opts = [
        (32, 128, 64, 4, 3),
        (16, 128, 64, 4, 3),
        (32, 128, 128, 4, 3),
        (64, 128, 64, 8, 3),
        (32, 256, 64, 4, 3),
    ]
    group_tile = scale_group_tile(attrs)
    out = []
    for bn, bk, bh, bkd, warps, stages in opts:
        if fp32:
            bn, bk, bkd = min(bn, 32), min(bk, 64), min(bkd, 64)
        if group_tile:
            bk, bkd = min(bk, group_tile), min(bkd, group_tile)
        cfg = copy.deepcopy(base)
        cfg["routed"] = {
            "enabled": 1, "fused": 0, "BN": bn, "BK": bk, "BH": bh, "BKD": bkd, "num_warps": warps,
            "num_stages": stages,
        }  # fmt: skip
        if cfg not in out:
            out.append(cfg)
    if attrs.has_fp8_activations:  # plan.routed_fused: no fused form
        return out
    for bn, bk, bh, warps, stages in fused_opts:
        if fp32:
            bn, bk, bh = min(bn, 32), min(bk, 64), min(bh, 32)
        if group_tile:
            bk = min(bk, group_tile)
            bn = min(bn, group_tile)  # the down slice: one scale group per N tile
            if attrs.weight_format != FP8_BLOCK:
                bn = max(bn, ROUTED_FUSED_MIN_4BIT_TILE)
        cfg = copy.deepcopy(base)
        cfg["routed"] = {
            "enabled": 1, "fused": 1, "BN": bn, "BK": bk, "BH": bh, "BKD": base["routed"]["BKD"],
            "num_warps": warps, "num_stages": stages,
        }  # fmt: skip
        if cfg not in out:
            out.append(cfg)
    return out


def gemv_candidates(base: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    """The expert-group path's tiles: gate_up (BN, BK, warps) with the default down tiles, then down
    (BH, BK, warps) with the default gate_up tiles."""
    fp32 = dtype == "float32"
    gate_up_opts = [(16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 64, 4), (16, 256, 8), (64, 128, 4)]
    down_opts = [(16, 128, 4), (32, 128, 4), (64, 64, 4), (16, 256, 4), (32, 256, 8), (64, 128, 4)]
    out = []
    for bn, bk, warps in gate_up_opts:
        cfg = copy.deepcopy(base)
        cfg["gemv"].update({"enabled": 1, "BN": bn, "BK": min(bk, 64) if fp32 else bk, "num_warps": warps})
        out.append(cfg)
    for bh, bkd, warps in down_opts:
        cfg = copy.deepcopy(base)
        cfg["gemv"].update(
            {"enabled": 1, "BH": bh, "BKD": min(bkd, 64) if fp32 else bkd, "down_warps": warps}
        )
        out.append(cfg)
    return out


#: Router tiles tried at prefill (BT, BE, BK, warps, stages), each with PREFILL_ROUTER_SPLITS: few, long
#: programs (BT 64 x BE 64 over all of H) leave the GPU idle at T <= 512 or with few experts, so H is split too.
PREFILL_ROUTER_TILES = (
    (64, 64, 64, 4, 3),
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (32, 32, 64, 4, 3),
    (16, 64, 128, 4, 3),
    (64, 64, 128, 4, 3),
)
PREFILL_ROUTER_SPLITS = (1, 2, 4, 8)
#: Top-k tiles hold RT x E_PAD int64 keys in registers; past this many elements they spill.
TOPK_MAX_ELEMENTS = 8192


def router_candidates(
    attrs: MoEAttributes, base: dict[str, Any], dtype: str, bound: int | None
) -> list[dict[str, Any]]:
    """Router block shapes (and splits of H) tried once the GEMM tiles are chosen; base first. With a shared
    gate, also each of them with the gate in the other form (`router.GATE_COL`: its own column of programs, or
    summed in every logits program's loop; plan.shared_gate_column)."""
    e_pad = next_pow2(attrs.num_experts)
    if dtype == "float32":
        opts = [(16, 16, 64, 4, 3), (16, 32, 64, 4, 2), (16, 16, 128, 4, 2)]
    elif is_decode(bound):
        opts = [(16, 16, 128, 4, 3), (16, 32, 128, 4, 3), (16, 16, 64, 4, 3), (16, 16, 64, 4, 4)]
    else:
        opts = list(PREFILL_ROUTER_TILES)
    out = [base]
    split = base["router"]["SPLIT"]
    if is_decode(bound):
        splits = {split, max(1, split // 2), split * 2}
    else:
        splits = set(PREFILL_ROUTER_SPLITS) if dtype != "float32" else {1, 2}
    for bt, be, bk, warps, stages in opts:
        for new_split in sorted(splits):
            cfg = copy.deepcopy(base)
            cfg["router"].update(
                {
                    "BT": bt,
                    "BE": max(16, min(be, e_pad)),  # a tile wider than the experts only multiplies padding
                    "BK": bk,
                    "SPLIT": new_split,
                    "num_warps": warps,
                    "num_stages": stages,
                }
            )
            if cfg not in out:
                out.append(cfg)
    if attrs.has_shared_gate:
        for cfg in list(out):
            switched = copy.deepcopy(cfg)
            if cfg["router"].get("GATE_COL"):
                del switched["router"]["GATE_COL"]  # the default form, as a table without the key says
            else:
                switched["router"]["GATE_COL"] = 1
            if switched not in out:
                out.append(switched)
    return out


#: A one-warp top-k program picks by shuffles alone (no block-wide barrier), for tiles of at most this many
#: scores (64 int64 keys a thread).
TOPK_ONE_WARP_MAX_ELEMENTS = 2048


def topk_candidates(
    attrs: MoEAttributes, base: dict[str, Any], bound: int | None = None
) -> list[dict[str, Any]]:
    """Top-k tiles (tokens per program, warps) tried after the router's; base first. Around base's tokens per
    program, and one token per program always (at decode it can be the fastest call, as a decode bucket
    scores them: tune.tuner.tune). In decode buckets where it applies (`plan.routes_in_router`), also the
    router kernel routing in its last program (`topk.in_router`, no top-k launch), or without it where base
    has it; the tiles are tried with a top-k launch."""
    e_pad = next_pow2(attrs.num_experts)
    rt = base["topk"]["RT"]
    out = [base]
    switched = copy.deepcopy(base)
    switched["topk"]["in_router"] = 1
    if routes_in_router(attrs, switched, bound):
        if base["topk"].get("in_router"):  # base routes there: the top-k launch back
            del switched["topk"]["in_router"]
        out.append(switched)
    for new_rt in dict.fromkeys((max(1, rt // 2), rt, rt * 2, 1)):
        if new_rt * e_pad > TOPK_MAX_ELEMENTS and new_rt > rt:
            continue
        for warps in (1, 2, 4, 8):
            if warps == 1 and new_rt * e_pad > TOPK_ONE_WARP_MAX_ELEMENTS:
                continue
            cfg = copy.deepcopy(base)
            cfg["topk"].update({"RT": new_rt, "num_warps": warps})
            cfg["topk"].pop("in_router", None)  # the tiles of a top-k launch
            if cfg not in out:
                out.append(cfg)
    return out


def pdl_candidates(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Programmatic-dependent-launch modes tried last (SM90+, plan.PDL_MODES); base first, then the others."""
    out = [base]
    for mode in PDL_MODES:
        if mode != pdl_mode(base):
            out.append({**copy.deepcopy(base), "pdl": {"enabled": mode}})
    return out


def write_table(best: dict[str, Any], sm: int, out_path: str | os.PathLike[str] | None = None) -> Path:
    """Merge tuned entries into the SM's table (entries of other shapes are kept); returns its path."""
    path = Path(out_path) if out_path else CONFIG_DIR / f"sm{sm}.json"
    table = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    table["entries"].update(best)
    write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    _load_table.cache_clear()
    return path
