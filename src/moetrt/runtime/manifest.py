"""manifest.json: what `moetrt build` produced, for whom, from what, and how well it matched PyTorch.

It is also the plan's sidecar: `check_plan` refuses a corrupt or foreign `.plan`, or one built for another SM,
from the manifest alone, before TensorRT is imported.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from moetrt import __version__
from moetrt.core.artifacts import MANIFEST_NAME, ONNX_NAME, PLAN_NAME
from moetrt.core.errors import MoetrtError
from moetrt.core.files import check_input_file, write_text_atomic

FORMAT = "moetrt-manifest"
FORMAT_VERSION = 1
PLAN_MAGIC_BYTES = 4

_REQUIRED = {
    "format": str,
    "format_version": int,
    "moetrt_version": str,
    "created_utc": str,
    "source": str,
    "versions": dict,
    "target": dict,
    "precision": str,
    "engine": dict,
    "profiles": list,
    "fused_ops": dict,
    "files": dict,
    "io": dict,
}
_VERSION_PACKAGES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx-ir",
    "transformers",
    "triton",
    "tensorrt",
    "tensorrt-rtx-cu13-bindings",
)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(
    *,
    source: str,
    target: dict[str, Any],
    precision: str,
    engine: dict[str, Any],
    profiles: list[dict[str, Any]],
    fused_ops: dict[str, int],
    files: dict[str, str | Path],
    io: dict[str, list[dict[str, Any]]],
    parity: dict[str, Any] | None = None,
    build_seconds: dict[str, float] | None = None,
    decoder: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble and validate a manifest; `files` maps artifact name → path (hashed here)."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moetrt_version": __version__,
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "versions": package_versions(),
        "target": target,
        "precision": precision,
        "engine": engine,
        "profiles": profiles,
        "fused_ops": fused_ops,
        "files": {name: file_entry(path) for name, path in sorted(files.items())},
        "io": io,
        "parity": parity,
        "build_seconds": build_seconds or {},
        "decoder": decoder,
        "quantization": quantization,
    }
    validate_manifest(manifest)
    return manifest


def validate_manifest(manifest: Any, where: str = "manifest") -> dict[str, Any]:
    """Check structure and types; raises one MoetrtError naming every problem."""
    if not isinstance(manifest, dict):
        raise MoetrtError(f"{where} is not a JSON object", "rebuild with `moetrt build`")
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
    elif isinstance(manifest.get("format_version"), int) and manifest["format_version"] > FORMAT_VERSION:
        problems.append(f"format_version {manifest['format_version']} is newer than this moetrt reads")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key} missing or not {kind.__name__}")
    target = manifest.get("target")
    if isinstance(target, dict) and not isinstance(target.get("sm"), int):
        problems.append("target.sm missing")
    files = manifest.get("files")
    if isinstance(files, dict):
        for name, entry in files.items():
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and len(entry["sha256"]) == 64
                and isinstance(entry.get("bytes"), int)
            ):
                problems.append(f"files.{name} needs sha256 and bytes")
    engine = manifest.get("engine")
    if isinstance(engine, dict) and engine.get("built") and PLAN_NAME not in (files or {}):
        problems.append(f"engine.built but no {PLAN_NAME} in files")
    if problems:
        raise MoetrtError(f"invalid {where}: " + "; ".join(problems), "rebuild with `moetrt build`")
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    validate_manifest(manifest)
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise MoetrtError(f"no manifest at {path}", "point at a directory written by `moetrt build`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoetrtError(
            f"{path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})",
            "rebuild with `moetrt build`",
        ) from err
    return validate_manifest(data, str(path))


def owned_entries(directory: str | Path) -> set[str] | None:
    """The top-level names a `moetrt build` wrote into `directory` (its manifest and the files it lists), or
    None when the directory holds no valid moetrt manifest: what `build --force` may replace."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(path)
    except MoetrtError:
        return None
    return {MANIFEST_NAME} | {Path(name).parts[0] for name in manifest["files"]}


