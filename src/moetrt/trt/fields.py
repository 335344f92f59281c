"""Plugin fields ↔ (MoE attributes, I/O dtype, per-SM kernel bundles): pure functions, no TensorRT import.

Two kinds of field collections reach the plugin creator:
  * from the ONNX parser (build phase): the node's attributes, ints as INT32/INT64 arrays, floats as FLOAT32,
    strings as CHAR; `plugin_version` / `plugin_namespace` are the parser's and are ignored here;
  * from a serialized engine (runtime phase): what `state_to_fields` wrote — the attributes, the I/O dtype and
    one opaque blob per SM holding that SM's cubins and launch configs (`KernelBundle.to_bytes()`).
A field is modelled as ``(numpy array, kind)`` with kind one of ``"int32" | "float32" | "char" | "int8"``; the
TensorRT glue maps kinds to `trt.PluginFieldType` and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moetrt.core import dtypes
from moetrt.core.errors import MoetrtError
from moetrt.op.spec import MoEAttributes

FIELDS_VERSION = 1
IO_DTYPES = dtypes.NAMES
KERNELS_PREFIX = "kernels_sm"

FieldKind = str
Fields = dict[str, tuple[np.ndarray, FieldKind]]


@dataclass
class PluginState:
    """Everything one plugin instance needs: the op's attributes, its I/O dtype once known, and cubins per SM."""

    attrs: MoEAttributes
    dtype: str | None = None
    bundles: dict[int, bytes] = field(default_factory=dict)

    def bundle_for(self, sm: int) -> bytes:
        if sm not in self.bundles:
            have = ", ".join(f"sm_{s}" for s in sorted(self.bundles)) or "none"
            raise MoetrtError(
                f"the engine's MoE plugin carries no kernels for SM {sm} (it has {have})",
                f"rebuild the engine with `moetrt build ... --target sm_{sm}` on this GPU",
            )
        return self.bundles[sm]


def attributes_to_fields(attrs: MoEAttributes) -> Fields:
    """The attributes as the ONNX parser would hand them over (bools as int32)."""
    out: Fields = {}
    for f in dataclasses.fields(attrs):
        value = getattr(attrs, f.name)
        if isinstance(value, bool | int):
            out[f.name] = (np.array([int(value)], dtype=np.int32), "int32")
        elif isinstance(value, float):
            out[f.name] = (np.array([value], dtype=np.float32), "float32")
        else:
            out[f.name] = (_char(str(value)), "char")
    return out


def state_to_fields(state: PluginState) -> Fields:
    """What the plugin serializes into the engine (`get_fields_to_serialize`)."""
    if state.dtype not in IO_DTYPES:
        raise ValueError(
            f"plugin state has no I/O dtype yet (got {state.dtype!r}); configure the plugin first"
        )
    out = attributes_to_fields(state.attrs)
    # float32 would round the scaling factor / SwiGLU constants: carry them exactly as float64 bits in int8 too.
    out["float_attrs_f64"] = (float64_blob(state.attrs), "int8")
    out["fields_version"] = (np.array([FIELDS_VERSION], dtype=np.int32), "int32")
    out["io_dtype"] = (_char(state.dtype), "char")
    for sm, blob in sorted(state.bundles.items()):
        out[f"{KERNELS_PREFIX}{sm}"] = (np.frombuffer(blob, dtype=np.int8).copy(), "int8")
    return out


def state_from_fields(fields: Mapping[str, Any]) -> PluginState:
    """Inverse of `state_to_fields`; also accepts the parser's attribute-only collection (dtype, bundles empty).

    `fields` maps name → array-like (numpy array, bytes or str), as read off a `PluginFieldCollection`.
    """
    raw: dict[str, Any] = {}
    for name, data in fields.items():
        if name in ("plugin_version", "plugin_namespace"):
            continue
        raw[name] = data
    version = int(_scalar(raw.pop("fields_version", [FIELDS_VERSION])))
    if version > FIELDS_VERSION:
        raise MoetrtError(
            f"the engine's MoE plugin fields are version {version}, this moetrt reads up to {FIELDS_VERSION}",
            "upgrade moetrt or rebuild the engine with this version",
        )
    dtype_field = raw.pop("io_dtype", None)
    dtype = _text(dtype_field) if dtype_field is not None else None
    if dtype is not None and dtype not in IO_DTYPES:
        raise MoetrtError(f"MoE plugin field io_dtype is {dtype!r}", f"expected one of {IO_DTYPES}; rebuild")
    bundles = {
        int(name[len(KERNELS_PREFIX) :]): _blob(data)
        for name, data in raw.items()
        if name.startswith(KERNELS_PREFIX)
    }
    f64 = raw.pop("float_attrs_f64", None)
    exact_floats = _float64_from_blob(_blob(f64)) if f64 is not None else {}

    kinds = {f.name: f.type for f in dataclasses.fields(MoEAttributes)}
    values: dict[str, Any] = {}
    for name, data in raw.items():
        if name not in kinds:
            continue
        kind = kinds[name]
        if kind in ("str", str):
            values[name] = _text(data)
        elif kind in ("float", float):
            values[name] = exact_floats.get(name, float(_scalar(data)))
        else:
            values[name] = int(_scalar(data))
    try:
        attrs = MoEAttributes.from_onnx_attributes(values)
    except (TypeError, ValueError) as err:
        raise MoetrtError(f"bad MoE plugin fields: {err}", "re-fuse the model with `moetrt fuse`") from err
    return PluginState(attrs=attrs, dtype=dtype, bundles=bundles)


def _char(text: str) -> np.ndarray:
    # TensorRT CHAR fields are NUL-terminated C strings.
    return np.frombuffer(text.encode() + b"\0", dtype=np.int8).copy()


def _text(data: Any) -> str:
    if isinstance(data, str):
        return data.rstrip("\0")
    return _blob(data).split(b"\0", 1)[0].decode()


def _blob(data: Any) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return np.ascontiguousarray(np.asarray(data)).tobytes()


def _scalar(data: Any) -> float:
    arr = np.asarray(data).reshape(-1)
    if arr.size != 1:
        raise MoetrtError(f"expected one value in a MoE plugin field, got {arr.size}", "re-fuse the model")
    return arr[0].item()


def _float_names() -> list[str]:
    return [f.name for f in dataclasses.fields(MoEAttributes) if f.type in ("float", float)]


def float64_blob(attrs: MoEAttributes) -> np.ndarray:
    """The float attributes as float64 bytes (INT8), in `MoEAttributes` order: exact where FLOAT32 rounds."""
    values = np.array([getattr(attrs, name) for name in _float_names()], dtype=np.float64)
    return np.frombuffer(values.tobytes(), dtype=np.int8).copy()


def _float64_from_blob(blob: bytes) -> dict[str, float]:
    values = np.frombuffer(blob, dtype=np.float64)
    names = _float_names()
    if len(values) != len(names):
        raise MoetrtError("MoE plugin field float_attrs_f64 has the wrong size", "rebuild the engine")
    return {name: float(v) for name, v in zip(names, values)}
