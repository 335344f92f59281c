"""The bad and edge inputs a new user tried, each through the CLI: one line that says what to do, a non-zero exit,
no traceback, nothing half-written and no user file touched. Signals and concurrent builds run as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from conftest import SMALL_SHARED, FusedBlockWriter, assert_one_line_error, invoke, leftovers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrt.op.fused_node import fused_nodes
from moetrt.runtime.manifest import read_manifest, verify_files

RTX = ("--engine-backend", "tensorrt-rtx")
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moetrt.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}


def _built(tmp_path: Path, fused_block: FusedBlockWriter, name: str = "out", *extra: str) -> Path:
    out = tmp_path / name
    code, _, err = invoke("build", str(fused_block("fp32")), "-o", str(out), *RTX, "--no-parity", *extra)
    assert code == 0, err
    return out


# --- 1. --force replaces only what moetrt wrote ---------------------------------------------------------------
def test_force_refuses_a_directory_moetrt_did_not_write(
    tmp_path: Path, fused_block: FusedBlockWriter
) -> None:
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text("{}")
    (webapp / "index.html").write_text("hi")
    code, _, err = invoke("build", str(fused_block("fp32")), "-o", str(webapp), "--force", *RTX)
    assert_one_line_error(code, err, "is not a `moetrt build` directory")
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]
    assert (webapp / "index.html").read_text() == "hi" and not leftovers(tmp_path, "webapp")


def test_force_keeps_files_a_user_added_to_a_build(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = _built(tmp_path, fused_block)
    (out / "notes.txt").write_text("mine")
    code, _, err = invoke("build", str(fused_block("fp32")), "-o", str(out), "--force", *RTX, "--no-parity")
    assert_one_line_error(code, err, "notes.txt", "--force would delete them")
    assert (out / "notes.txt").read_text() == "mine"
    verify_files(read_manifest(out), out)  # the earlier build is intact


def test_force_replaces_an_earlier_build(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = _built(tmp_path, fused_block)
    first = read_manifest(out)["created_utc"]
    _built(tmp_path, fused_block, "out", "--force")
    assert read_manifest(out)["created_utc"] >= first and not leftovers(tmp_path, "out")


def test_a_symlinked_outdir_is_refused(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    real = _built(tmp_path, fused_block, "real")
    (tmp_path / "link").symlink_to(real)
    code, _, err = invoke("build", str(fused_block("fp32")), "-o", str(tmp_path / "link"), "--force", *RTX)
    assert_one_line_error(code, err, "is a symbolic link")
    assert not leftovers(tmp_path, "link") and not leftovers(tmp_path, "real")


# --- 2. two builds into one OUTDIR -----------------------------------------------------------------------------
def test_concurrent_builds_never_replace_each_other(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = tmp_path / "out"
    sources = [fused_block("fp32"), fused_block("fp16")]
    procs = [
        subprocess.Popen(
            _cli("build", str(src), "-o", str(out), *RTX, "--no-parity"),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in sources
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "appeared while this build ran" in loser or "is not empty" in loser, loser
    manifest = read_manifest(out)
    verify_files(manifest, out)  # the winner's build, whole
    assert not leftovers(tmp_path, "out")


# --- 3. interrupts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sig", "codes"), [(signal.SIGINT, {130, 1}), (signal.SIGTERM, {143, -signal.SIGTERM})]
)
def test_an_interrupted_build_leaves_nothing(tmp_path: Path, sig: signal.Signals, codes: set[int]) -> None:
    out = tmp_path / "new" / "out"
    proc = subprocess.Popen(
        _cli("build", "demo:qwen3_next", "-o", str(out), *RTX),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "new").exists():
        time.sleep(0.05)  # the staging directory exists: the build is writing
    time.sleep(1.0)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert code in codes, (code, err)
    assert not (tmp_path / "new").exists(), list(tmp_path.rglob("*"))  # no OUTDIR, staging or parent left


# --- 4. no silent success ----------------------------------------------------------------------------------------
def test_failed_parity_is_a_non_zero_exit_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moetrt.verify import model as verify_model

    monkeypatch.setattr(verify_model, "TOLERANCES", {"fp32": 1e-12, "fp16": 1e-12, "bf16": 1e-12})
    source = "demo:mixtral:block"  # names its PyTorch source, so parity runs (and fails at a 1e-12 tolerance)
    code, _, err = invoke("build", source, "-o", str(tmp_path / "a"), *RTX, "--precision", "fp32")
    assert_one_line_error(code, err, "parity FAILED", "--allow-parity-failure")
    assert read_manifest(tmp_path / "a")["parity"]["passed"] is False  # recorded, published
    code, _, err = invoke(
        "build", source, "-o", str(tmp_path / "b"), *RTX, "--precision", "fp32", "--allow-parity-failure"
    )
    assert code == 0, err
    assert read_manifest(tmp_path / "b")["parity"]["passed"] is False


def test_checkpoint_without_expert_weights_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moetrt.export.demo_models import demo_config

    model_dir = tmp_path / "hf"
    AutoModelForCausalLM.from_config(demo_config("mixtral", 2)).save_pretrained(model_dir)
    state = {}
    for shard in model_dir.glob("*.safetensors"):
        state.update(load_file(shard))
        shard.unlink()
    save_file({k: v for k, v in state.items() if "experts" not in k}, model_dir / "model.safetensors")
    code, _, err = invoke("export", str(model_dir), "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "does not match its config.json", "missing keys", "experts")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", ["fuse", "inspect", "build", "verify"])
def test_an_empty_onnx_file_is_refused(tmp_path: Path, command: str) -> None:
    empty = tmp_path / "z.onnx"
    empty.write_bytes(b"")
    args = {"fuse": ["-o", str(tmp_path / "o.onnx")], "build": ["-o", str(tmp_path / "o"), *RTX]}.get(
        command, []
    )
    code, _, err = invoke(command, str(empty), *args)
    assert_one_line_error(code, err, "is empty (0 bytes)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.onnx"]


def _without_function_bodies(tmp_path: Path, fused_block: FusedBlockWriter) -> Path:
    model = onnx.load(str(fused_block("fp32")))
    model.ClearField("functions")
    path = tmp_path / "bare.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["fuse", "{src}", "-o", "{tmp}/o.onnx", "--decompose"],
        ["fuse", "{src}", "-o", "{tmp}/o.onnx"],
        ["build", "{src}", "-o", "{tmp}/o", *RTX],
        ["verify", "{src}"],
        ["inspect", "{src}"],
    ],
)
def test_fused_nodes_without_function_bodies_are_refused(
    tmp_path: Path, fused_block: FusedBlockWriter, args: list[str]
) -> None:
    src = _without_function_bodies(tmp_path, fused_block)
    code, _, err = invoke(*(a.format(src=src, tmp=tmp_path) for a in args))
    assert_one_line_error(code, err, "has no function body")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o").exists()


# --- 5. invalid op attributes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"num_experts": 8, "top_k": 2, "hidden_size": -64, "intermediate_size": 0}, "hidden_size -64"),
        ({"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 32, "colour": 1}, "unknown"),
        ({"num_experts": 8, "top_k": 9, "hidden_size": 64, "intermediate_size": 32}, "top_k 9 outside"),
        ({"num_experts": 8}, "missing MoE attribute"),
    ],
)
def test_aot_refuses_invalid_attributes(tmp_path: Path, attrs: dict[str, object], message: str) -> None:
    out = tmp_path / "k.bin"
    code, _, err = invoke("aot", "--attrs", json.dumps(attrs), "--sm", "90", "-o", str(out))
    assert_one_line_error(code, err, message)
    assert not out.exists()


def _edited(tmp_path: Path, fused_block: FusedBlockWriter, edit: str) -> Path:
    model = onnx.load(str(fused_block("fp32")))
    node = fused_nodes(model)[0]
    if edit == "top_k":
        next(a for a in node.attribute if a.name == "top_k").i = 16
    else:
        node.input.pop()
    path = tmp_path / f"edited_{edit}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("edit", "message"), [("top_k", "top_k 16 outside"), ("input", "inputs; its attributes")]
)
@pytest.mark.parametrize("command", ["verify", "build", "fuse", "inspect"])
def test_edited_fused_nodes_are_refused(
    tmp_path: Path, fused_block: FusedBlockWriter, edit: str, message: str, command: str
) -> None:
    src = _edited(tmp_path, fused_block, edit)
    args = {"fuse": ["-o", str(tmp_path / "o.onnx")], "build": ["-o", str(tmp_path / "o"), *RTX]}.get(
        command, []
    )
    code, _, err = invoke(command, str(src), *args)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o").exists()


_FIELDS = st.sampled_from(
    [
        "num_experts",
        "top_k",
        "hidden_size",
        "intermediate_size",
        "n_group",
        "topk_group",
        "shared_intermediate_size",
        "routed_scaling_factor",
        "swiglu_limit",
        "scoring",
        "activation",
        "has_shared_gate",
        "colour",
    ]
)
_BAD_VALUES = st.one_of(
    st.integers(-(10**6), 0), st.just(float("nan")), st.just(float("inf")), st.just("sparse"), st.just(3)
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=_FIELDS, value=_BAD_VALUES)
def test_random_invalid_attributes_are_refused_everywhere(
    tmp_path: Path, fused_block: FusedBlockWriter, field: str, value: object
) -> None:
    from moetrt.op.spec import MoEAttributes

    attrs = {**SMALL_SHARED.to_onnx_attributes(), field: value}
    attrs.pop("plugin_version"), attrs.pop("plugin_namespace")
    try:
        MoEAttributes.from_onnx_attributes(attrs)
    except ValueError:
        pass
    else:  # e.g. top_k 3 is valid: nothing to refuse
        return
    out = tmp_path / "k.bin"
    code, _, err = invoke("aot", "--attrs", json.dumps(attrs), "--sm", "90", "-o", str(out))
    assert_one_line_error(code, err)
    assert not out.exists()
    # the same attributes written onto a fused node: fuse and build refuse the file
    model = onnx.load(str(fused_block("fp32")))
    node = fused_nodes(model)[0]
    del node.attribute[:]
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    for args in (
        ["fuse", str(bad), "-o", str(tmp_path / "o.onnx")],
        ["build", str(bad), "-o", str(tmp_path / "o"), *RTX],
    ):
        code, _, err = invoke(*args)
        assert_one_line_error(code, err, "fused MoE node")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o").exists()


# --- 6. one line instead of a traceback --------------------------------------------------------------------------
@pytest.mark.parametrize("outdir", [".", "/"])
def test_build_into_dot_is_refused_before_work(fused_block: FusedBlockWriter, outdir: str) -> None:
    code, _, err = invoke("build", str(fused_block("fp32")), "-o", outdir, *RTX)
    assert_one_line_error(code, err, "names no new directory")


@pytest.mark.parametrize("command", ["build", "aot", "export"])
def test_unwritable_outputs_are_refused_before_work(command: str) -> None:
    target = {
        "build": ["demo:mixtral:block", "-o", "/proc/moetrt-test/out", *RTX],
        "aot": ["--preset", "mixtral", "--sm", "90", "-o", "/proc/moetrt-test/k.bin"],
        "export": ["demo:mixtral", "-o", "/proc/moetrt-test/m.onnx"],
    }[command]
    code, _, err = invoke(command, *target)
    assert_one_line_error(code, err, "cannot write into /proc")


def test_module_whose_forward_returns_none(tmp_path: Path) -> None:
    source = tmp_path / "none_model.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear(8, 8)\n\n"
        "    def forward(self, x):\n        self.l(x)\n\n\n"
        "def factory():\n    return M(), (torch.randn(2, 3, 8),)\n"
    )
    code, _, err = invoke("export", f"module:{source}:factory", "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "returns NoneType, not a tensor")


# --- 7. leftovers and honest messages ----------------------------------------------------------------------------
def test_a_failed_build_leaves_no_parent_directories(tmp_path: Path) -> None:
    code, _, err = invoke("build", "demo:nope", "-o", str(tmp_path / "new" / "sub" / "out"), *RTX)
    assert code == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_inspect_of_a_corrupt_build_fails_and_says_so_last(
    tmp_path: Path, fused_block: FusedBlockWriter
) -> None:
    out = _built(tmp_path, fused_block)
    with open(out / "model.onnx", "ab") as fh:
        fh.write(b"x")
    code, _, err = invoke("inspect", str(out))
    assert_one_line_error(code, err, "does not match its manifest")
    assert "model.onnx" in err


def test_missing_external_data_names_the_file(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    model = onnx.load(str(fused_block("fp32")))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    code, _, err = invoke("fuse", str(path), "-o", str(tmp_path / "o.onnx"))
    assert_one_line_error(code, err, str(tmp_path / "ext.onnx.data"), "is missing")


def test_onnxruntime_path_checks_the_manifest_hash(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = _built(tmp_path, fused_block)
    model = onnx.load(str(out / "model.onnx"))
    model.doc_string = "replaced"
    onnx.save(model, str(out / "model.onnx"))
    code, _, err = invoke("run", str(out), "--backend", "onnxruntime", "--tokens", "4")
    assert_one_line_error(code, err, "does not match its manifest")


def test_plan_only_directory_says_what_it_holds(tmp_path: Path, fused_block: FusedBlockWriter) -> None:
    out = _built(tmp_path, fused_block)
    (out / "model.onnx").unlink()
    code, _, err = invoke("run", str(out), "--backend", "onnxruntime")
    assert_one_line_error(code, err, "holds model.plan but no model.onnx")


def test_verify_takes_a_build_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = invoke(
        "build", "demo:mixtral:block", "-o", str(out), *RTX, "--precision", "fp32", "--no-parity"
    )
    assert code == 0, err
    code, stdout, err = invoke("verify", str(out))
    assert code == 0, err
    assert "PASS" in stdout.splitlines()[-1]


@pytest.mark.parametrize("command", ["inspect", "run", "fuse"])
def test_a_device_file_is_not_called_missing(tmp_path: Path, command: str) -> None:
    args = ["-o", str(tmp_path / "o.onnx")] if command == "fuse" else []
    code, _, err = invoke(command, "/dev/null", *args)
    assert_one_line_error(code, err, "is not a regular file")


def test_token_ranges_beyond_int32_are_refused(fused_block: FusedBlockWriter, tmp_path: Path) -> None:
    code, _, err = invoke(
        "build", str(fused_block("fp32")), "-o", str(tmp_path / "o"), *RTX, "--tokens", "1:1:99999999999"
    )
    assert_one_line_error(code, err, "--tokens", "2147483647")


# --- 8. usability ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["build", "demo:mixtral:block", "-o", "{tmp}/o", "--target", "h900"],
        ["build", "demo:mixtral:block", "-o", "{tmp}/o", "--tokens", "9:1:2"],
        ["build", "demo:mixtral:block", "-o", "."],
        ["fuse", "{tmp}/missing.onnx", "-o", "{tmp}/o.onnx"],
        ["export", "demo:mixtral", "-o", "/proc/moetrt-test/m.onnx"],
        ["inspect", "/dev/null"],
    ],
)
def test_argument_errors_come_before_heavy_imports(tmp_path: Path, args: list[str]) -> None:
    argv = [a.format(tmp=tmp_path) for a in args]
    probe = (
        "import sys\nfrom moetrt.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'onnx_ir') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert "HEAVY [] CODE 1" in result.stdout, (result.stdout, result.stderr)


def test_export_then_build_with_defaults_agree(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    code, _, err = invoke("export", "demo:mixtral:block", "-o", str(model))
    assert code == 0, err
    code, _, err = invoke("build", str(model), "-o", str(tmp_path / "out"), "--no-parity", "--target", "a100")
    assert code == 0, err
    assert read_manifest(tmp_path / "out")["precision"] == "fp32"


def test_fuse_reports_progress_on_stderr(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    assert invoke("export", "demo:mixtral:block", "-o", str(model))[0] == 0
    code, stdout, err = invoke("fuse", str(model), "-o", str(tmp_path / "f.onnx"))
    assert code == 0 and "reading" in err and "writing" in err and "wrote" in stdout


def test_staging_names_never_reach_messages(
    tmp_path: Path, fused_block: FusedBlockWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moetrt import build as build_module
    from moetrt.core.errors import MoetrtError

    def failing(_model: str, path: Path, **_kwargs: object) -> None:
        raise MoetrtError(f"cannot write {path}: disk full", "free some space")

    monkeypatch.setattr("moetrt.export.onnx_export.export_onnx", failing)
    assert build_module  # the build imports export_onnx from its module at call time
    out = tmp_path / "out"
    code, _, err = invoke("build", "demo:mixtral:block", "-o", str(out), *RTX)
    assert_one_line_error(code, err, "disk full", str(out))
    assert f"/.{out.name}." not in err


def test_run_options_have_help() -> None:
    code, stdout, _ = invoke("run", "--help")
    assert code == 0
    for text in (
        "Batch of [batch, seq] inputs",
        "Sequence length of [batch, seq]",
        "Seed of the random inputs",
    ):
        assert text in " ".join(stdout.split()), text


def test_aot_takes_both_dtype_spellings_and_refuses_others(tmp_path: Path) -> None:
    from moetrt.kernels.aot import KernelBundle

    small = json.dumps({"num_experts": 4, "top_k": 2, "hidden_size": 32, "intermediate_size": 16})
    for spelling in ("bf16", "bfloat16"):
        out = tmp_path / f"{spelling}.bin"
        code, _, err = invoke("aot", "--attrs", small, "--dtype", spelling, "--sm", "90", "-o", str(out))
        assert code == 0, err
        assert KernelBundle.from_bytes(out.read_bytes()).dtype == "bfloat16"  # the bundle's stored name
    code, _, err = invoke(
        "aot", "--attrs", small, "--dtype", "int8", "--sm", "90", "-o", str(tmp_path / "x.bin")
    )
    assert code == 2 and "unsupported dtype 'int8'" in err and not (tmp_path / "x.bin").exists()
