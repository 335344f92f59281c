"""The benchmark program on the CPU: floor accounting against hand-computed values, the transformers peers
against the oracle, and a quick run of the whole harness (results.json schema, rows, table, plot)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrt.op.spec import MoEAttributes
from moetrt.tune import floors

BENCH = Path(__file__).resolve().parents[1] / "bench"
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

peers = importlib.import_module("peers")
workloads = importlib.import_module("workloads")
moe_bench = importlib.import_module("moe_bench")

ROW_KEYS = {
    "shape",
    "T",
    "routing",
    "impl",
    "us_median",
    "us_min",
    "us_max",
    "rel_err",
    "distinct_experts",
    "floor_us",
    "pct_of_floor",
}
TOP_KEYS = {"device", "driver", "torch", "triton", "date", "command", "copy_GBps", "gemm_TFLOPs", "rows"}


# --------------------------------------------------------------------------------------------------- floors


def test_bytes_and_flops_by_hand_shared_gate() -> None:
    # E4 k2 H8 I4, shared I2 with sigmoid gate, bf16, T=5 tokens hitting 3 distinct experts.
    attrs = MoEAttributes(4, 2, 8, 4, norm_topk_prob=True, shared_intermediate_size=2, has_shared_gate=True)
    # experts 3 * (3*4*8) = 288, shared 3*2*8 + 8 = 56, router 4*8 = 32, activations 2*5*8 = 80 -> 456 elements
    assert floors.moe_bytes(attrs, 5, 3, itemsize=2) == 912
    # router 2*5*8*4 = 320, experts 2*5*2*3*4*8 = 1920, shared 2*5*3*2*8 = 480, gate 2*5*8 = 80
    assert floors.moe_flops(attrs, 5) == 2800


def test_quantized_expert_bytes_by_hand() -> None:
    """The floor of quantized experts counts what is stored: codes, scales, zero points."""
    import dataclasses

    native = MoEAttributes(4, 2, 64, 32)
    assert floors.expert_bytes(native, 2) == 3 * 32 * 64 * 2  # 12288
    fp8 = dataclasses.replace(native, weight_format="fp8_block", weight_block=16)
    # codes 3*32*64 = 6144 bytes; scales float32: gate_up [64/16, 64/16] = 16, down [64/16, 32/16] = 8
    assert floors.expert_bytes(fp8, 2) == 6144 + (16 + 8) * 4
    int4 = dataclasses.replace(native, weight_format="int4", weight_block=16, has_weight_zero_point=True)
    # codes 3072 bytes; scales float32 + zeros uint8: gate_up [64, 64/16] = 256, down [64, 32/16] = 128
    assert floors.expert_bytes(int4, 2) == 3072 + (256 + 128) * 5
    mxfp4 = dataclasses.replace(native, weight_format="mxfp4", weight_block=32)
    # codes 3072 bytes; e8m0 scale bytes: gate_up [64, 2] = 128, down [64, 1] = 64
    assert floors.expert_bytes(mxfp4, 2) == 3072 + 128 + 64
    assert floors.moe_bytes(mxfp4, 1, 2, itemsize=2) - floors.moe_bytes(native, 1, 2, itemsize=2) == 2 * (
        3264 - 12288
    )


def test_bytes_by_hand_biases_and_score_correction() -> None:
    gpt_oss = MoEAttributes(
        4,
        2,
        8,
        4,
        topk_before_score=True,
        has_router_bias=True,
        has_expert_bias=True,
        activation="swiglu_clamped",
    )
    # expert 96 + (2*4 + 8) = 112 elements; router 32 + 4; activations 2*1*8
    assert floors.moe_bytes(gpt_oss, 1, 2, itemsize=4) == (2 * 112 + 36 + 16) * 4
    deepseek = MoEAttributes(
        8,
        2,
        8,
        4,
        scoring="sigmoid",
        n_group=2,
        topk_group=1,
        has_score_correction_bias=True,
        shared_intermediate_size=4,
    )
    # experts 5 * 96, shared 3*4*8 = 96 (no gate), router 64 + 8, activations 2*3*8 = 48
    assert floors.moe_bytes(deepseek, 3, 5, itemsize=2) == (480 + 96 + 72 + 48) * 2
    with pytest.raises(ValueError):
        floors.moe_bytes(deepseek, 3, 9, itemsize=2)


def test_floor_is_the_larger_bound() -> None:
    # 912 B at 1 GB/s = 0.912 us; 2800 FLOP at 1 MFLOP/s = 2800 us -> compute-bound
    assert floors.floor_us(912, 2800, copy_gbps=1.0, gemm_tflops=1e-6) == pytest.approx(2800.0)
    # 912 B at 1 MB/s = 912 us; 2800 FLOP at 1 TFLOP/s is negligible -> bandwidth-bound
    assert floors.floor_us(912, 2800, copy_gbps=1e-3, gemm_tflops=1.0) == pytest.approx(912.0)
    assert floors.pct_of_floor(50.0, 200.0) == pytest.approx(25.0)


def test_format_entries_of_the_quantized_benchmarks() -> None:
    """quantized_bench and routed_probe name formats alike: a weight format at the block `moetrt build` and
    `moetrt tune` choose (the default, or the largest that divides the shape: int4 groups of 64 for GPT-OSS's
    2880), +a8 for fp8 activations; both scripts load with the helper (--help)."""
    from moetrt.op.presets import PRESETS

    base = PRESETS["qwen3_next"]
    assert workloads.with_weight_format(base, "native") == base
    int4 = workloads.with_weight_format(base, "int4")
    assert (int4.weight_format, int4.weight_block, int4.has_fp8_activations) == ("int4", 128, False)
    a8 = workloads.with_weight_format(base, "fp8_block+a8")
    assert (a8.weight_format, a8.weight_block, a8.has_fp8_activations) == ("fp8_block", 128, True)
    gpt_oss = PRESETS["gpt_oss_20b"]
    assert workloads.with_weight_format(gpt_oss, "int4").weight_block == 64  # 128 does not divide 2880
    assert workloads.with_weight_format(gpt_oss, "mxfp4").weight_block == 32
    for entry in workloads.FORMAT_ENTRIES:  # every entry names a format the op takes
        assert workloads.with_weight_format(base, entry).weight_format in (
            "native",
            "fp8_block",
            "int4",
            "mxfp4",
        )
    for script in ("quantized_bench.py", "routed_probe.py", "layer_chain.py"):
        done = subprocess.run(
            [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        )  # fmt: skip
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr


def test_quantized_bench_compiles_patched_bundles_ahead(tmp_path: Path) -> None:
    """--compile-only --sm compiles the table's bundle and each patch's on a CPU machine into --bundles (to
    carry to a GPU), says why a patch cannot compile, and a second run finds the kept bundles."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(BENCH / "quantized_bench.py"), "--out", str(tmp_path / "rows.jsonl"),
             "--shapes", "qwen3_30b", "--tokens", "1", "--formats", "native", "--sm", "80", "--compile-only",
             "--bundles", str(tmp_path / "kept"), "--patches", '[{"gate_up": {"BN": 64}}, {"gate_up": {"TMA": 1}}]'],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        )  # fmt: skip

    done = run()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["qwen3_30b native table: compiled", "qwen3_30b native patch0: compiled"]
    assert "patch1:" in lines[2] and "TMA, which sm_80 does not have" in lines[2]
    kept = sorted(path.name for path in (tmp_path / "kept").iterdir())
    assert kept == ["qwen3_30b_native_patch0_sm80.bin", "qwen3_30b_native_table_sm80.bin"]
    stamps = [path.stat().st_mtime_ns for path in sorted((tmp_path / "kept").iterdir())]
    assert run().returncode == 0
    assert [path.stat().st_mtime_ns for path in sorted((tmp_path / "kept").iterdir())] == stamps
    assert not (tmp_path / "rows.jsonl").exists()  # nothing timed, nothing written


