"""Run a test module's kernels under Triton's CPU interpreter, in a child process.

TRITON_INTERPRET=1 must be set before Triton is imported, and must not leak into the other test modules of the
same (xdist) worker: each such module runs itself as a script in a child with the variable set, and the child
prints its results as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_in_interpreter(script: str | Path, *args: str, timeout: float = 600) -> Any:
    """The JSON the child `python script *args` printed last; AssertionError with its stderr if it failed."""
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *args],
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"interpreter child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
