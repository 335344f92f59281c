"""`verify` explains its failures: routing flips at near-ties (named, judged against the reference routed like
the artifact), `--per-layer` (the first layer out of tolerance), and the dtype's own error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, invoke
from onnx import numpy_helper

from moetrt.export.onnx_export import export_onnx
from moetrt.passes.pipeline import fuse_file
from moetrt.verify.compare import VerifyReport, VerifyRow
from moetrt.verify.diagnose import Diagnosis, LayerError, RoutingFlip, apply_diagnoses
from moetrt.verify.model import verify
from moetrt.verify.probes import write_probed_model

DATA = Path(__file__).parent / "data" / "custom_moe.py"
NEAR_TIE = f"module:{DATA}:make_near_tie_moe"
# Shapes with enough tokens (2048 and 1024) that some meet two experts at the top-k boundary within the
# rounding of the fp16 linear layer before the MoE block (checked below: the plain rows fail).
MANY_TOKENS = [(8, 256), (4, 256)]


def _fused(tmp_path: Path, spec: str, dtype: str) -> Path:
    exported, fused = tmp_path / "m.onnx", tmp_path / "f.onnx"
    export_onnx(spec, exported, dtype=dtype)
    fuse_file(exported, fused)
    return fused


@pytest.fixture(scope="module")
def near_tie_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fused(tmp_path_factory.mktemp("near_tie"), NEAR_TIE, "fp16")


def test_near_tie_flips_are_named_and_judged_against_the_reference_routed_like_the_artifact(
    near_tie_fp16: Path,
) -> None:
    report = verify(near_tie_fp16, shapes=MANY_TOKENS)
    assert report.passed, report.format_table()
    rerouted = [row for row in report.rows if "routed like the artifact" in row.note]
    assert rerouted, "no row needed re-routing: the test lost its near-ties"
    for row in rerouted:
        plain = float(row.note.rsplit(": ", 1)[1])
        assert plain > row.tolerance  # the plain comparison failed...
        assert row.rel_err <= row.tolerance  # ...the routed-alike one is within the fp16 bound
    text = report.format_table()
    assert "routed differently from the reference" in text
    assert "(near-tie)" in text and "NOT a near-tie" not in text
    assert "1 token (batch" in text and "margin" in text


def test_a_wrong_expert_weight_fails_and_per_layer_names_the_moe_block(tmp_path: Path) -> None:
    fused = _fused(tmp_path, NEAR_TIE, "fp32")
    model = onnx.load(fused)
    moe = next(node for node in model.graph.node if node.op_type == "MoE")
    down_name = moe.input[3]  # hidden, router weight, gate_up, down
    for index, init in enumerate(model.graph.initializer):
        if init.name == down_name:
            broken = numpy_helper.to_array(init) * np.float32(1.05)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(broken, down_name))
    onnx.save(model, fused)

    report = verify(fused, shapes=[(2, 16)], per_layer=True)
    assert not report.passed
    text = report.format_table()
    assert "layer 2x16 0 [Linear]: rel err" in text and "PASS" in text.split("layer 2x16 0 [Linear]")[1][:40]
    assert "first layer out of tolerance at 2x16: 1 [MoE block (TinyMoE)]" in text
    assert "routed differently" not in text  # the router is intact: no flips are invented


def test_per_layer_covers_attention_linear_attention_and_moe_blocks(tmp_path: Path) -> None:
    fused = _fused(tmp_path, "demo:qwen3_next", "fp32")
    report = verify(fused, shapes=[(1, 9)], per_layer=True)
    assert report.passed, report.format_table()
    text = report.format_table()
    for module, kind in [
        ("model.model.layers.0.linear_attn", "linear attention"),
        ("model.model.layers.0.mlp", "MoE block"),
        ("model.model.layers.1.self_attn", "attention"),
        ("model.model.layers.1.mlp", "MoE block"),
    ]:
        line = next(line for line in text.splitlines() if line.startswith(f"layer 1x9 {module} "))
        assert kind in line and line.endswith("PASS")
        assert float(line.split("rel err ")[1].split()[0]) <= 1e-5
    assert "every layer output within tolerance at 1x9" in text


def test_probed_copy_adds_outputs_and_leaves_the_artifact_alone(near_tie_fp16: Path, tmp_path: Path) -> None:
    before = near_tie_fp16.read_bytes()
    probed = write_probed_model(near_tie_fp16, tmp_path, ["0", "1"])
    assert near_tie_fp16.read_bytes() == before
    (block,) = probed.fused_blocks
    assert block.module == "1" and block.attrs.top_k == 8
    outputs = {o.name for o in onnx.load(probed.path).graph.output}
    assert {block.hidden_output, block.ids_output} <= outputs
    assert probed.module_outputs["0"] and set(probed.module_outputs["0"]) <= outputs


def _flip(margin: float, perturbation: float) -> RoutingFlip:
    return RoutingFlip((1, 4), "model.layers.3.mlp", (0, 2), (1, 5), (1, 6), margin, perturbation)


def test_flip_is_a_near_tie_only_within_the_perturbation() -> None:
    assert _flip(1e-6, 2e-6).near_tie
    assert not _flip(3e-2, 2e-6).near_tie
    assert "reference experts [5], artifact [6]" in _flip(3e-2, 2e-6).describe()
    assert "NOT a near-tie" in _flip(3e-2, 2e-6).describe()


def _report(rel_err: float) -> VerifyReport:
    report = VerifyReport("a.onnx", "demo:x", "fp16")
    report.rows.append(VerifyRow((1, 4), "logits", 0.1, rel_err, 5e-3, rel_err <= 5e-3))
    return report


def test_a_real_routing_disagreement_is_never_rerouted() -> None:
    report = _report(4e-2)
    apply_diagnoses(report, [Diagnosis((1, 4), flips=[_flip(3e-2, 2e-6)])])
    assert not report.passed
    assert "0 at near-ties" in report.format_table()


def test_dtype_finding_says_whether_pytorch_itself_misses_the_float32_run() -> None:
    own = _report(2e-2)
    apply_diagnoses(own, [Diagnosis((1, 4), torch_in_dtype_error={"logits": 1.5e-2})])
    assert "PyTorch itself in fp16 misses its float32 run by rel err 1.50e-02" in own.format_table()
    added = _report(2e-2)
    apply_diagnoses(added, [Diagnosis((1, 4), torch_in_dtype_error={"logits": 1e-3})])
    assert "the artifact adds the error" in added.format_table()
    assert not own.passed and not added.passed  # an explanation is not a pass


def test_first_bad_layer_is_the_first_in_run_order() -> None:
    layers = [
        LayerError((1, 4), "layers.0.attn", "attention", 1e-4, 5e-3),
        LayerError((1, 4), "layers.0.mlp", "MoE block", 9e-3, 5e-3),
        LayerError((1, 4), "layers.1.attn", "attention", 2e-2, 5e-3),
    ]
    assert Diagnosis((1, 4), layers=layers).first_bad_layer is layers[1]


def test_per_layer_with_engine_is_refused() -> None:
    code, _, err = invoke("verify", "x.plan", "--engine", "--per-layer")
    assert_one_line_error(code, err, "--per-layer", "--engine")
