"""The native library as C++ users build it (CMake), and its C++ tests: JSON reader, damaged bundles, the planner
against plan.py, the plugin's field round trip against trt/fields.py and its rules against trt/io_rules.py.

The TensorRT plugin library itself needs TensorRT's headers (-DTensorRT_ROOT): not on this machine's package
index, so CI builds and tests the header-independent part; the plugin is compiled and driven on the GPU machine
(tests/gpu/test_native_plugin.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from moetrt_testing import native_files
from moetrt_testing.planning_bundles import EVERY_OPTION, planning_bundle

from moetrt.kernels import plan
from moetrt.kernels.launcher import plan_from_native
from moetrt.kernels.native import SOURCE_DIR, NativeBundle, cuda_include_dir
from moetrt.op.spec import INT4, MoEAttributes
from moetrt.trt import io_rules
from moetrt.trt.fields import PluginState, state_to_fields

FULL = dataclasses.replace(EVERY_OPTION, routed_scaling_factor=2.5)
QUANTIZED = MoEAttributes(8, 2, 256, 128, weight_format=INT4, weight_block=64, has_weight_zero_point=True)


@pytest.fixture(scope="module")
def native_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("cmake"):
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("native-build")
    subprocess.run(
        ["cmake", "-S", str(SOURCE_DIR), "-B", str(build), f"-DMOETRT_CUDA_INCLUDE_DIR={cuda_include_dir()}"],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (build / "libmoetrt.so").is_file()
    return build


def _run(build: Path, *args: str) -> str:
    result = subprocess.run([str(build / "moetrt_native_test"), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module", params=["full", "quantized"])
def bundle_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    attrs = FULL if request.param == "full" else QUANTIZED
    bundle = planning_bundle(attrs, "bfloat16")
    path = tmp_path_factory.mktemp("bundle") / "bundle.bin"
    path.write_bytes(bundle.to_bytes())
    return attrs, bundle, path


def test_cpp_selftest(native_build: Path, bundle_file) -> None:
    assert _run(native_build, "selftest", str(bundle_file[2])).strip() == "ok"


def test_cpp_planner_equals_python(native_build: Path, bundle_file) -> None:
    attrs, bundle, path = bundle_file
    tokens = [1, 2, 16, 17, 64, 65, 512, 513, 4096]
    lines = _run(native_build, "plan", str(path), *map(str, tokens)).splitlines()
    assert len(lines) == len(tokens)
    for t, line in zip(tokens, lines):
        ops, layout = plan_from_native(json.loads(line))
        bound = plan.bucket_of(t)
        cfg = bundle.buckets[plan.bucket_name(bound)]["config"]
        variants = plan.bucket_variants(attrs, "bfloat16", bound, cfg)
        assert ops == plan.launch_sequence(attrs, "bfloat16", t, variants, cfg, bound), t
        assert layout == plan.workspace_layout(attrs, "bfloat16", t, cfg, bound), t


def test_plugin_fields_round_trip(native_build: Path, bundle_file, tmp_path: Path) -> None:
    """What Python's writer puts in an engine, the C++ plugin reads and writes back byte for byte."""
    attrs, bundle, _ = bundle_file
    fields = state_to_fields(
        PluginState(
            attrs, "bf16", {90: bundle.to_bytes(), 80: bundle.to_bytes().replace(b'"sm": 90', b'"sm": 80')}
        )
    )
    native_files.write_fields(tmp_path / "in.bin", fields)
    _run(native_build, "fields", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    back = native_files.read_fields(tmp_path / "out.bin")
    assert [name for name, *_ in back] == list(fields)
    for (name, kind, length, data), (array, want_kind) in zip(back, fields.values()):
        assert (kind, length, data) == (want_kind, array.size, array.tobytes()), name


def test_plugin_fields_refusals(native_build: Path, bundle_file, tmp_path: Path) -> None:
    attrs, bundle, _ = bundle_file
    cases = {
        "no kernels": (PluginState(attrs, "bf16", {}), "carries no kernels"),
        "other dtype": (PluginState(attrs, "fp16", {90: bundle.to_bytes()}), "io_dtype is fp16"),
        "other attributes": (
            PluginState(
                MoEAttributes(attrs.num_experts * 2, 2, attrs.hidden_size, 128),
                "bf16",
                {90: bundle.to_bytes()},
            ),
            "num_experts is",
        ),
    }
    for name, (state, message) in cases.items():
        native_files.write_fields(tmp_path / "in.bin", state_to_fields(state))
        result = subprocess.run(
            [
                str(native_build / "moetrt_native_test"),
                "fields",
                str(tmp_path / "in.bin"),
                str(tmp_path / "o.bin"),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr)


class _Launcher:
    def __init__(self, native: NativeBundle) -> None:
        self.native = native

    def workspace_size(self, tokens: int) -> int:
        return self.native.workspace_size(tokens)


def test_plugin_rules_equal_python(native_build: Path, bundle_file) -> None:
    attrs, bundle, path = bundle_file
    got = json.loads(_run(native_build, "rules", str(path)))
    positions = len(attrs.present_inputs()) + len(attrs.present_outputs())
    assert got["expected_dtypes"] == [io_rules.expected_dtype(attrs, p, "bf16") for p in range(positions)]
    descs = [(d, io_rules.LINEAR) for d in got["expected_dtypes"]]
    assert got["supports_expected"] == [
        io_rules.supports_format_combination(attrs, p, descs, len(attrs.present_inputs()))
        for p in range(positions)
    ]
    assert all(got["supports_expected"]) and got["supports_strided_hidden"] is False
    launcher = _Launcher(NativeBundle(bundle.to_bytes()))
    bounds = [b["bound"] for b in bundle.buckets.values()]
    for lo, hi, size in got["workspace"]:
        assert size == io_rules.workspace_size(
            launcher, (hi, attrs.hidden_size), (lo, attrs.hidden_size), bounds
        )
    assert got["enqueue_tokens"] == 6
    assert got["bad_dims"].startswith("MoE plugin inputs do not match its attributes: router_weight")


def test_creator_asks_for_every_field_python_writes(native_build: Path) -> None:
    from moetrt.kernels.aot import SUPPORTED_SMS
    from moetrt.trt.fields import KERNELS_PREFIX

    names = _run(native_build, "names").split()
    want = [f.name for f in dataclasses.fields(MoEAttributes)]
    want += [
        "io_dtype",
        "float_attrs_f64",
        "fields_version",
        *(f"{KERNELS_PREFIX}{sm}" for sm in SUPPORTED_SMS),
    ]
    assert names == want


def test_cpp_plugin_reads_what_the_onnx_parser_hands_it(native_build: Path, tmp_path: Path) -> None:
    """Build phase of the C++ plugin: the node's attributes plus the kernels `embed_kernels` wrote, as the parser
    turns them into fields (only those the creator names); what it serializes, Python's reader takes too."""
    from moetrt_testing.single_op_model import single_moe_model

    from moetrt.op.fused_node import fused_nodes
    from moetrt.trt.embedded_kernels import embed_kernels, node_attributes, parser_fields
    from moetrt.trt.fields import state_from_fields

    model, _ = single_moe_model(FULL)
    on_node = node_attributes(fused_nodes(model)[0])
    embed_kernels(
        model, "bf16", 90, lambda attrs, _dtype, sm: planning_bundle(attrs, "bfloat16", sm=sm).to_bytes()
    )
    names = set(_run(native_build, "names").split())
    fields = parser_fields(fused_nodes(model)[0], names)
    native_files.write_fields(tmp_path / "in.bin", fields)
    _run(native_build, "fields", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    kinds = {"int32": np.int32, "float32": np.float32, "char": np.int8, "int8": np.int8}
    back = {
        name: np.frombuffer(data, dtype=kinds[kind])
        for name, kind, _n, data in native_files.read_fields(tmp_path / "out.bin")
    }
    state = state_from_fields(back)
    assert state.attrs == on_node and state.dtype == "bf16" and set(state.bundles) == {90}