def test_gemv_probe_kernels_match_their_reference_in_the_interpreter() -> None:
    """bench/gemv_probe.py's CUDA-core GEMV kernels (every weight format, both down forms) against its float32
    reference under the CPU interpreter; the script exits non-zero when a variant fails."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "gemv_probe.py"), "--shapes", "tiny", "--quick"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["format"] for r in rows} == {"native", "fp8_block", "int4", "mxfp4"}
    assert len(rows) == 8 and all(0 < r["rel_err"] <= 1e-2 and r["ok"] for r in rows)


def test_tma_probe_kernels_match_their_reference_in_the_interpreter() -> None:
    """bench/tma_probe.py's pointer-load, tail-piece and TMA forms of the prefill GEMMs (its warp-specialised
    forms need a GPU) against its float32 reference under the CPU interpreter, two token counts (T = 200 fills
    some 16-row blocks, so the tail form runs both its kernels) and two tile shapes; the script exits non-zero
    when a form fails."""
    configs = json.dumps(
        [
            {"BM": 16, "BN": 32, "BK": 32, "BH": 64, "BKD": 32, "warps": 4, "stages": 2},
            {"BM": 32, "BN": 64, "BK": 64, "BH": 128, "BKD": 64, "warps": 4, "stages": 2, "BT": 16},
        ]
    )
    done = subprocess.run(
        [sys.executable, str(BENCH / "tma_probe.py"), "--shapes", "tiny", "--tokens", "9,200", "--configs", configs],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    forms = {
        "gate_up/ptr",
        "gate_up/ptr+tail",
        "gate_up/tma_w",
        "gate_up/tma",
        "down/ptr",
        "down/ptr+tail",
        "down/tma",
    }
    assert {r["form"] for r in rows} == forms and len(rows) == 2 * 2 * len(forms)
    assert all(0 < r["rel_err"] <= 1e-2 and r["ok"] for r in rows)


def test_stream_probe_kernels_read_every_byte_in_the_interpreter() -> None:
    """bench/stream_probe.py's pointer kernels (its TMA form needs a GPU) sum exactly the regions they claim to
    stream, under the CPU interpreter: a program's sum against torch's over its chunk / row slab."""
    script = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import stream_probe as sp
torch.manual_seed(0)
w = torch.randn(3 * 64 * 128, dtype=torch.bfloat16)
bases = torch.tensor([0, 64 * 128], dtype=torch.int64)
out = torch.empty(2 * 4)
sp.chunks_kernel[(8,)](w, bases, out, 2048, 4, 512)
ref = torch.stack([w[b + i * 2048 : b + (i + 1) * 2048].float().sum() for b in (0, 8192) for i in range(4)])
assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3), (out, ref)
out = torch.empty(2 * 4)
sp.tiles_kernel[(8,)](w, bases, out, 128, 4, 16, 32)
ref = torch.stack([w[b + i * 2048 : b + (i + 1) * 2048].float().sum() for b in (0, 8192) for i in range(4)])
assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3), (out, ref)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(BENCH)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_distinct_experts_counted_from_routing() -> None:
    # Router = 10 x identity: each token picks the expert of its one-hot direction.
    attrs = MoEAttributes(4, 1, 4, 2)
    eye = torch.eye(4)
    inputs = {"hidden_states": eye[[0, 0, 2, 2, 2]], "router_weight": 10 * eye}
    assert workloads.distinct_experts(inputs, attrs) == 2
    inputs["hidden_states"] = eye[[3, 1, 0, 2]]
    assert workloads.distinct_experts(inputs, attrs) == 4


# ---------------------------------------------------------------------------------------------------- peers


@pytest.mark.parametrize("name", workloads.CPU_DEFAULT_SHAPES)
def test_transformers_blocks_compute_the_oracle(name: str) -> None:
    shape = workloads.SHAPES[name]
    attrs = shape.attrs
    weights = workloads.make_weights(attrs, torch.float32, torch.device("cpu"), seed=3)
    tokens = workloads.make_token_inputs(attrs, 7, torch.float32, torch.device("cpu"), seed=4, skew=0.0)
    inputs = workloads.assemble(attrs, tokens, weights)
    block = peers.HFBlock(shape.family, attrs, peers.hf_state(shape.family, inputs, attrs))
    ref = workloads.reference_output(inputs, attrs)
    assert ref.abs().max() > 0
    for impl in peers.available_implementations():
        block.set_implementation(impl)
        err = workloads.relative_error(block(inputs["hidden_states"]), ref)
        assert err is not None and err <= 1e-5, (impl, err)


def test_gpt_oss_layout_conversion_is_exact() -> None:
    i, h, e = 3, 5, 2
    gate_up = torch.randn(e, 2 * i, h)
    bias = torch.randn(e, 2 * i)
    down = torch.randn(e, h, i)
    state = peers.gpt_oss_expert_state(
        {
            "expert_gate_up_weight": gate_up,
            "expert_gate_up_bias": bias,
            "expert_down_weight": down,
            "expert_down_bias": torch.randn(e, h),
        },
        i,
    )
    hf = state["experts.gate_up_proj"]
    assert torch.equal(hf[..., 0::2], gate_up[:, :i, :].transpose(1, 2))
    assert torch.equal(hf[..., 1::2], gate_up[:, i:, :].transpose(1, 2))
    assert torch.equal(state["experts.gate_up_proj_bias"][:, 0::2], bias[:, :i])
    assert torch.equal(state["experts.gate_up_proj_bias"][:, 1::2], bias[:, i:])
    assert torch.equal(state["experts.down_proj"], down.transpose(1, 2))


def test_rounded_router_reference_agrees_when_nothing_flips() -> None:
    attrs = workloads.SHAPES["tiny_qwen3_next"].attrs
    weights = workloads.make_weights(attrs, torch.float32, torch.device("cpu"), seed=5)
    tokens = workloads.make_token_inputs(attrs, 9, torch.float32, torch.device("cpu"), seed=6, skew=0.0)
    inputs = workloads.assemble(attrs, tokens, weights)
    rounded, flipped = workloads.reference_output_rounded_router(inputs, attrs)
    assert flipped == 0.0
    assert workloads.relative_error(rounded, workloads.reference_output(inputs, attrs)) < 1e-6
    assert workloads.relative_error(torch.full_like(rounded, float("nan")), rounded) is None


# --------------------------------------------------------------------------------------------- the harness


def test_quick_cpu_run_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shapes = ["tiny_qwen3_next", "tiny_deepseek_v3", "tiny_gpt_oss"]
    code = moe_bench.main(
        [
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--quick",
            "--shapes",
            ",".join(shapes),
            "--tokens",
            "1,8",
            "--repeats",
            "3",
            "--warmup",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= TOP_KEYS
    assert results["complete"] is True and results["rows_past_deadline"] == 0
    assert results["copy_GBps"] > 0 and results["gemm_TFLOPs"] > 0
    assert "--quick" in results["command"]
    rows = results["rows"]
    assert {(r["shape"], r["T"], r["routing"]) for r in rows} == {
        (s, t, routing) for s in shapes for t, routing in ((1, "random"), (8, "random"), (8, "skewed"))
    }
    for row in rows:
        assert set(row) >= ROW_KEYS, row
        assert row["status"] in ("ok", "failed", "error", "skipped")
        attrs = workloads.SHAPES[row["shape"]].attrs
        assert 1 <= row["distinct_experts"] <= min(attrs.num_experts, row["T"] * attrs.top_k)
        floor = floors.floor_us(
            floors.moe_bytes(attrs, row["T"], row["distinct_experts"], 4),
            floors.moe_flops(attrs, row["T"]),
            results["copy_GBps"],
            results["gemm_TFLOPs"],
        )
        # copy_GBps / gemm_TFLOPs are rounded in the file; the floor was computed from the exact values
        assert row["floor_us"] == pytest.approx(floor, rel=1e-2)
        if row["impl"] in ("eager", "batched_mm", "grouped_mm"):
            assert row["status"] == "ok", row
            assert row["rel_err"] <= 1e-5
            assert row["repeats"] == 3
            assert row["us_min"] <= row["us_median"] <= row["us_max"]
            assert row["pct_of_floor"] == pytest.approx(100 * row["floor_us"] / row["us_median"], rel=1e-2)
        elif row["impl"] == "moetrt":
            # the fused op needs CUDA: the row says why, and the peers still ran
            assert row["status"] == "error" and row["note"] and row["us_median"] is None
    skewed = {r["shape"]: r["distinct_experts"] for r in rows if r["routing"] == "skewed"}
    random8 = {r["shape"]: r["distinct_experts"] for r in rows if r["routing"] == "random" and r["T"] == 8}
    assert all(skewed[s] <= random8[s] for s in shapes)
    assert (tmp_path / "table.txt").read_text().count("tiny_gpt_oss") >= 3
    # the summary table comes last
    assert printed.rstrip().splitlines()[-1].startswith("tiny_gpt_oss")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "moe_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_get_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, expected in (
        (["--tokens", "1,x"], "--tokens must be a comma list"),
        (["--tokens", "0,8"], "--tokens needs positive integers"),
        (["--impls", "moetrt,foo"], "unknown implementation foo"),
    ):
        assert moe_bench.main(["--out", str(tmp_path), "--device", "cpu", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {expected}") and len(err.splitlines()) == 1, err
    # the script itself, as users run it
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "moe_bench.py"),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--shapes",
            "nope",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: unknown shape nope; choose from " + ", ".join(workloads.SHAPES))
    assert not (tmp_path / "results.json").exists()


def test_a_failing_peer_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_block(*args: object, **kwargs: object) -> None:
        raise ValueError("layout differs")

    monkeypatch.setattr(peers.HFBlock, "__init__", broken_block)
    code = moe_bench.main(
        [
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--quick",
            "--shapes",
            "tiny_qwen3_30b",
            "--tokens",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "1",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is True
    by_impl = {(r["impl"], r["routing"]): r for r in results["rows"]}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        row = by_impl[(impl, "random")]
        assert row["status"] == "error" and "layout differs" in row["note"], row
        assert row["us_median"] is None and row["rel_err"] is None
    assert by_impl[("moetrt", "skewed")]["status"] == "error"


def test_implementation_switch_reaches_the_registered_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """config._experts_implementation must route each forward to that implementation, not silently to eager."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    shape = workloads.SHAPES["tiny_qwen3_30b"]
    attrs = shape.attrs
    weights = workloads.make_weights(attrs, torch.float32, torch.device("cpu"), seed=7)
    tokens = workloads.make_token_inputs(attrs, 5, torch.float32, torch.device("cpu"), seed=8, skew=0.0)
    inputs = workloads.assemble(attrs, tokens, weights)
    block = peers.HFBlock(shape.family, attrs, peers.hf_state(shape.family, inputs, attrs))
    for impl in peers.available_implementations()[1:]:
        calls: list[str] = []
        real = ALL_EXPERTS_FUNCTIONS[impl]

        def spy(*args: object, _real=real, _impl=impl, _calls=calls, **kwargs: object) -> torch.Tensor:
            _calls.append(_impl)
            return _real(*args, **kwargs)

        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, impl, spy)
        block.set_implementation(impl)
        block(inputs["hidden_states"])
        assert calls == [impl]
        block.set_implementation("eager")
        block(inputs["hidden_states"])
        assert calls == [impl], "eager must not go through the registered implementation"


