"""Find and open what `moetrt build` wrote: `load(path)` -> an Engine (.plan) or a Session (.onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moetrt.core.artifacts import MANIFEST_NAME, ONNX_NAME, PLAN_NAME
from moetrt.core.errors import MoetrtError
from moetrt.core.files import check_input_file

if TYPE_CHECKING:
    from moetrt.runtime.engine import Engine
    from moetrt.runtime.session import Session


def resolve_artifact(path: str | Path, backend: str | None = None) -> Path:
    """The file `load` would run: `path` itself, or a build directory's model.plan (model.onnx when it has no
    plan or `backend="onnxruntime"`)."""
    path = Path(path)
    if path.is_dir():
        plan, onnx_path = path / PLAN_NAME, path / ONNX_NAME
        if backend != "onnxruntime" and plan.is_file():
            return plan
        if onnx_path.is_file():
            return onnx_path
        if plan.is_file():
            raise MoetrtError(
                f"{path} holds {PLAN_NAME} but no {ONNX_NAME} for the onnxruntime backend",
                "run the engine (leave out --backend onnxruntime), or rebuild to get the portable model",
            )
        raise MoetrtError(
            f"{path} holds neither {PLAN_NAME} nor {ONNX_NAME}",
            "point at a directory written by `moetrt build`, or at a file",
        )
    check_input_file(path, "artifact", "pass a .plan, an .onnx, or a `moetrt build` directory")
    if path.suffix == ".plan" and backend == "onnxruntime":
        portable = path.parent / ONNX_NAME
        if not portable.is_file():
            raise MoetrtError(
                f"no {ONNX_NAME} beside {path} for the onnxruntime backend", "pass the .onnx file itself"
            )
        return portable
    return path


def load(path: str | Path, backend: str | None = None) -> Engine | Session:
    """Load `path` for inference: `out = load(p)({"hidden_states": x})` returns {output name: tensor}.

    - `.plan`: a TensorRT / TensorRT-RTX Engine (checked against the manifest.json beside it first);
    - `.onnx`: an onnxruntime Session (CUDA EP with onnxruntime-gpu and a GPU, CPU otherwise);
    - a `moetrt build` directory: its model.plan, or its model.onnx when no engine was built or
      `backend="onnxruntime"`.
    """
    path = resolve_artifact(path, backend)
    if path.suffix == ".plan" and backend != "onnxruntime":
        from moetrt.runtime.engine import Engine

        return Engine(path)
    if path.suffix == ".onnx":
        from moetrt.core.onnx_io import load_onnx
        from moetrt.runtime.session import Session

        check_against_manifest(path)
        load_onnx(path, load_external_data=False)  # a readable graph with its external data present
        return Session(path)
    raise MoetrtError(
        f"cannot tell how to run {path.name}", "pass a .plan, an .onnx, or a `moetrt build` directory"
    )


def check_against_manifest(onnx_path: Path) -> None:
    """An .onnx inside a build directory is checked against its manifest (size and sha256, with its external
    data), as an engine is: a corrupt or replaced file is refused, not run."""
    from moetrt.runtime.manifest import read_manifest, verify_files

    manifest_path = onnx_path.parent / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    manifest = read_manifest(manifest_path)
    listed = {name: entry for name, entry in manifest["files"].items() if name.startswith(onnx_path.name)}
    if onnx_path.name in listed:
        verify_files({**manifest, "files": listed}, onnx_path.parent)
