"""The native launcher library (C++, CUDA driver API; sources in `moetrt/native/`), opened with ctypes.

The same library serves C++ applications and the TensorRT plugin library. Python compiles it once per source
version with the C++ compiler on PATH (as Triton compiles its own launcher stub) into the user cache; the
CUDA header comes from the CUDA toolkit or from Triton's wheel. Parsing a bundle and planning need no GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moetrt.core.errors import MoetrtError

SOURCE_DIR = Path(__file__).resolve().parent.parent / "native"
LIBRARY_NAME = "libmoetrt.so"
ABI_VERSION = 1  # include/moetrt/moetrt.h MOETRT_ABI_VERSION
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden")


def library_sources() -> list[Path]:
    return sorted((SOURCE_DIR / "src").glob("*.cpp"))


def cuda_include_dir() -> Path:
    """A directory holding cuda.h: the CUDA toolkit's (CUDA_HOME, /usr/local/cuda) or Triton's copy."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "include")
    except ImportError:
        pass
    for directory in candidates:
        if (directory / "cuda.h").is_file():
            return directory
    raise MoetrtError(
        "no cuda.h found to compile the native launcher",
        "install the CUDA toolkit or Triton (pip install triton), or set CUDA_HOME",
    )


def _compiler() -> str:
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    raise MoetrtError("no C++ compiler on PATH to build the native launcher", "install g++ (C++17)")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moetrt" / "native"


