"""Kernel-config table: block sizes per (shape, dtype, SM, token bucket), with tuned entries and defaults.

Tables live in plugins/moe/configs/sm{SM}.json: {"entries": {key: config}}, key =
`shape_key(attrs)/dtype/bucket`. A missing entry falls back to `default_config`, so every shape works on
every SM; tuned entries only make it faster. `tune` measures candidates on the current GPU and writes a table
(command: `moetrt tune`, docs/kernels.md).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.io_utils import write_text_atomic
from moetrt.plugins.moe.kernels.plan import BUCKETS, bucket_name, is_decode
from moetrt.plugins.moe.spec import MoEAttributes

CONFIG_DIR = Path(__file__).parent / "configs"


def shape_key(attrs: MoEAttributes) -> str:
    return (f"E{attrs.num_experts}_K{attrs.top_k}_H{attrs.hidden_size}_I{attrs.intermediate_size}"
            f"_S{attrs.shared_intermediate_size}")


def entry_key(attrs: MoEAttributes, dtype: str, bound: int | None) -> str:
    return f"{shape_key(attrs)}/{dtype}/{bucket_name(bound)}"


def default_config(attrs: MoEAttributes, dtype: str, bound: int | None) -> dict[str, Any]:
    """Block sizes that are correct for any shape and reasonable on SM80-SM120."""
    fp32 = dtype == "float32"
    e_pad = 1 << max(0, (attrs.num_experts - 1).bit_length())
    if is_decode(bound):
        assert bound is not None
        # decode: spread the router weight over many programs; GEMV-like expert tiles (BM=16 is the mma minimum)
        router = {"BT": bound, "BE": 16 if bound > 16 else 32, "BK": 64 if fp32 else 128,
                  "num_warps": 8 if bound > 16 else 4, "num_stages": 1}
        gate_up = {"BM": 16, "BN": 16 if fp32 else 32, "BK": 64 if fp32 else 128, "num_warps": 4, "num_stages": 3}
        down = {"BH": 16, "BK": 64 if fp32 else 128, "num_warps": 4, "num_stages": 3}
        reduce = {"BT": 16, "BH": 128, "num_warps": 4}
    else:
        big = bound is None
        router = {"BT": 16, "BE": min(e_pad, 128) if e_pad >= 16 else 16, "BK": 32 if fp32 else 64,
                  "num_warps": 8, "num_stages": 1}
        bm = 64 if big else 32
        gate_up = {"BM": bm, "BN": 32 if fp32 else 64, "BK": 32 if fp32 else 64, "num_warps": 4,
                   "num_stages": 2 if fp32 else 3}
        down = {"BH": 32 if fp32 else 64, "BK": 32 if fp32 else 64, "num_warps": 4, "num_stages": 2 if fp32 else 3}
        reduce = {"BT": 16, "BH": 128, "num_warps": 4}
    return {"router": router, "gate_up": gate_up, "down": down, "reduce": reduce}


@cache
def _load_table(sm: int) -> dict[str, Any]:
    path = CONFIG_DIR / f"sm{sm}.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["entries"]
    except (ValueError, KeyError) as err:
        raise MoetrtError(f"kernel-config table {path} is not valid ({err})",
                          "regenerate it with `moetrt tune` or delete it to use defaults") from err


def select_config(attrs: MoEAttributes, dtype: str, sm: int, bound: int | None) -> dict[str, Any]:
    """Tuned entry for this shape / dtype / SM / bucket if the table has one, else the default."""
    cfg = default_config(attrs, dtype, bound)
    tuned = _load_table(sm).get(entry_key(attrs, dtype, bound))
    if tuned:
        cfg = copy.deepcopy(cfg)
        for stage, values in tuned.items():
            if stage in cfg:
                cfg[stage].update(values)
    if is_decode(bound):
        cfg["router"]["BT"] = bound  # the decode router sees every token in one block
    return cfg


def candidate_configs(attrs: MoEAttributes, dtype: str, bound: int | None) -> list[dict[str, Any]]:
    """A small search space around the default (each candidate changes the GEMM stages' tiles)."""
    base = default_config(attrs, dtype, bound)
    out = [base]
    if is_decode(bound):
        gate_up_opts = [(16, 16, 128, 4), (16, 32, 128, 4), (16, 64, 64, 4), (16, 32, 256, 8)]
        down_opts = [(16, 128, 4), (32, 128, 4), (16, 256, 8), (64, 64, 4)]
    else:
        gate_up_opts = [(32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 64, 8), (128, 128, 64, 8)]
        down_opts = [(64, 64, 4), (128, 64, 8), (64, 128, 4)]
    for bm, bn, bk, warps in gate_up_opts:
        for bh, dbk, dwarps in down_opts:
            cfg = copy.deepcopy(base)
            cfg["gate_up"].update({"BM": bm, "BN": bn, "BK": bk, "num_warps": warps})
            cfg["down"].update({"BH": bh, "BK": dbk, "num_warps": dwarps})
            if cfg not in out:
                out.append(cfg)
    return out


def tune(
    attrs: MoEAttributes,
    dtype: str,
    sm: int,
    time_config: Callable[[dict[str, Any], int], float],
    tokens: Iterable[int] = (1, 16, 64, 512, 4096),
    out_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Time every candidate per bucket with `time_config(cfg, num_tokens) -> µs`; write the best to the table.

    Entries of other shapes already in the table are kept.
    """
    best: dict[str, Any] = {}
    for t in tokens:
        bound = next(b for b in BUCKETS if b is None or t <= b)
        timings = [(time_config(cfg, t), i, cfg) for i, cfg in enumerate(candidate_configs(attrs, dtype, bound))]
        us, _, cfg = min(timings)
        best[entry_key(attrs, dtype, bound)] = {"gate_up": cfg["gate_up"], "down": cfg["down"], "us": round(us, 2),
                                                "tokens": t}
    path = Path(out_path) if out_path else CONFIG_DIR / f"sm{sm}.json"
    table = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    table["entries"].update(best)
    write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    _load_table.cache_clear()
    return best
