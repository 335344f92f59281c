"""Profiles of a cached decoder: prefill and decode, chosen by shape, and one-line refusals naming the flag."""

from __future__ import annotations

import pytest

from moetrt.core.errors import MoetrtError
from moetrt.trt.profiles import check_in_profile, make_profiles
from moetrt.trt.targets import DimRange

DECODER_INPUTS = [
    ("input_ids", ["batch", "seq"]),
    ("attention_mask", ["batch", "total"]),
    ("position_ids", ["batch", "seq"]),
    ("past_key_values.0.conv", ["batch", 128, 4]),
    ("past_key_values.1.key", ["batch", 2, "past", 16]),
]


def _shapes(batch: int, seq: int, past: int) -> dict[str, list[int]]:
    return {
        "input_ids": [batch, seq],
        "attention_mask": [batch, past + seq],
        "position_ids": [batch, seq],
        "past_key_values.0.conv": [batch, 128, 4],
        "past_key_values.1.key": [batch, 2, past, 16],
    }


def test_decoder_gets_prefill_and_decode_profiles() -> None:
    profiles = make_profiles(DECODER_INPUTS, DimRange(1, 16, 128), DimRange(1, 1, 4), max_context=512)
    assert {p["name"] for p in profiles} == {"prefill", "decode"}
    key = {p["name"]: p for p in profiles if p["input"] == "past_key_values.1.key"}
    assert key["prefill"]["min"][2] == 0 and key["prefill"]["max"][2] == 512 - 128
    assert key["decode"]["max"][2] == 511
    ids = {p["name"]: p for p in profiles if p["input"] == "input_ids"}
    assert ids["decode"]["min"] == [1, 1] and ids["decode"]["max"] == [4, 1]
    assert ids["prefill"]["max"] == [4, 128]
    assert not any(p["input"] == "past_key_values.0.conv" and p["axes"] != {"0": "batch"} for p in profiles)

    assert check_in_profile(profiles, _shapes(2, 100, 0)) == 0  # prefill
    assert check_in_profile(profiles, _shapes(2, 16, 300)) == 0  # chunked prefill after a past
    assert check_in_profile(profiles, _shapes(3, 1, 500)) == 1  # decode after a long past
    with pytest.raises(
        MoetrtError, match=r"tokens = 200 is outside the engine's prefill profile 1\.\.128"
    ) as err:
        check_in_profile(profiles, _shapes(1, 200, 0))
    assert "--tokens" in err.value.one_line()
    with pytest.raises(MoetrtError, match="decode profile") as err:
        check_in_profile(profiles, _shapes(1, 1, 600))
    assert "--max-context" in err.value.one_line()
    with pytest.raises(MoetrtError, match="batch = 5"):
        check_in_profile(profiles, _shapes(5, 1, 10))


def test_max_context_below_the_longest_prefill_is_refused() -> None:
    with pytest.raises(MoetrtError, match="--max-context 64 is below the longest prefill"):
        make_profiles(DECODER_INPUTS, DimRange(1, 16, 128), DimRange(1, 1, 4), max_context=64)


def test_unknown_dynamic_dim_of_a_decoder_is_refused() -> None:
    with pytest.raises(MoetrtError, match="dynamic dims"):
        make_profiles(
            [*DECODER_INPUTS, ("extra", ["batch", "mystery"])], DimRange(1, 1, 8), DimRange(1, 1, 1)
        )
