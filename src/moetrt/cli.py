"""The `moetrt` command line: each command is a thin wrapper over one public function.

Heavy imports (torch, onnx, transformers) happen inside the commands so `moetrt --help` is instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from moetrt import __version__
from moetrt.errors import MoetrtError


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MoetrtError into one line on stderr and exit code 1 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MoetrtError as err:
            click.echo(f"error: {err.one_line()}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moetrt")
def main() -> None:
    """moetrt: fuse Mixture-of-Experts blocks into one op and build TensorRT engines.

    MODEL is a built-in demo (`demo:qwen3_next`, `demo:mixtral:block`, ...), a local Hugging Face model
    directory (config.json + safetensors), or `module:path/to/file.py:factory`.
    """


# --- export / verify (Foundation) ---

# --- fuse (graph_passes) ---

# --- kernels: tune / aot ---

# --- build / run / inspect (TensorRT plugin and runtime) ---


if __name__ == "__main__":
    main()