def build_library(directory: Path | None = None) -> Path:
    """Compile the native library (once per source version and compiler); its path."""
    compiler = _compiler()
    include = cuda_include_dir()
    digest = hashlib.sha256()
    for path in [
        *library_sources(),
        *sorted(SOURCE_DIR.glob("src/*.h")),
        *sorted(SOURCE_DIR.glob("include/**/*.h")),
    ]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join([compiler, *CXX_FLAGS, str(include)]).encode())
    target = (directory or _cache_dir() / digest.hexdigest()[:16]) / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print("moetrt: compiling the native launcher (once per version)...", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [
        compiler,
        *CXX_FLAGS,
        f"-I{SOURCE_DIR / 'include'}",
        f"-I{SOURCE_DIR / 'src'}",
        f"-I{include}",
        *map(str, library_sources()),
        "-o",
        tmp,
        "-ldl",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            raise MoetrtError(
                f"compiling the native launcher failed: {result.stderr.strip().splitlines()[-1:]}",
                "build it with CMake (src/moetrt/native/CMakeLists.txt) to see the full log",
            )
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library(path: str | None = None) -> ctypes.CDLL:
    """The native library (built on first use unless `path` names one, e.g. a CMake build's)."""
    lib = ctypes.CDLL(str(path or build_library()))
    c = ctypes
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "moetrt_abi_version": (c.c_int, []),
        "moetrt_last_error": (c.c_char_p, []),
        "moetrt_last_error_hint": (c.c_char_p, []),
        "moetrt_bundle_parse": (c.c_int, [c.c_void_p, c.c_size_t, c.POINTER(c.c_void_p)]),
        "moetrt_bundle_free": (None, [c.c_void_p]),
        "moetrt_bundle_sm": (c.c_int, [c.c_void_p, c.POINTER(c.c_int64)]),
        "moetrt_bundle_num_inputs": (c.c_int, [c.c_void_p, c.POINTER(c.c_int64)]),
        "moetrt_bundle_num_outputs": (c.c_int, [c.c_void_p, c.POINTER(c.c_int64)]),
        "moetrt_workspace_size": (c.c_int, [c.c_void_p, c.c_int64, c.POINTER(c.c_uint64)]),
        "moetrt_plan_json": (
            c.c_int,
            [c.c_void_p, c.c_int64, c.c_char_p, c.c_size_t, c.POINTER(c.c_size_t)],
        ),
        "moetrt_check_sm": (c.c_int, [c.c_void_p, c.c_int64]),
        "moetrt_launch_slots": (
            c.c_int,
            [
                c.c_void_p,
                c.c_int64,
                c.c_int64,
                c.POINTER(c.c_uint64),
                c.c_size_t,
                c.POINTER(c.c_uint64),
                c.c_size_t,
                c.c_uint64,
                c.c_uint64,
                c.POINTER(c.c_uint64),
                c.c_size_t,
                c.POINTER(c.c_size_t),
            ],
        ),
        "moetrt_launcher_create": (c.c_int, [c.c_void_p, c.POINTER(c.c_void_p)]),
        "moetrt_launcher_free": (None, [c.c_void_p]),
        "moetrt_launcher_enqueue_range": (
            c.c_int,
            [
                c.c_void_p,
                c.c_int64,
                c.POINTER(c.c_uint64),
                c.c_size_t,
                c.POINTER(c.c_uint64),
                c.c_size_t,
                c.c_uint64,
                c.c_void_p,
                c.c_int,
                c.c_int,
            ],
        ),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.moetrt_abi_version() != ABI_VERSION:
        raise MoetrtError(
            f"native launcher ABI {lib.moetrt_abi_version()} is not {ABI_VERSION}",
            "rebuild it from this moetrt version's sources",
        )
    return lib


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status:
        hint = (lib.moetrt_last_error_hint() or b"").decode()
        line = (lib.moetrt_last_error() or b"").decode()
        message = line[: -len(hint) - 2] if hint and line.endswith("; " + hint) else line
        raise MoetrtError(message or f"native launcher error {status}", hint)


class NativeBundle:
    """A parsed kernel bundle: what the native planner launches for T tokens (no GPU needed)."""

    def __init__(self, data: bytes, library_path: str | None = None) -> None:
        self._lib = library(library_path)
        handle = ctypes.c_void_p()
        _check(self._lib, self._lib.moetrt_bundle_parse(data, len(data), ctypes.byref(handle)))
        self._handle = handle

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.moetrt_bundle_free(self._handle)
            self._handle = None

    def _int(self, fn: Any) -> int:
        value = ctypes.c_int64()
        _check(self._lib, fn(self._handle, ctypes.byref(value)))
        return value.value

    @property
    def sm(self) -> int:
        return self._int(self._lib.moetrt_bundle_sm)

    @property
    def num_inputs(self) -> int:
        return self._int(self._lib.moetrt_bundle_num_inputs)

    @property
    def num_outputs(self) -> int:
        return self._int(self._lib.moetrt_bundle_num_outputs)

    def workspace_size(self, num_tokens: int) -> int:
        value = ctypes.c_uint64()
        _check(self._lib, self._lib.moetrt_workspace_size(self._handle, num_tokens, ctypes.byref(value)))
        return value.value

    def plan(self, num_tokens: int) -> dict[str, Any]:
        """The native plan as data: launches (stage, key, grid, pdl, args) and workspace layout."""
        needed = ctypes.c_size_t()
        _check(self._lib, self._lib.moetrt_plan_json(self._handle, num_tokens, None, 0, ctypes.byref(needed)))
        buffer = ctypes.create_string_buffer(needed.value)
        _check(self._lib, self._lib.moetrt_plan_json(self._handle, num_tokens, buffer, needed.value, None))
        return json.loads(buffer.value)

    def check_sm(self, sm: int) -> None:
        """Raises MoetrtError unless the bundle was compiled for `sm`."""
        _check(self._lib, self._lib.moetrt_check_sm(self._handle, sm))

    def launch_slots(
        self,
        num_tokens: int,
        index: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
        state_ptr: int = 0,
    ) -> list[int]:
        """The 8-byte kernel parameter slots of launch `index`, exactly as the launcher hands them to CUDA
        (`state_ptr`: where the launcher's per-stream state would be, plan.STATE_BYTES)."""
        ins, outs = _pointers(input_ptrs), _pointers(output_ptrs)
        count = ctypes.c_size_t()
        args = (
            self._handle,
            num_tokens,
            index,
            ins,
            len(input_ptrs),
            outs,
            len(output_ptrs),
            workspace_ptr,
            state_ptr,
        )
        _check(self._lib, self._lib.moetrt_launch_slots(*args, None, 0, ctypes.byref(count)))
        slots = (ctypes.c_uint64 * max(1, count.value))()
        _check(self._lib, self._lib.moetrt_launch_slots(*args, slots, count.value, None))
        return list(slots[: count.value])


def _pointers(values: Sequence[int]) -> Any:
    return (ctypes.c_uint64 * max(1, len(values)))(*values)


class NativeLauncher:
    """The bundle's cubins loaded into the current CUDA context; enqueues the op on a stream."""

    def __init__(self, bundle: NativeBundle) -> None:
        self.bundle = bundle
        self._lib = bundle._lib
        handle = ctypes.c_void_p()
        _check(self._lib, self._lib.moetrt_launcher_create(bundle._handle, ctypes.byref(handle)))
        self._handle = handle

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.moetrt_launcher_free(self._handle)
            self._handle = None

    def enqueue(
        self,
        num_tokens: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
        stream: int,
        first: int = 0,
        count: int = -1,
    ) -> None:
        """Launch the plan's launches [first, first + count) (all by default) for `num_tokens` on `stream`."""
        ins, outs = _pointers(input_ptrs), _pointers(output_ptrs)
        status = self._lib.moetrt_launcher_enqueue_range(
            self._handle,
            num_tokens,
            ins,
            len(input_ptrs),
            outs,
            len(output_ptrs),
            workspace_ptr,
            stream or None,
            first,
            count,
        )
        _check(self._lib, status)
