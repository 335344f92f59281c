"""Every packaged kernel-config table entry of a preset's shape, and every 4-bit config a preset gets on any SM,
goes through the plan unrefused (a refusal would make `moetrt build` fail for that shape), and the weights-first
row rule refuses what it must."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from moetrt.kernels import configs, plan
from moetrt.op.presets import PRESETS
from moetrt.op.spec import FP8_BLOCK, NATIVE, WEIGHT_FORMATS

TABLES = sorted((Path(configs.__file__).parent / "configs").glob("sm*.json"))
WEIGHTS = re.compile(r"^\+(fp8_block|int4|mxfp4)g?(\d+)(z?)(a8)?$")


def _attrs_of(key: str):  # type: ignore[no-untyped-def]
    """(attrs, dtype, bound) of an entry key of a preset's shape (configs.entry_key), else None."""
    head, dtype, bucket = key.split("/")
    shape, _, weights = head.partition("+")
    base = next((a for a in PRESETS.values() if configs.shape_key(a) == shape), None)
    if base is None:
        return None
    attrs = base
    if weights:
        fmt, block, zero, a8 = WEIGHTS.match("+" + weights).groups()  # type: ignore[union-attr]
        attrs = dataclasses.replace(
            base,
            weight_format=fmt,
            weight_block=int(block),
            has_weight_zero_point=bool(zero),
            activation_format=FP8_BLOCK if a8 else NATIVE,
        )
    return attrs, dtype, None if bucket == "inf" else int(bucket)


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_every_preset_entry_of_the_packaged_tables_is_planned(table: Path) -> None:
    sm = int(table.stem[2:])
    checked = 0
    for key in json.loads(table.read_text())["entries"]:
        found = _attrs_of(key)
        if found is None:
            continue
        attrs, dtype, bound = found
        assert configs.entry_key(attrs, dtype, bound) == key  # the key parsed back to the attrs it names
        plan.bucket_variants(attrs, dtype, bound, configs.select_config(attrs, dtype, sm, bound))
        checked += 1
    assert checked >= 20, f"only {checked} entries of {table.name} matched a preset"


@pytest.mark.parametrize("weights", [("int4", 32), ("int4", 128), ("mxfp4", 32)])
def test_every_4bit_config_a_preset_gets_on_any_sm_is_planned(weights: tuple[str, int]) -> None:
    # the table's entry or the default tiles, for every supported SM, 16-bit dtype and bucket
    from moetrt.kernels.aot import SUPPORTED_SMS

    fmt, block = weights
    checked = 0
    for base in PRESETS.values():
        if base.hidden_size % block or base.intermediate_size % block:
            continue
        attrs = dataclasses.replace(base, weight_format=fmt, weight_block=block)
        for sm in SUPPORTED_SMS:
            for dtype in ("bfloat16", "float16"):
                for bound in plan.BUCKETS:
                    plan.bucket_variants(attrs, dtype, bound, configs.select_config(attrs, dtype, sm, bound))
                    checked += 1
    assert checked >= 100


def _weights(fmt: str, block: int) -> dict[str, int]:
    return {
        "WFMT": WEIGHT_FORMATS.index(fmt),
        "WB": block,
        "PER_WEIGHT": 1,
        "ACT_FP8": 0,
    }


def test_weights_first_tiles_across_scale_groups_are_refused_past_64_rows_a_warp_group() -> None:
    # the T = 4096 down tile that wrote NaN: 128 x 64 mxfp4 (two groups) at 4 warps
    with pytest.raises(ValueError, match=r"128 rows a warp group at 4 warps.*use 8 warps or 64 rows"):
        plan.check_weights_first_rows("down", _weights("mxfp4", 32), 128, 128, 64, 4, 0)
    with pytest.raises(ValueError, match="256 x 64"):  # int4 in groups of 32 alike
        plan.check_weights_first_rows("down", _weights("int4", 32), 128, 256, 64, 8, 0)
    plan.check_weights_first_rows("down", _weights("mxfp4", 32), 128, 128, 64, 8, 0)  # 64 rows a warp group
    plan.check_weights_first_rows("down", _weights("int4", 128), 128, 128, 64, 4, 0)  # inside one group
    plan.check_weights_first_rows("down", _weights("fp8_block", 128), 128, 256, 64, 8, 0)  # fp8: right
    plan.check_weights_first_rows("down", _weights("mxfp4", 32), 16, 128, 64, 4, 0)  # decode: x @ W.T
    plan.check_weights_first_rows("down", _weights("mxfp4", 32), 128, 128, 64, 4, 1)  # float32: x @ W.T