def _oracle_forward(inputs: dict[str, torch.Tensor], attrs: MoEAttributes, outputs=None, bundle=None):
    out = workloads.reference_output(inputs, attrs).to(inputs["hidden_states"].dtype)
    if outputs is None:
        return {"output": out}
    outputs["output"].copy_(out)
    return outputs


def _lazy_forward(inputs: dict[str, torch.Tensor], attrs: MoEAttributes, outputs=None, bundle=None):
    """Writes nothing into the caller's buffer: what a kernel that skips rows does."""
    return outputs


@pytest.mark.parametrize(("forward", "status"), [(_oracle_forward, "ok"), (_lazy_forward, "failed")])
def test_moetrt_rows_use_the_callers_output_buffer_and_catch_unwritten_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forward: object, status: str
) -> None:
    # moe_forward needs CUDA; on the CPU a stand-in with its signature exercises the row plumbing: the
    # preallocated output binding, the NaN poisoning before the checked call, timing and the floor.
    monkeypatch.setattr(moe_bench.Bench, "moe_forward", lambda self: forward)
    code = moe_bench.main(
        [
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--quick",
            "--shapes",
            "tiny_mixtral",
            "--tokens",
            "4",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--impls",
            "moetrt",
            "--skew-tokens",
            "0",
        ]
    )
    assert code == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["impl"] == "moetrt" and row["status"] == status, row
    if status == "ok":
        assert row["rel_err"] is not None and row["rel_err"] <= 1e-5
        assert row["repeats"] == 2 and row["us_median"] > 0 and row["pct_of_floor"] > 0
    else:
        assert row["rel_err"] is None and "NaN" in row["note"]


