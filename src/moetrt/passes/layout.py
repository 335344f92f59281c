"""Layout expressions: how a canonical MoE weight (spec.py layouts) is made from a model's initializers.

The fusion rule describes each input of the fused node as a small expression over constant values
(transpose, de-interleave, concatenate, reshape). The fusion pass emits it as standard ops, so the fused
model is correct before packing; the packing pass then folds those ops into one packed initializer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True, eq=False)
class Layout:
    kind: str  # source | transpose | slice | concat | reshape | zeros | cast
    source: ir.Value | None = None
    parts: tuple[Layout, ...] = ()
    ints: tuple[int, ...] = ()  # perm | (axis, start, stop, step) | (axis,) | shape
    dtype: ir.DataType | None = None

    def shape(self) -> tuple[int, ...]:
        if self.kind == "source":
            assert self.source is not None and self.source.shape is not None
            return tuple(int(d) for d in self.source.shape)  # type: ignore[arg-type]
        if self.kind == "transpose":
            inner = self.parts[0].shape()
            return tuple(inner[p] for p in self.ints)
        if self.kind == "slice":
            inner = list(self.parts[0].shape())
            axis, start, stop, step = self.ints
            inner[axis] = len(range(start, min(stop, inner[axis]), step))
            return tuple(inner)
        if self.kind == "concat":
            shapes = [p.shape() for p in self.parts]
            axis = self.ints[0]
            out = list(shapes[0])
            out[axis] = sum(s[axis] for s in shapes)
            return tuple(out)
        if self.kind == "cast":
            return self.parts[0].shape()
        return self.ints  # reshape, zeros

    def is_source(self) -> bool:
        return self.kind == "source"


def source(value: ir.Value) -> Layout:
    return Layout("source", source=value)


def transpose(inner: Layout, perm: tuple[int, ...]) -> Layout:
    return Layout("transpose", parts=(inner,), ints=perm)


def take(inner: Layout, axis: int, start: int, stop: int, step: int = 1) -> Layout:
    return Layout("slice", parts=(inner,), ints=(axis, start, stop, step))


def concat(parts: list[Layout], axis: int) -> Layout:
    return parts[0] if len(parts) == 1 else Layout("concat", parts=tuple(parts), ints=(axis,))


def reshape(inner: Layout, shape: tuple[int, ...]) -> Layout:
    return inner if inner.shape() == shape else Layout("reshape", parts=(inner,), ints=shape)


def zeros(shape: tuple[int, ...], dtype: ir.DataType) -> Layout:
    return Layout("zeros", ints=shape, dtype=dtype)


def cast(inner: Layout, dtype: ir.DataType) -> Layout:
    return Layout("cast", parts=(inner,), dtype=dtype)


def deinterleave(inner: Layout, axis: int) -> Layout:
    """[.., 2n (g0 u0 g1 u1 ..), ..] -> [.., 2n (g0 g1 .. u0 u1 ..), ..] along `axis`."""
    size = inner.shape()[axis]
    return concat([take(inner, axis, 0, size, 2), take(inner, axis, 1, size, 2)], axis)


def emit(layout: Layout, prefix: str, nodes: list[ir.Node]) -> ir.Value:
    """Append standard-op nodes computing `layout` to `nodes`; return the resulting value."""
    if layout.kind == "source":
        assert layout.source is not None
        return layout.source
    if layout.kind == "zeros":
        assert layout.dtype is not None
        array = np.zeros(layout.ints, dtype=layout.dtype.numpy())
        node = ir.node("Constant", [], {"value": ir.tensor(array, name=f"{prefix}_zeros")})
        nodes.append(node)
        return _named(node, f"{prefix}_zeros")
    inner = [emit(part, f"{prefix}_{i}", nodes) for i, part in enumerate(layout.parts)]
    if layout.kind == "transpose":
        node = ir.node("Transpose", inner, {"perm": list(layout.ints)})
    elif layout.kind == "slice":
        axis, start, stop, step = layout.ints
        consts = [
            _int_const(v, f"{prefix}_{name}", nodes)
            for v, name in ((start, "start"), (stop, "stop"), (axis, "axis"), (step, "step"))
        ]
        node = ir.node("Slice", [inner[0], *consts])
    elif layout.kind == "concat":
        node = ir.node("Concat", inner, {"axis": layout.ints[0]})
    elif layout.kind == "cast":
        assert layout.dtype is not None
        node = ir.node("Cast", inner, {"to": layout.dtype})
    elif layout.kind == "reshape":
        node = ir.node("Reshape", [inner[0], _int_const(list(layout.ints), f"{prefix}_shape", nodes, 1)])
    else:
        raise ValueError(f"unknown layout kind {layout.kind}")
    nodes.append(node)
    return _named(node, f"{prefix}_{layout.kind}")


def _named(node: ir.Node, name: str) -> ir.Value:
    node.outputs[0].name = name
    return node.outputs[0]


def _int_const(value: int | list[int], name: str, nodes: list[ir.Node], ndim: int = 1) -> ir.Value:
    array = np.asarray(value if ndim == 0 or isinstance(value, list) else [value], dtype=np.int64)
    node = ir.node("Constant", [], {"value": ir.tensor(array, name=name)})
    nodes.append(node)
    return _named(node, name)