def verify_files(manifest: dict[str, Any], directory: str | Path) -> None:
    """Every file the manifest lists exists beside it with the recorded size and sha256."""
    directory = Path(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise MoetrtError(f"{path} is missing", "rebuild with `moetrt build`")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise MoetrtError(
                f"{path} does not match its manifest (corrupt or replaced)",
                "rebuild with `moetrt build`, or restore the file that was built with it",
            )


def check_plan(plan_path: str | Path, manifest: dict[str, Any] | None, device_sm: int | None) -> None:
    """Refuse a plan that is not the one its manifest describes, or that was built for another SM.

    Runs before TensorRT is imported, so a wrong file gives one clear line instead of a deserializer crash.
    """
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise MoetrtError(f"{plan_path} does not exist", "build it with `moetrt build MODEL -o OUTDIR`")
    if manifest is None:
        raise MoetrtError(
            f"no {MANIFEST_NAME} beside {plan_path}: moetrt cannot tell what this plan was built for",
            "load a plan from a directory written by `moetrt build`, with its manifest.json",
        )
    entry = manifest["files"].get(plan_path.name)
    engine = manifest["engine"]
    if entry is None or not engine.get("built"):
        raise MoetrtError(f"{plan_path.name} is not listed in its manifest", "rebuild with `moetrt build`")
    head = plan_path.open("rb").read(PLAN_MAGIC_BYTES)
    magic = engine.get("plan_magic")
    if magic is not None and head.hex() != magic:
        raise MoetrtError(
            f"{plan_path} is not a TensorRT plan of the kind its manifest records "
            f"(header {head.hex()}, expected {magic})",
            "rebuild with `moetrt build`",
        )
    if plan_path.stat().st_size != entry["bytes"] or sha256_file(plan_path) != entry["sha256"]:
        raise MoetrtError(
            f"{plan_path} does not match its manifest (corrupt, truncated or replaced)",
            "rebuild with `moetrt build`",
        )
    if device_sm is not None:
        built_for = manifest["target"]["sm"]
        allowed = engine.get("runs_on_sms") or [built_for]
        if device_sm not in allowed:
            raise MoetrtError(
                f"{plan_path.name} was built for SM {built_for} ({manifest['target'].get('name')}), "
                f"this GPU is SM {device_sm}",
                f"rebuild on this GPU with `moetrt build ... --target sm_{device_sm}`",
            )


def token_range(manifest: dict[str, Any], input_name: str = "hidden_states") -> tuple[int, int] | None:
    """(min, max) of the first (token) dim in the profile of `input_name`, or None when it has no profile."""
    for profile in manifest["profiles"]:
        if profile.get("input") == input_name:
            return int(profile["min"][0]), int(profile["max"][0])
    return None


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """What an artifact is, without TensorRT: fused ONNX (MoE nodes, attributes, I/O), build directory
    (manifest + file check), or plan (its sidecar checks)."""
    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path)
        report: dict[str, Any] = {"kind": "build directory", "path": str(path), "manifest": manifest}
        try:
            verify_files(manifest, path)
            report["files_ok"] = True
        except MoetrtError as err:
            report["files_ok"] = False
            report["files_error"] = err.one_line()
        if report["files_ok"] and (path / ONNX_NAME).is_file():  # a corrupt file is reported, not parsed
            report["onnx"] = inspect_onnx(path / ONNX_NAME)
        return report
    check_input_file(path, "artifact", "pass an .onnx, a .plan or a `moetrt build` directory")
    if path.suffix == ".onnx":
        return {"kind": "onnx", "path": str(path), "onnx": inspect_onnx(path)}
    if path.suffix == ".plan":
        beside = path.parent / MANIFEST_NAME
        manifest = read_manifest(beside) if beside.is_file() else None
        check_plan(path, manifest, None)
        assert manifest is not None
        return {
            "kind": "plan",
            "path": str(path),
            "bytes": path.stat().st_size,
            "sha256_ok": True,
            "engine": manifest["engine"],
            "target": manifest["target"],
            "precision": manifest["precision"],
            "profiles": manifest["profiles"],
        }
    raise MoetrtError(f"cannot inspect {path.name}", "pass an .onnx, a .plan or a `moetrt build` directory")


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    import onnx

    from moetrt.core.onnx_io import load_onnx
    from moetrt.op import spec
    from moetrt.op.fused_node import check_fused_model

    model = load_onnx(path, load_external_data=False)
    check_fused_model(model)
    moe_nodes = [n for n in model.graph.node if n.domain == spec.DOMAIN and n.op_type == spec.OP_TYPE]
    variants: dict[str, dict[str, Any]] = {}
    for node in moe_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        key = json.dumps(attrs, sort_keys=True)
        variants.setdefault(key, {"attributes": attrs, "nodes": []})["nodes"].append(node.name)
    initializers = {init.name for init in model.graph.initializer}

    def dims(value: Any) -> list[Any]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim
        ]

    return {
        "moe_nodes": len(moe_nodes),
        "variants": list(variants.values()),
        "functions": len(model.functions),
        "nodes": len(model.graph.node),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "inputs": {v.name: dims(v) for v in model.graph.input if v.name not in initializers},
        "outputs": {v.name: dims(v) for v in model.graph.output},
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def parity_line(parity: dict[str, Any] | None) -> str:
    """The manifest's parity record in one line, saying what was compared (or why nothing was)."""
    if parity is None:
        return "skipped at build time (--no-parity)"
    if not parity.get("checked"):
        return f"not checked: {parity.get('reason', 'no reason recorded')}"
    rows = parity.get("rows") or []
    passed = sum(bool(row.get("passed")) for row in rows)
    verdict = "PASS" if parity.get("passed") else "FAILED"
    worst = parity.get("max_rel_err")
    return (
        f"{verdict} {passed}/{len(rows)} (model.onnx, {parity.get('dtype')}, on {parity.get('backend')} vs "
        f"{parity.get('reference')}; max rel err {worst:.2e}); the engine itself was not run"
        if isinstance(worst, float)
        else f"{verdict} {passed}/{len(rows)}"
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    """`moetrt inspect`'s human-readable view of `inspect_artifact`'s report."""
    lines = [f"{report['kind']}: {report['path']}"]
    manifest = report.get("manifest")
    if manifest:
        engine = manifest["engine"]
        built = (
            f"{engine['backend']} {engine.get('library_version', '')}, MoE as {engine.get('moe_as')}"
            if engine["built"]
            else f"not built ({engine.get('reason')})"
        )
        lines += [
            f"source: {manifest['source']}  precision: {manifest['precision']}  "
            f"target: {manifest['target']['name']} (SM {manifest['target']['sm']})",
            f"engine: {built}",
            "profiles: "
            + "; ".join(
                f"{p['name'] + ' ' if 'name' in p else ''}{p['input']} min {p['min']} opt {p['opt']} max {p['max']}"
                for p in manifest["profiles"]
            ),
            "fused ops: " + ", ".join(f"{k} {v}" for k, v in manifest["fused_ops"].items()),
            "files: "
            + ", ".join(f"{name} ({entry['bytes']} B)" for name, entry in manifest["files"].items())
            + (" — hashes match" if report.get("files_ok") else f" — {report.get('files_error')}"),
        ]
        lines.append(f"parity: {parity_line(manifest.get('parity'))}")
        quantization = manifest.get("quantization")
        if quantization:
            error = quantization.get("error_vs_native") or {}
            measured = f", logits {error['logits']:.2e} from the native weights" if "logits" in error else ""
            lines.append(
                f"experts: {quantization['format']} (block {quantization.get('block')}{', zero points' if quantization.get('zero_point') else ''}){measured}"
            )
        decoder = manifest.get("decoder")
        if decoder:
            kinds = sorted({t["kind"] for t in decoder["state"]})
            lines.append(
                f"decoder: {len(decoder['state'])} state tensors ({', '.join(kinds)}), context up to "
                f"{decoder['max_context']}, {'last-position' if decoder['last_logits'] else 'all'} logits, "
                f"tokenizer: {', '.join(decoder['files']) or 'none'}"
            )
    if report["kind"] == "plan":
        lines += [
            f"plan: {report['bytes']} B, matches its manifest (sha256, header)",
            f"engine: {report['engine']['backend']} for {report['target']['name']} (SM {report['target']['sm']}),"
            f" {report['precision']}",
        ]
    onnx_report = report.get("onnx")
    if onnx_report:
        lines.append(
            f"onnx: {onnx_report['nodes']} nodes, {onnx_report['moe_nodes']} moetrt::MoE, "
            f"opsets {onnx_report['opsets']}, IR {onnx_report['ir_version']}"
        )
        lines.append(f"inputs: {onnx_report['inputs']}  outputs: {onnx_report['outputs']}")
        for variant in onnx_report["variants"]:
            attrs = {
                k: v
                for k, v in variant["attributes"].items()
                if k not in ("plugin_version", "plugin_namespace")
            }
            # ONNX stores float attributes as float32: print them at that precision (1.702, not 1.7020000219...).
            shown = {k: f"{v:.7g}" if isinstance(v, float) else v for k, v in attrs.items()}
            lines.append(f"  MoE x{len(variant['nodes'])}: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    return lines
