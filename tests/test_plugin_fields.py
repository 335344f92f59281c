"""Plugin fields ↔ attributes / dtype / per-SM cubin blobs: pure round trips, then through TensorRT-RTX's own
PluginFieldCollection (same Python plugin API as tensorrt)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from moetrt.core.errors import MoetrtError
from moetrt.op.presets import PRESETS
from moetrt.op.spec import MoEAttributes
from moetrt.trt.fields import (
    FIELDS_VERSION,
    PluginState,
    attributes_to_fields,
    state_from_fields,
    state_to_fields,
)
from moetrt.trt.plugin import field_arrays, from_field_collection, to_field_collection

VARIANTS = [MoEAttributes(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)] + [
    dataclasses.replace(PRESETS[name], output_router_logits=name == "qwen3_next")
    for name in ("qwen3_next", "deepseek_v3", "gpt_oss_20b")
]


def _float32_rounded(attrs: MoEAttributes) -> MoEAttributes:
    floats = {
        f.name: float(np.float32(getattr(attrs, f.name)))
        for f in dataclasses.fields(attrs)
        if isinstance(getattr(attrs, f.name), float)
    }
    return dataclasses.replace(attrs, **floats)


def _cubin_like(seed: int, size: int) -> bytes:
    # Arbitrary bytes incl. NULs and 0x80+ (int8 negatives): a blob must survive as-is, not as a C string.
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes() + b"\0\xff\x80"


@pytest.mark.parametrize("attrs", VARIANTS, ids=lambda a: f"e{a.num_experts}_{a.scoring}_{a.activation}")
def test_parser_fields_give_back_the_attributes(attrs: MoEAttributes) -> None:
    state = state_from_fields(field_arrays(attributes_to_fields(attrs)))
    # ONNX float attributes are float32, so the parser's fields are too.
    assert state.attrs == _float32_rounded(attrs)
    assert state.dtype is None and state.bundles == {}


@pytest.mark.parametrize("attrs", VARIANTS, ids=lambda a: f"e{a.num_experts}_{a.scoring}_{a.activation}")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_serialized_state_round_trip(attrs: MoEAttributes, dtype: str) -> None:
    bundles = {90: _cubin_like(1, 4096), 100: _cubin_like(2, 777)}
    state = PluginState(attrs, dtype, bundles)
    back = state_from_fields(field_arrays(state_to_fields(state)))
    assert back.attrs == attrs
    # float attributes exact (not rounded through float32)
    assert back.attrs.routed_scaling_factor == attrs.routed_scaling_factor
    assert back.dtype == dtype
    assert back.bundles == bundles
    assert back.bundle_for(90) == bundles[90]


def test_missing_sm_names_the_fix() -> None:
    state = PluginState(VARIANTS[0], "fp16", {90: b"x"})
    with pytest.raises(MoetrtError) as err:
        state.bundle_for(89)
    assert "no kernels for SM 89" in err.value.one_line() and "--target sm_89" in err.value.one_line()


def test_parser_style_fields_int64_and_bytes_strings() -> None:
    # Parsers may hand ints as int64 and strings as raw bytes: both are accepted.
    attrs = VARIANTS[2]
    fields = {}
    for f in dataclasses.fields(attrs):
        value = getattr(attrs, f.name)
        if isinstance(value, str):
            fields[f.name] = value.encode()
        elif isinstance(value, float):
            fields[f.name] = np.array([value], dtype=np.float32)
        else:
            fields[f.name] = np.array([int(value)], dtype=np.int64)
    fields["plugin_version"] = b"1"
    fields["plugin_namespace"] = b"moetrt"
    assert state_from_fields(fields).attrs == _float32_rounded(attrs)


def test_bad_fields_are_one_line_errors() -> None:
    fields = field_arrays(attributes_to_fields(VARIANTS[0]))
    fields["top_k"] = np.array([99], dtype=np.int32)
    with pytest.raises(MoetrtError, match="bad MoE plugin fields"):
        state_from_fields(fields)
    newer = field_arrays(state_to_fields(PluginState(VARIANTS[0], "fp16", {})))
    newer["fields_version"] = np.array([FIELDS_VERSION + 1], dtype=np.int32)
    with pytest.raises(MoetrtError, match="reads up to"):
        state_from_fields(newer)
    bad_dtype = field_arrays(state_to_fields(PluginState(VARIANTS[0], "fp16", {})))
    bad_dtype["io_dtype"] = np.frombuffer(b"int8\0", dtype=np.int8)
    with pytest.raises(MoetrtError, match="io_dtype"):
        state_from_fields(bad_dtype)
    with pytest.raises(ValueError, match="configure the plugin first"):
        state_to_fields(PluginState(VARIANTS[0]))


def test_round_trip_through_tensorrt_plugin_field_collection() -> None:
    trt = pytest.importorskip("tensorrt_rtx_bindings")
    blob = _cubin_like(3, 300_000)
    state = PluginState(VARIANTS[1], "bf16", {90: blob, 120: os.urandom(1000)})
    fields = state_to_fields(state)  # kept alive: PluginField points into these arrays
    collection = to_field_collection(trt, fields)
    kinds = {f.name: f.type for f in collection}
    assert kinds["num_experts"] == trt.PluginFieldType.INT32
    assert kinds["scoring"] == trt.PluginFieldType.CHAR
    assert kinds["kernels_sm90"] == trt.PluginFieldType.INT8
    back = state_from_fields(from_field_collection(collection))
    assert back.attrs == state.attrs and back.dtype == "bf16" and back.bundles == state.bundles


def test_real_cubin_bundle_survives_the_fields() -> None:
    """AOT-compiled cubins (Triton, for SM 9.0, on this CPU machine) through the plugin's serialized fields."""
    pytest.importorskip("triton")
    from moetrt.kernels.aot import KernelBundle
    from moetrt.trt.plugin import compile_kernel_bytes

    attrs = MoEAttributes(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    blob = compile_kernel_bytes(attrs, "fp16", 90)
    back = state_from_fields(field_arrays(state_to_fields(PluginState(attrs, "fp16", {90: blob}))))
    assert back.bundle_for(90) == blob
    bundle = KernelBundle.from_bytes(back.bundle_for(90))
    assert bundle.sm == 90 and bundle.dtype == "float16" and bundle.moe_attributes() == attrs
    assert bundle.kernels and all(k.cubin for k in bundle.kernels.values())
    assert bundle.buckets  # the launch configuration per token bucket travels with the cubins
