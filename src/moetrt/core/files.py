"""Files in and out: the one check of an input file, of an output path, and atomic writes (a reader never sees
a half-written artifact; a failure leaves nothing behind and no directory it created)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moetrt.core.errors import MoetrtError


def check_input_file(path: str | os.PathLike[str], what: str = "file", hint: str = "") -> Path:
    """`path` as a readable, non-empty regular file, or a one-line MoetrtError saying what it is instead."""
    path = Path(path)
    hint = hint or f"pass the path of an existing {what}"
    if not path.exists():
        raise MoetrtError(f"{path} does not exist", hint)
    if path.is_dir():
        raise MoetrtError(f"{path} is a directory, not a {what}", hint)
    if not stat.S_ISREG(path.stat().st_mode):
        raise MoetrtError(f"{path} is not a regular file (a device, pipe or socket)", hint)
    if not os.access(path, os.R_OK):
        raise MoetrtError(f"cannot read {path} (permission denied)", "check the file's permissions")
    if path.stat().st_size == 0:
        raise MoetrtError(f"{path} is empty (0 bytes)", hint)
    return path


def check_output_file(path: str | os.PathLike[str], suffix: str = "") -> Path:
    """Refuse, before any work, an output path that names a directory, has the wrong suffix or cannot be
    written (the nearest existing parent directory must be writable)."""
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise MoetrtError(f"output {path} does not end in {suffix}", f"name the output file *{suffix}")
    if path.is_dir():
        raise MoetrtError(
            f"output {path} is a directory", f"give a file name ending in {suffix or 'a suffix'}"
        )
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise MoetrtError(f"output {path} is not a regular file", "choose a file path")
    check_writable_dir(path.parent)
    return path


def check_writable_dir(directory: str | os.PathLike[str]) -> None:
    """The nearest existing ancestor of `directory` takes a new file (probed with a real temporary file, since
    permission bits say nothing for root or read-only mounts)."""
    parent = Path(directory)
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoetrtError(f"{parent} is not a directory", "choose an output path under a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moetrt-probe-", dir=parent)
    except OSError as err:
        raise MoetrtError(
            f"cannot write into {parent}: {err.strerror}", "choose a writable output path"
        ) from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    created = make_parents(final.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix or ".tmp", dir=final.parent)
    except OSError as err:
        remove_dirs(created)
        raise MoetrtError(f"cannot write {final}: {err.strerror}", "choose a writable output path") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        remove_dirs(created)
        raise


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden temporary directory beside `final` (its missing parents created), removed on exit together
    with the parents it created when `final` did not come to exist. Write there, then move into `final`."""
    final = Path(final)
    created = make_parents(final.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as err:
        remove_dirs(created)
        raise MoetrtError(
            f"cannot write into {final.parent}: {err.strerror}", "choose a writable output path"
        ) from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not final.exists():
            remove_dirs(created)


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(final: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(final, text.encode())


def make_parents(directory: Path) -> list[Path]:
    """Create the missing parents of an output; return them (outermost first) so a failure can remove them."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as err:
            remove_dirs(created)
            raise MoetrtError(
                f"cannot create {path}: {err.strerror}", "choose a writable output path"
            ) from None
        created.append(path)
    return created


def remove_dirs(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir()
