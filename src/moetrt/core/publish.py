"""Writing a whole output directory: atomic, exclusive and interrupt-safe.

Everything is written into a hidden staging directory beside OUTDIR; OUTDIR appears only when the caller
publishes, by one rename. Without `force` the rename refuses to land on anything that appeared meanwhile (a
concurrent build). With `force`, only a directory the caller owns (`owned_names` lists every entry it wrote)
is replaced, and only if it is still the one seen at the start. SIGINT and SIGTERM during the write become
`Interrupted`, which removes the staging directory and the parents created for it; an interrupt swallowed
somewhere inside a library (a KeyboardInterrupt raised in a finaliser is printed and dropped by Python) still
stops the publish. Messages name OUTDIR, never the hidden staging path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from moetrt.core.errors import MoetrtError
from moetrt.core.files import check_writable_dir, staging_dir

#: Given an existing directory, the names of its entries the caller wrote there (None: not the caller's).
OwnedNames = Callable[[Path], set[str] | None]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while an output was being written; nothing was published."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class OutputDir:
    """One output directory being written: `staging` is where to write; `publish()` makes it OUTDIR."""

    def __init__(
        self, outdir: str | os.PathLike[str], force: bool, owned_names: OwnedNames, what: str
    ) -> None:
        self.outdir = Path(outdir)
        self.force = force
        self.owned_names = owned_names
        self.what = what  # e.g. "a `moetrt build` directory", for messages
        self._seen: str | None = None  # fingerprint of the directory to replace, taken at the start
        self.staging: Path | None = None
        self._checked = False
        self.interrupted: str | None = None

    # --- checks before any work ------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse, before any heavy work, an OUTDIR that cannot or must not be written."""
        outdir = self.outdir
        if outdir.name in ("", ".", "..") or outdir.resolve() == Path(outdir.anchor):
            raise MoetrtError(
                f"-o {outdir} names no new directory", "give -o a directory name, e.g. -o out/model"
            )
        if outdir.is_symlink():
            raise MoetrtError(
                f"{outdir} is a symbolic link",
                f"pass the directory it points to ({os.path.realpath(outdir)})",
            )
        if outdir.exists() and not outdir.is_dir():
            raise MoetrtError(f"{outdir} exists and is not a directory", "give -o a directory path")
        if outdir.is_dir() and any(outdir.iterdir()):
            if not self.force:
                raise MoetrtError(
                    f"{outdir} is not empty", "choose a new -o directory, or pass --force to replace it"
                )
            self._seen = self._fingerprint_of_owned()
        check_writable_dir(outdir.parent)
        self._checked = True

    def _fingerprint_of_owned(self) -> str:
        owned = self.owned_names(self.outdir)
        if owned is None:
            raise MoetrtError(
                f"{self.outdir} is not {self.what}: --force replaces only such directories",
                "choose a new -o directory, or remove it yourself",
            )
        present = {p.name for p in self.outdir.iterdir()}
        foreign = sorted(present - owned)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise MoetrtError(
                f"{self.outdir} holds files moetrt did not write ({shown}): --force would delete them",
                "move them out of the directory, or choose a new -o directory",
            )
        digest = hashlib.sha256()
        for name in sorted(present):
            stat = (self.outdir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}\n".encode())
        return digest.hexdigest()

    # --- the write ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Create the staging directory (and missing parents), yield it; on any failure or interrupt remove
        both and re-raise, with the staging path replaced by OUTDIR in the message."""
        if not self._checked:
            self.check()
        with staging_dir(self.outdir) as staging:
            self.staging = staging
            try:
                with self._signals_as_interrupts():
                    yield staging
            except MoetrtError as err:
                raise err.naming(str(staging), str(self.outdir)) from None

    def publish(self) -> None:
        """Make the staging directory OUTDIR, or raise (and leave OUTDIR as it was)."""
        assert self.staging is not None, "publish() inside writing()"
        if self.interrupted:
            raise Interrupted(self.interrupted)
        _publishable_modes(self.staging)
        outdir = self.outdir
        if self._seen is None:
            try:
                os.rename(self.staging, outdir)  # atomic; refuses a non-empty OUTDIR that appeared meanwhile
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise MoetrtError(
                        f"{outdir} appeared while this build ran (another build into the same directory?); "
                        "nothing of it was replaced",
                        "run again with a new -o directory",
                    ) from None
                raise MoetrtError(
                    f"cannot create {outdir}: {err.strerror}", "check the directory's permissions"
                ) from None
            return
        if self._fingerprint_of_owned() != self._seen:
            raise MoetrtError(
                f"{outdir} changed while this build ran; it was not replaced",
                "run again once nothing else writes it",
            )
        backup = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
        os.rename(outdir, backup / "previous")
        try:
            os.rename(self.staging, outdir)
        except BaseException:
            os.rename(backup / "previous", outdir)
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)

    # --- helpers -----------------------------------------------------------------------------------------
    def unstaged(self, text: str) -> str:
        """`text` with the hidden staging path replaced by OUTDIR (for messages)."""
        return text.replace(str(self.staging), str(self.outdir)) if self.staging and text else text

    @contextlib.contextmanager
    def _signals_as_interrupts(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.interrupted = signal.Signals(signum).name
            raise Interrupted(self.interrupted)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _publishable_modes(staging: Path) -> None:
    """Temporary files are created private (0700 / 0600); the published output gets the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def interrupt_exit_code(err: Interrupted) -> int:
    """The shell's convention: 128 + the signal number."""
    return 128 + int(getattr(signal.Signals, err.signal_name, signal.SIGINT))


__all__ = ["Interrupted", "OutputDir", "interrupt_exit_code"]
