"""The files the native test programs read and write (src/moetrt/native/tests/io_files.h has the layout)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

FIELD_TYPES = ("int32", "float32", "char", "int8")


def write_fields(path: Path, fields: dict[str, tuple[np.ndarray, str]]) -> None:
    """trt/fields.py `Fields` (name -> (array, kind)) as a fields file."""
    out = bytearray(struct.pack("<I", len(fields)))
    for name, (array, kind) in fields.items():
        data = np.ascontiguousarray(array).tobytes()
        out += struct.pack("<I", len(name)) + name.encode()
        out += struct.pack("<iiQ", FIELD_TYPES.index(kind), int(np.asarray(array).size), len(data)) + data
    path.write_bytes(bytes(out))


def read_fields(path: Path) -> list[tuple[str, str, int, bytes]]:
    """(name, kind, length, bytes) of each field, in file order."""
    data = path.read_bytes()
    (count,), at = struct.unpack_from("<I", data), 4
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, at)
        name = data[at + 4 : at + 4 + n].decode()
        at += 4 + n
        kind, length, size = struct.unpack_from("<iiQ", data, at)
        at += 16
        out.append((name, FIELD_TYPES[kind], length, data[at : at + size]))
        at += size
    return out


def write_tensors(path: Path, tensors: list[tuple[str, tuple[int, ...], bytes]]) -> None:
    """(dtype name, dims, raw bytes) of each tensor."""
    out = bytearray(struct.pack("<I", len(tensors)))
    for dtype, dims, data in tensors:
        out += struct.pack("<I", len(dtype)) + dtype.encode() + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<Q", len(data)) + data
    path.write_bytes(bytes(out))


def read_tensors(path: Path) -> list[tuple[str, tuple[int, ...], bytes]]:
    data = path.read_bytes()
    (count,), at = struct.unpack_from("<I", data), 4
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, at)
        dtype = data[at + 4 : at + 4 + n].decode()
        at += 4 + n
        (rank,) = struct.unpack_from("<I", data, at)
        dims = struct.unpack_from(f"<{rank}q", data, at + 4)
        at += 4 + 8 * rank
        (size,) = struct.unpack_from("<Q", data, at)
        out.append((dtype, tuple(dims), data[at + 8 : at + 8 + size]))
        at += 8 + size
    return out