@pytest.mark.slow  # a real second process: 15-40 s on a busy 2-core machine
def test_a_broken_cuda_context_reruns_the_rest_without_the_culprit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An illegal address in one implementation makes every later CUDA call in the process fail. Simulated
    # here by marking the context lost after the first moetrt row: the remaining shapes must be re-run in a
    # fresh process (a real subprocess) without moetrt, with the parent's ceilings, and merged back.
    original = moe_bench.Bench.run_moetrt

    def run_moetrt_then_break(self: moe_bench.Bench, case: object, graph: bool) -> None:
        original(self, case, graph)
        if not self.cuda_broken:
            self.mark_broken("AcceleratorError: CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(moe_bench.Bench, "run_moetrt", run_moetrt_then_break)
    shapes = ["tiny_qwen3_30b", "tiny_mixtral"]
    code = moe_bench.main(
        ["--out", str(tmp_path), "--device", "cpu", "--quick", "--shapes", ",".join(shapes), "--tokens", "3",
         "--repeats", "2", "--warmup", "1", "--impls", "moetrt,batched_mm", "--skew-tokens", "0"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (rerun,) = results["reruns"]
    assert rerun["shapes"] == shapes and rerun["impls"] == ["batched_mm"] and rerun["complete"]
    assert "moetrt broke the CUDA context" in rerun["reason"]
    rows = results["rows"]
    assert [(r["shape"], r["T"], r["impl"]) for r in rows] == [
        (s, 3, impl) for s in shapes for impl in ("moetrt", "batched_mm")
    ]
    for row in rows:
        if row["impl"] == "batched_mm":
            assert row["status"] == "ok" and "fresh process" in row["note"], row
            attrs = workloads.SHAPES[row["shape"]].attrs
            floor = floors.floor_us(
                floors.moe_bytes(attrs, row["T"], row["distinct_experts"], 4),
                floors.moe_flops(attrs, row["T"]),
                results["copy_GBps"],
                results["gemm_TFLOPs"],
            )
            assert row["floor_us"] == pytest.approx(floor, rel=1e-2)  # the parent's ceilings
        else:
            assert row["status"] == "error"
    later = [r for r in rows if r["impl"] == "moetrt" and r["shape"] == "tiny_mixtral"]
    assert later and all("CUDA context unusable" in r["note"] for r in later), later


def test_rerun_plan_leaves_out_the_culprit_and_merge_keeps_its_rows(tmp_path: Path) -> None:
    args = moe_bench.parse_args(
        ["--out", str(tmp_path), "--device", "cpu", "--shapes", "tiny_qwen3_30b,tiny_mixtral,tiny_gpt_oss"]
    )
    plan = moe_bench.rerun_plan
    assert plan(args, ("tiny_mixtral", "moetrt+graph")) == (
        ["tiny_mixtral", "tiny_gpt_oss"],
        ["eager", "batched_mm", "grouped_mm", "compile", "graph", "liger"],
    )
    # a peer broke it: moetrt stays, the peer (and the compiled grouped_mm built on it) go
    assert plan(args, ("tiny_gpt_oss", "grouped_mm"))[1] == [
        "moetrt",
        "moetrt+graph",
        "eager",
        "batched_mm",
        "graph",
        "liger",
    ]
    assert plan(args, ("tiny_qwen3_30b", "batched_mm+graph"))[1] == [
        "moetrt", "moetrt+graph", "eager", "batched_mm", "grouped_mm", "compile", "liger"
    ]  # fmt: skip
    assert plan(args, ("tiny_mixtral", "setup")) is None  # broke outside any implementation
    assert plan(args, None) is None

    def row(shape: str, impl: str, status: str) -> dict[str, object]:
        return {**moe_bench.new_row(shape, 8, "random", impl), "status": status}

    parent = [
        row("tiny_qwen3_30b", "moetrt", "ok"),
        row("tiny_qwen3_30b", "grouped_mm", "ok"),
        row("tiny_mixtral", "moetrt", "error"),
        row("tiny_mixtral", "grouped_mm", "error"),
        row("tiny_gpt_oss", "moetrt", "error"),
        row("tiny_gpt_oss", "grouped_mm", "error"),
    ]
    fresh = [row("tiny_mixtral", "grouped_mm", "ok"), row("tiny_gpt_oss", "grouped_mm", "ok")]
    merged = moe_bench.merge_rerun(
        parent, fresh, ["tiny_mixtral", "tiny_gpt_oss"], ["moetrt", "moetrt+graph"], args.shapes
    )
    assert [(r["shape"], r["impl"], r["status"]) for r in merged] == [
        ("tiny_qwen3_30b", "moetrt", "ok"),
        ("tiny_qwen3_30b", "grouped_mm", "ok"),
        ("tiny_mixtral", "moetrt", "error"),
        ("tiny_mixtral", "grouped_mm", "ok"),
        ("tiny_gpt_oss", "moetrt", "error"),
        ("tiny_gpt_oss", "grouped_mm", "ok"),
    ]
    assert all(
        "fresh process" in r["note"] for r in merged if r["status"] == "ok" and r["shape"] != "tiny_qwen3_30b"
    )


def test_rows_past_the_deadline_are_skipped_and_say_so(tmp_path: Path) -> None:
    code = moe_bench.main(
        ["--out", str(tmp_path), "--device", "cpu", "--quick", "--shapes", "tiny_mixtral,tiny_gpt_oss",
         "--tokens", "1,4", "--impls", "moetrt,grouped_mm", "--deadline-s", "1e-6"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is True
    rows = results["rows"]
    # every (shape, T, routing, impl) still has its row, none timed, and the count says so
    assert len(rows) == 2 * 3 * 2
    assert results["rows_past_deadline"] == len(rows)
    assert all(
        r["status"] == "skipped" and "--deadline-s" in r["note"] and r["us_median"] is None for r in rows
    )


def test_rows_past_the_deadline_counted_after_a_rerun() -> None:
    """A re-run's rows carry the deadline beside the re-run's own note; they still count, and rows skipped for
    other reasons or failed do not."""
    past = moe_bench.new_row("tiny_mixtral", 4, "random", "moetrt")
    past.update(status="skipped", note=moe_bench.DEADLINE_NOTE)
    other = moe_bench.new_row("tiny_mixtral", 4, "random", "batched_mm")
    other.update(status="skipped", note="would gather 9 GB of expert weights per call")
    failed = moe_bench.new_row("tiny_mixtral", 1, "random", "moetrt")
    merged = moe_bench.merge_rerun([], [past, other, failed], ["tiny_mixtral"], [], ["tiny_mixtral"])
    (cut,) = [r for r in merged if r["impl"] == "moetrt" and r["T"] == 4]
    assert cut["note"].startswith(moe_bench.DEADLINE_NOTE) and cut["note"] != moe_bench.DEADLINE_NOTE
    assert moe_bench.rows_past_deadline(merged) == 1


def test_reference_routed_like_another_implementation() -> None:
    """The same-routing reference: the oracle's own ids give the oracle's output; one token sent to another
    expert is counted and changes the output."""
    shape = workloads.SHAPES["tiny_qwen3_30b"]
    attrs = shape.attrs
    weights = workloads.make_weights(attrs, torch.float32, torch.device("cpu"), seed=3)
    tokens = workloads.make_token_inputs(attrs, 6, torch.float32, torch.device("cpu"), 7, 0.0)
    inputs = workloads.assemble(attrs, tokens, weights)
    _, ids = workloads.oracle_routing(inputs, attrs)
    same, differs = workloads.reference_output_routed(inputs, attrs, ids)
    assert differs == 0.0
    assert workloads.relative_error(same, workloads.reference_output(inputs, attrs)) < 1e-6
    flipped = ids.clone()
    unused = next(e for e in range(attrs.num_experts) if e not in flipped[0].tolist())
    flipped[0, -1] = unused
    other, differs = workloads.reference_output_routed(inputs, attrs, flipped)
    assert differs == pytest.approx(1 / 6)
    assert workloads.relative_error(other, same) > 1e-3


def test_liger_peer_refuses_blocks_it_cannot_compute() -> None:
    assert "biases" in peers.liger_unsupported("gpt_oss")
    reason = peers.liger_unsupported("qwen3_moe")
    assert reason is None or "not installed" in reason


def test_sass_stats_reads_registers_and_opcodes_of_real_cubins(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bench/sass_stats.py on a small quantized op compiled for SM 9.0: every stage's cubin read back, the
    expert GEMMs issue tensor-core instructions, nothing spills, and --json holds the same rows."""
    sass_stats = importlib.import_module("sass_stats")
    # H 1024: gate_up's reduction stays a loop (ptxas unrolls a short one)
    attrs = json.dumps({"num_experts": 8, "top_k": 2, "hidden_size": 1024, "intermediate_size": 64})
    out = tmp_path / "stats.json"
    rc = sass_stats.main(["--attrs", attrs, "--weights", "fp8", "--buckets", "16", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    by_stage = {r["stage"]: r for r in rows}
    assert {"router", "topk", "gate_up", "down_rows"} <= set(by_stage)
    for row in rows:
        assert row["registers"] > 0 and row["instructions"] > 0 and row["shared"] >= 0
        assert row["instructions"] == sum(row["opcodes"].values())
    for stage in ("gate_up", "down_rows"):
        assert any(op.startswith(("HMMA", "HGMMA")) for op in by_stage[stage]["opcodes"]), stage
        assert by_stage[stage]["stack"] == by_stage[stage]["local"] == 0
    for row in rows:
        for lp in row["loops"]:
            assert 0 < lp["instructions"] == sum(lp["opcodes"].values()) < row["instructions"]
            assert lp["start"] < lp["end"] and lp["opcodes"].get("BRA", 0) >= 1
    # gate_up's reduction over H is a backward branch whose body multiplies on the tensor cores
    assert any("HMMA" in lp["opcodes"] or "HGMMA" in lp["opcodes"] for lp in by_stage["gate_up"]["loops"])
    assert sass_stats.main(["--preset", "no_such_preset"]) == 2


def test_sass_loops_finds_each_backward_branch() -> None:
    """`sass_loops` on a hand-written listing: the backward branch's body counted from its target, a forward
    branch ignored, the register-to-register moves inside it counted (not a move of a constant or an
    immediate, nor one outside the loop)."""
    sass_stats = importlib.import_module("sass_stats")
    listing = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0008*/                   MOV R6, R7 ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0018*/                   IMAD.MOV.U32 R20, RZ, RZ, R12 ;
        /*001c*/                   MOV R21, R8 ;
        /*001e*/                   IMAD.MOV.U32 R25, RZ, RZ, -0x80 ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   BRA 0x60 ;
        /*0050*/                   NOP ;
        /*0060*/                   EXIT ;
    """
    loops = sass_stats.sass_loops(listing)
    assert loops == [
        {
            "start": 0x10,
            "end": 0x30,
            "instructions": 6,
            "opcodes": {"IMAD": 2, "HMMA": 1, "MOV": 1, "IADD3": 1, "BRA": 1},
            "register_moves": 2,
        }
    ]


def test_grouped_order_times_every_bundle_per_input_after_an_untimed_pass(
    monkeypatch, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The first config timed on a freshly made input ran 10-14 µs slow at T = 8 on the H200: every input gets an
    untimed pass first, then each bundle in turn, so no config is always the one timed first on it."""
    grouped_order = importlib.import_module("grouped_order")
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(grouped_order, "bundle_for", lambda shape, t, label, cfg, cache: label)

    def fake_time(shape: str, t: int, bundle: str, seed: int = 3) -> dict:
        calls.append((bundle, seed))
        return dict(rel_err=1e-3, ok=True, us=10.0, us_min=9.0)

    monkeypatch.setattr(grouped_order, "time_bundle", fake_time)
    out = tmp_path / "rows.jsonl"
    patches = json.dumps([{"topk": {"RT": 1}}, {"topk": {"RT": 2}}])
    monkeypatch.setattr(
        sys,
        "argv",
        ["grouped_order.py", "--compare", "patches", "--patches", patches, "--cases", "qwen3_30b:8",
         "--seeds", "5,6", "--out", str(out)],
    )  # fmt: skip
    assert grouped_order.main() == 0
    # per seed: the untimed pass (the first bundle), then every bundle; only the latter are rows
    assert calls == [
        ("table", 5), ("table", 5), ("patch0", 5), ("patch1", 5),
        ("table", 6), ("table", 6), ("patch0", 6), ("patch1", 6),
    ]  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["order"], r["seed"]) for r in rows] == [
        ("table", 5), ("patch0", 5), ("patch1", 5), ("table", 6), ("patch0", 6), ("patch1", 6),
    ]  # fmt: skip


def test_layer_chain_keeps_a_layers_rms_by_scaling_what_the_output_is_linear_in() -> None:
    """bench/layer_chain.py scales DOWN_PROJECTIONS by one factor to keep each layer's RMS: the op's output is
    that factor times the unscaled one (the reference, with biases, a gated shared expert and clamped SwiGLU)."""
    from moetrt.op.presets import like
    from moetrt.op.reference import moe_reference, random_inputs

    layer_chain = importlib.import_module("layer_chain")
    for preset in ("qwen3_next", "gpt_oss_20b"):
        attrs = like(preset, 8, 2, 32, 16)
        inputs = random_inputs(attrs, 5, seed=3)
        assert any(name in inputs for name in layer_chain.DOWN_PROJECTIONS[1:]), preset
        base = moe_reference(inputs, attrs)["output"]
        scaled = {
            name: value * 3.0 if name in layer_chain.DOWN_PROJECTIONS else value
            for name, value in inputs.items()
        }
        assert torch.allclose(moe_reference(scaled, attrs)["output"], 3.0 * base, rtol=1e-5, atol=1e-6)


def test_layer_chain_refuses_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{BENCH}", "CUDA_VISIBLE_DEVICES": ""}
    for args, expected in (
        (["--layers", "1"], "layer_chain: --layers 1: give 2 or more"),
        (["--format", "int3"], "layer_chain: --format int3: choose from native, fp8_block, int4, mxfp4"),
        ([], "layer_chain: needs a CUDA GPU"),
    ):
        proc = subprocess.run(
            [sys.executable, str(BENCH / "layer_chain.py"), "--out", str(tmp_path / "rows.jsonl"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2
        assert proc.stderr.strip().startswith(expected) and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "rows.jsonl").exists()


def test_ws_probe_compiles_warp_specialised_kernels_for_sm90() -> None:
    """bench/ws_probe.py's Gluon kernels compile ahead of time for sm_90 with no GPU, as the design states: the
    down kernel with a one-warp TMA producer, gate_up with a four-warp gathering producer whose 128 threads'
    cp.async copies each arrive on the stage's barrier (noinc) beside the TMA bytes' one arrival, so the
    barrier is initialised for 129; the consumer hands a stage back with one arrival after all its warps
    passed their wgmma wait."""
    ws_probe = importlib.import_module("ws_probe")
    E, _K, H, I = ws_probe.SHAPES["tiny"]  # noqa: E741
    cfg = ws_probe.CONFIGS[0]
    compiled = {
        form: ws_probe.compile_for(kernel, 90, constexprs, signature, cfg["warps"], cfg["maxnreg"])
        for form, (kernel, signature, constexprs) in ws_probe._signatures(E, H, I, cfg).items()
    }
    down, gate_up = (ws_probe.kernel_summary(compiled[f"{g}/gluon_ws"]) for g in ("down", "gate_up"))
    assert down["warp_specialized"] and down["worker_warps"] == [1] and down["spill"] == 0
    assert gate_up["warp_specialized"] and gate_up["worker_warps"] == [4] and gate_up["spill"] == 0
    assert down["wgmma"] > 0 and gate_up["wgmma"] > 0
    ptx = compiled["gate_up/gluon_ws"].asm["ptx"]
    arrivals = 1 + 32 * ws_probe.GATHER_PRODUCER_WARPS.value
    assert "mbarrier.init.shared::cta.b64 [%r" in ptx and f"], {arrivals};" in ptx
    assert "cp.async.mbarrier.arrive.noinc" in ptx and "mbarrier.arrive.expect_tx" in ptx
    # descriptors built on the device: Triton's global scratch, 128 bytes each
    assert (down["global_scratch"], gate_up["global_scratch"]) == (256, 128)
    assert ws_probe.main(["--compile-only", "--sm", "80"]) == 2


def test_ws_probe_smoke_pass_leaves_out_only_what_hangs_or_is_wrong() -> None:
    """Before the full-width run the probe runs every form on the tiny shape in a child process; a form that
    is wrong there is left out, and if the child hangs (a barrier never completed cannot be stopped on the
    GPU), each Gluon form it had not reported gets a child of its own, so only the hanging one is left out."""
    ws_probe = importlib.import_module("ws_probe")
    calls: list[list[str]] = []

    def one_child_finishes(args: list[str], timeout: float):  # type: ignore[no-untyped-def]
        calls.append(args)
        return "failed", [
            {"config": 0, "form": "down/tma", "ok": True},
            {"config": 0, "form": "gate_up/gluon_ws", "ok": True},
            {"config": 1, "form": "down/gluon_ws", "ok": False, "rel_err": 0.9},
        ]

    keep, rows = ws_probe.smoke(60, one_child_finishes)
    assert len(calls) == 1 and len(rows) == 3
    assert (0, "gate_up/gluon_ws") in keep and (1, "down/gluon_ws") not in keep
    assert all((i, f) in keep for i in range(len(ws_probe.CONFIGS)) for f in ws_probe.BASELINE_FORMS)

    calls.clear()

    def first_child_hangs(args: list[str], timeout: float):  # type: ignore[no-untyped-def]
        calls.append(args)
        if "--forms" not in args:  # the child of every form: hangs after its first row
            return "hung", [{"config": 0, "form": "gate_up/gluon_ws", "ok": True}]
        index, form = int(args[args.index("--configs") + 1]), args[args.index("--forms") + 1]
        if (index, form) == (2, "down/gluon_ws_persist"):
            return "hung", []
        return "ok", [{"config": index, "form": form, "ok": True}]

    keep, rows = ws_probe.smoke(60, first_child_hangs)
    pairs = len(ws_probe.CONFIGS) * len(ws_probe.GLUON_FORMS)
    assert len(calls) == 1 + pairs - 1  # no child for the pair the first one reported
    assert (2, "down/gluon_ws_persist") not in keep
    assert [r["error"] for r in rows if not r["ok"]] == ["hung (smoke)"]
    assert sum(f in ws_probe.GLUON_FORMS for _, f in keep) == pairs - 1
    assert ws_probe._json_rows(b'{"a": 1}\n{"b": 2}\n{"c"') == [{"a": 1}, {"b": 2}]


def test_int4_decode_probe_feeds_decoded_words_to_the_mma_as_they_are() -> None:
    """bench/int4_decode_probe.py's Gluon kernel compiles for sm_90 with its decoded weight tile converted to the
    mma's first operand under `assert_trivial` (the compile fails if any data movement were needed), the tokens
    as the N = 8 side (half the HMMAs of 16 padded rows: 16 weight rows x 16 k x 8 tokens each), and its loop
    issues fewer instructions a code, and a tenth of the register moves, of the launcher's int4 gate_up for the
    same shape and bucket."""
    probe = importlib.import_module("int4_decode_probe")
    cfg = probe.CONFIGS[0]
    _E, _K, H, I = probe.SHAPES["qwen3_next"]  # noqa: E741
    codes = 2 * cfg["BN"] * probe.GROUP * cfg["steps"] // (32 * cfg["warps"])
    stats = probe.loop_stats(probe.compile_for(90, H, I, cfg).asm["cubin"], codes)
    mma_per_step = 2 * (cfg["BN"] // (16 * cfg["warps"])) * (probe.GROUP // 16)  # gate and up, one warp
    assert stats["hmma"] == mma_per_step * cfg["steps"] and stats["spill"] == 0
    launcher = probe.launcher_gate_up("qwen3_next", 64, 90)
    assert stats["instructions_a_code"] < launcher["instructions_a_code"]
    # the token operand's registers come as they are from x laid out for them (`_x_layout`): the moves that
    # put the launcher's activation operand together are (nearly) gone
    assert stats["register_moves"] * 10 < launcher["register_moves"]
    assert probe.main(["--compile-only", "--sm", "75"]) == 2


def test_decode_ws_probe_streams_weights_from_a_producer_warp() -> None:
    """bench/decode_ws_probe.py's Gluon kernel compiles for sm_90 with no GPU, as designed, for gate_up and down
    in bf16, int4 and mxfp4, with blocks of 8 rows and of 16 (the launcher's decode blocks): one producer warp
    issuing a step's weight tiles by TMA (one `expect_tx` of their bytes on a barrier initialised for one
    arrival), the consumer handing a stage back with one arrival after all its warps read it (partition barrier
    first); the consumer's step issues the mmas of its tiles (twice as many for 16 rows), no register moves in the
    int4 loops and the 8-row mxfp4 ones (int4 gate_up: as many instructions a code as the register-fed probe,
    whose decoding it shares; mxfp4 gate_up, scales folded into the decoder: under 3/4 of the launcher's mxfp4
    loop), no spill."""
    probe = importlib.import_module("decode_ws_probe")
    int4_probe = importlib.import_module("int4_decode_probe")
    E, _K, H, I = probe.SHAPES["qwen3_next"]  # noqa: E741
    regs_cfg = int4_probe.CONFIGS[0]
    regs = int4_probe.loop_stats(
        int4_probe.compile_for(90, H, I, regs_cfg).asm["cubin"],
        2 * regs_cfg["BN"] * int4_probe.GROUP * regs_cfg["steps"] // (32 * regs_cfg["warps"]),
    )
    sixteen = next(c for c in probe.CONFIGS if c["rows"] == 16)
    forms = [f for f in probe.FORMS if not f.endswith("_persist")]  # persistence is the grid, not the cubin
    for cfg, form in [(probe.CONFIGS[0], f) for f in forms] + [(sixteen, f) for f in forms]:
        types, constexprs = probe.signature(form, E, H, I, cfg)
        compiled = probe.compile_for(probe.decode_ws, 90, constexprs, types, cfg["warps"], cfg["maxnreg"])
        summary = probe.kernel_summary(compiled)
        assert summary["warp_specialized"] and summary["worker_warps"] == [1] and summary["spill"] == 0
        assert summary["global_scratch"] == 128  # one descriptor, built on the device
        fmt, mats = form.split("/")[0], 1 if "down" in form else 2
        BK = probe.STEP_K[fmt]
        tile_row = 2 * BK if fmt == "bf16" else BK // 2  # bytes
        ptx = compiled.asm["ptx"]
        expect = re.findall(r"mbarrier\.arrive\.expect_tx\.shared\.b64 _, \[%r\d+\], (\d+);", ptx)
        assert expect and set(expect) == {
            str(mats * cfg["BN"] * tile_row)
        }  # the step's tile bytes, one arrival
        inits = re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], (\d+);", ptx)
        assert inits == ["1"] * (2 * cfg["stages"])
        arrive = ptx.index("mbarrier.arrive.shared::cta.b64")
        assert "bar.sync \t0, 128;" in ptx[arrive - 200 : arrive]  # all four consumer warps, then one arrival
        codes = mats * cfg["BN"] * BK // (32 * cfg["warps"])
        stats = int4_probe.loop_stats(compiled.asm["cubin"], codes, innermost=True)
        assert stats["hmma"] == mats * (cfg["BN"] // (16 * cfg["warps"])) * (BK // 16) * (cfg["rows"] // 8)
        if fmt == "int4" or (fmt == "mxfp4" and cfg["rows"] == 8):
            assert stats["register_moves"] == 0
        if cfg["rows"] == 8 and form == "int4/gate_up":
            assert stats["instructions_a_code"] <= regs["instructions_a_code"] * 1.05
        if cfg["rows"] == 8 and form == "mxfp4/gate_up":  # the folded decoder fed as it is
            launcher = int4_probe.launcher_gate_up("qwen3_next", 64, 90, "mxfp4")
            assert stats["instructions_a_code"] < 0.75 * launcher["instructions_a_code"]
    assert probe.main(["--compile-only", "--sm", "80"]) == 2
    assert probe.main(["--compile-only", "--forms", "fp8/down"]) == 2


def test_decode_ws_probe_smoke_pass_runs_its_own_forms() -> None:
    """The decode probe's smoke pass is ws_probe's, on its own forms and arguments: the tiny shape at 8 tokens
    first, then one child per (config, form) it had not reported if that hangs; no baseline is kept unasked."""
    probe = importlib.import_module("decode_ws_probe")
    ws_probe = importlib.import_module("ws_probe")
    calls: list[list[str]] = []

    def hangs_on_int4(args: list[str], timeout: float):  # type: ignore[no-untyped-def]
        calls.append(args)
        if "--forms" not in args:
            return "hung", [{"config": 0, "form": "bf16/gate_up", "ok": True}]
        index, form = int(args[args.index("--configs") + 1]), args[args.index("--forms") + 1]
        return (
            ("hung", [])
            if form == "int4/down_persist" and index == 1
            else ("ok", [{"config": index, "form": form, "ok": True}])
        )

    tiny = ("--shapes", "tiny", "--tokens", "8", "--check-only")
    keep, _rows = ws_probe.smoke(60, hangs_on_int4, len(probe.CONFIGS), probe.FORMS, (), tiny)
    assert calls[0] == list(tiny)
    assert len(calls) == 1 + len(probe.CONFIGS) * len(probe.FORMS) - 1
    assert keep == {(i, f) for i in range(len(probe.CONFIGS)) for f in probe.FORMS} - {
        (1, "int4/down_persist")
    }


def test_decode_probes_judge_each_row_against_its_expert_and_token() -> None:
    """The references the decode probes' GPU rows are judged by, built on the CPU: each block row's gate_up row
    is its token's x through its block's expert, each slot's down row its routing weight times its activation row
    through that expert, on the bf16 weights and on the int4 and mxfp4 codes' dequantized values (whose difference
    is the quantization's, far above the tolerance, so a kernel reading the wrong weights cannot pass)."""
    int4_probe = importlib.import_module("int4_decode_probe")
    probe = importlib.import_module("decode_ws_probe")
    from moetrt.op.quant import QuantizedWeight, dequantize

    E, K, H, I = probe.SHAPES["tiny"]  # noqa: E741
    case = int4_probe.make_case("tiny", 8, "cpu")
    down = probe.down_case("tiny", case)
    used = (case["row_slot"] >= 0).nonzero().flatten().tolist()
    assert len(used) == 8 * K == down["slots"]  # every slot has one block row
    w_gu = case["w"].float()
    w_gu_q = dequantize(
        "int4",
        int4_probe.GROUP,
        QuantizedWeight(case["codes"].view(E, 2 * I, H // 2), case["scales"].view(E, 2 * I, -1)),
        H,
    ).float()
    for r in used:
        slot, e = int(case["row_slot"][r]), int(case["block_expert"][r // int4_probe.TOKENS])
        token = slot // K
        assert int(case["row_token"][r]) == token
        x = case["x"][token].float()
        for weights, key in ((w_gu, "ref_bf16"), (w_gu_q, "ref_int4")):
            want = torch.nn.functional.silu(x @ weights[e, :I].T) * (x @ weights[e, I:].T)
            torch.testing.assert_close(case[key][r], want, rtol=1e-4, atol=1e-5)
        y = down["row_w"][r] * (down["act"][r].float() @ down["w"].view(E, H, I)[e].float().T)
        torch.testing.assert_close(down["ref_bf16"][slot], y, rtol=1e-4, atol=1e-5)
    probe.add_mxfp4("tiny", case, down)
    w_gu_mx = dequantize(
        "mxfp4",
        32,
        QuantizedWeight(case["codes_mxfp4"].view(E, 2 * I, H // 2), case["scales_mxfp4"].view(E, 2 * I, -1)),
        H,
    ).float()
    w_d_mx = dequantize(
        "mxfp4",
        32,
        QuantizedWeight(down["codes_mxfp4"].view(E, H, I // 2), down["scales_mxfp4"].view(E, H, -1)),
        I,
    ).float()
    for r in used:
        slot, e = int(case["row_slot"][r]), int(case["block_expert"][r // int4_probe.TOKENS])
        x = case["x"][slot // K].float()
        want = torch.nn.functional.silu(x @ w_gu_mx[e, :I].T) * (x @ w_gu_mx[e, I:].T)
        torch.testing.assert_close(case["ref_mxfp4"][r], want, rtol=1e-4, atol=1e-5)
        y = down["row_w"][r] * (down["act"][r].float() @ w_d_mx[e].T)
        torch.testing.assert_close(down["ref_mxfp4"][slot], y, rtol=1e-4, atol=1e-5)
    for refs in (case, down):
        for fmt in ("int4", "mxfp4"):
            gap = (refs[f"ref_{fmt}"] - refs["ref_bf16"]).norm() / refs["ref_bf16"].norm()
            assert gap > 0.05


def test_decode_ws_probe_baselines_match_their_reference_in_the_interpreter() -> None:
    """bench/decode_ws_probe.py's `tl` baselines (the launcher kernels' form on 16-row blocks) run under the CPU
    interpreter against the same references as its Gluon forms, through the mapping from the 8-row layout to the
    16-row one (T = 24 puts more than 8 rows on some experts: two 8-row blocks, one 16-row block); asked for a
    Gluon form there, it says in one line that the interpreter runs none and exits 2."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{BENCH}", "TRITON_INTERPRET": "1"}
    script = str(BENCH / "decode_ws_probe.py")
    done = subprocess.run(
        [sys.executable, script, "--shapes", "tiny", "--tokens", "1,24", "--configs", "0,3"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    probe = importlib.import_module("decode_ws_probe")
    assert sorted((r["T"], r["config"], r["form"]) for r in rows) == sorted(
        (t, c, f) for t in (1, 24) for c in (0, 3) for f in probe.BASELINE_FORMS
    )
    assert all(r["ok"] and 0 < r["rel_err"] <= 1e-2 for r in rows)
    refused = subprocess.run(
        [sys.executable, script, "--shapes", "tiny", "--forms", "int4/down"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().startswith(
        "error: the CPU interpreter runs no Gluon"
    )
    assert len(refused.stderr.strip().splitlines()) == 1
