"""libmoetrt_plugin.so on a GPU, driven through TensorRT's plugin interfaces by the C++ harness
(src/moetrt/native/tests/plugin_harness.cpp): create from the fields Python's writer puts in an engine, format and
shape rules, clone, serialize and recreate, attach, enqueue on a stream with a workspace; the output against
the float32 oracle. No TensorRT library runs here: the harness makes TensorRT's calls itself.

Needs TensorRT's public headers in .trt/include (see CONTRIBUTING.md) and a C++ compiler:
`python -m pytest -m gpu tests/gpu/test_native_plugin.py -v`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from moetrt_testing import native_files
from moetrt_testing.single_op_model import single_moe_model

from moetrt.core import dtypes
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.kernels.aot import compile_kernels
from moetrt.kernels.native import SOURCE_DIR, cuda_include_dir, library_sources
from moetrt.op.fused_node import fused_nodes
from moetrt.op.presets import PRESETS, like
from moetrt.op.spec import MoEAttributes
from moetrt.trt.embedded_kernels import embed_kernels, parser_fields
from moetrt.trt.fields import PluginState, state_to_fields
from moetrt.tune.gpu_workload import gpu_random_inputs, gpu_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TRT_INCLUDE = Path(__file__).resolve().parents[2] / ".trt" / "include"
VARIANTS = {
    "qwen3_next_like": like("qwen3_next", 64, 10, 256, 128, output_router_logits=True),
    "deepseek_like": like("deepseek_v3", 32, 4, 128, 64, n_group=4, topk_group=2),
    "gpt_oss_like": like("gpt_oss_20b", 16, 4, 128, 128),
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    if not (TRT_INCLUDE / "NvInferRuntime.h").is_file():
        pytest.skip("TensorRT headers are not in .trt/include")
    out = tmp_path_factory.mktemp("plugin")
    flags = ["-std=c++17", "-O2", "-fPIC", "-Wno-deprecated-declarations"]
    includes = [
        f"-I{SOURCE_DIR / 'include'}",
        f"-I{SOURCE_DIR / 'src'}",
        f"-I{TRT_INCLUDE}",
        f"-I{cuda_include_dir()}",
    ]
    sources = [str(p) for p in library_sources()]
    plugin = out / "libmoetrt_plugin.so"
    subprocess.run(
        [
            "g++",
            *flags,
            "-shared",
            "-fvisibility=hidden",
            *includes,
            *sources,
            str(SOURCE_DIR / "plugin" / "moe_plugin.cpp"),
            "-o",
            str(plugin),
            "-ldl",
        ],
        check=True,
    )
    programs = []
    for name in ("plugin_harness", "native_test"):
        program = out / f"moetrt_{name}"
        command = ["g++", *flags, *includes, f"-I{SOURCE_DIR / 'tests'}", *sources]
        subprocess.run(
            [*command, str(SOURCE_DIR / "tests" / f"{name}.cpp"), "-o", str(program), "-ldl"], check=True
        )
        programs.append(program)
    return plugin, programs[0], programs[1]


def creator_field_names(native_test: Path) -> list[str]:
    return subprocess.run(
        [str(native_test), "names"], capture_output=True, text=True, check=True
    ).stdout.split()


@functools.cache
def _bundle_bytes(attrs: MoEAttributes, dtype: str, sm: int) -> bytes:
    workers = min(16, os.cpu_count() or 1)
    return compile_kernels(attrs, dtypes.kernel_name_of(dtype), sm, workers=workers).to_bytes()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.contiguous().view(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    return flat.cpu().numpy().tobytes()


def run_harness(
    harness: tuple[Path, Path, Path],
    attrs: MoEAttributes,
    dtype: str,
    inputs: dict,
    work: Path,
    iterations: int = 0,
    fields_from: str = "engine",
) -> tuple[list[torch.Tensor], dict | None]:
    sm = torch.cuda.get_device_capability()
    sm = sm[0] * 10 + sm[1]
    if fields_from == "engine":  # runtime phase: what Python's writer puts in an engine
        fields = state_to_fields(PluginState(attrs, dtype, {sm: _bundle_bytes(attrs, dtype, sm)}))
    else:  # build phase: the node's attributes and embedded kernels, as TensorRT's ONNX parser hands them over
        model, _ = single_moe_model(attrs)
        embed_kernels(model, dtype, sm, _bundle_bytes)
        fields = parser_fields(fused_nodes(model)[0], set(creator_field_names(harness[2])))
    native_files.write_fields(work / "fields.bin", fields)
    names = attrs.present_inputs()
    tensors = []
    for name in names:
        t = inputs[name]
        name_of = {torch.uint8: "uint8", torch.float32: "fp32"}.get(t.dtype, dtype)
        tensors.append((name_of, tuple(t.shape), _tensor_bytes(t)))
    native_files.write_tensors(work / "inputs.bin", tensors)
    command = [
        str(harness[1]),
        str(harness[0]),
        str(work / "fields.bin"),
        str(work / "inputs.bin"),
        str(work / "out.bin"),
    ]
    result = subprocess.run(
        [*command, str(iterations)] if iterations else command, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "plugin harness: ok" in result.stderr
    torch_dtype = dtypes.precision(dtype).torch
    outs = []
    for _dtype, dims, data in native_files.read_tensors(work / "out.bin"):
        raw = np.frombuffer(data, dtype=np.int16 if torch_dtype != torch.float32 else np.float32).copy()
        outs.append(torch.from_numpy(raw).view(torch_dtype).view(dims))
    timing = json.loads(result.stdout.strip().splitlines()[-1]) if iterations else None
    return outs, timing


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", dtypes.NAMES)
@pytest.mark.parametrize("num_tokens", [1, 9, 300])
@pytest.mark.parametrize("fields_from", ["engine", "parser"])
def test_plugin_through_its_interfaces(
    harness, tmp_path: Path, variant: str, dtype: str, num_tokens: int, fields_from: str
) -> None:
    """From an engine's fields (runtime phase) and from the ONNX parser's (build phase, kernels in the node)."""
    attrs = VARIANTS[variant]
    torch_dtype = dtypes.precision(dtype).torch
    inputs = gpu_random_inputs(attrs, num_tokens, torch_dtype, seed=num_tokens)
    outs, _ = run_harness(harness, attrs, dtype, inputs, tmp_path, fields_from=fields_from)
    ref = gpu_reference(inputs, attrs)
    err = relative_error(outs[0].cuda().float(), ref.output)
    assert err <= tolerance(torch_dtype), (variant, dtype, num_tokens, err)


def test_plugin_at_qwen3_next_width_and_its_t1_latency(harness, tmp_path: Path) -> None:
    """A real-width Qwen3-Next layer (512 experts) through the plugin; prints the native T = 1 enqueue time."""
    attrs = PRESETS["qwen3_next"]
    inputs = gpu_random_inputs(attrs, 1, torch.bfloat16, seed=1)
    outs, timing = run_harness(harness, attrs, "bf16", inputs, tmp_path, iterations=200)
    err = relative_error(outs[0].cuda().float(), gpu_reference(inputs, attrs).output)
    assert err <= tolerance(torch.bfloat16), err
    print("plugin harness T=1 qwen3_next:", json.dumps(timing))
