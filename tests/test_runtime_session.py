"""`moetrt.runtime.load`: onnxruntime parity of fused models against the PyTorch reference, input checks, and
the Engine's refusals that happen before TensorRT is reached."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from moetrt_testing.single_op_model import single_moe_model

from moetrt.core.errors import MoetrtError
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.op.presets import like
from moetrt.op.reference import moe_reference, random_inputs
from moetrt.runtime import load, random_feeds
from moetrt.runtime.session import Session
from moetrt.trt.profiles import check_in_profile

HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
VARIANTS = {
    "softmax_renorm_shared": like("qwen3_next", 16, 4, 64, 32, output_router_logits=True),
    "deepseek_grouped": like(
        "deepseek_v3", 16, 4, 64, 32, n_group=4, topk_group=2, shared_intermediate_size=0
    ),
    "gpt_oss": like("gpt_oss_20b", 8, 2, 64, 64),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, torch.dtype], tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, attrs in VARIANTS.items():
        for dtype in HALF_AND_FLOAT:
            model, weights = single_moe_model(attrs, dtype, seed=7)
            path = root / f"{name}_{str(dtype)[6:]}.onnx"
            onnx.save(model, str(path))
            out[(name, dtype)] = (path, weights)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", list(HALF_AND_FLOAT), ids=lambda d: str(d)[6:])
def test_onnxruntime_parity(models: dict, variant: str, dtype: torch.dtype) -> None:
    attrs = VARIANTS[variant]
    path, weights = models[(variant, dtype)]
    session = load(path)
    assert isinstance(session, Session) and session.input_names == ["hidden_states"]
    for tokens in (1, 7, 64):
        x = random_inputs(attrs, tokens, dtype=dtype, seed=tokens)["hidden_states"]
        out = session({"hidden_states": x})
        ref = moe_reference({**weights, "hidden_states": x}, attrs)
        assert list(out) == list(attrs.present_outputs())
        for name, value in out.items():
            assert value.dtype == dtype and value.shape == ref[name].shape
            assert torch.isfinite(value.float()).all()
            assert relative_error(value, ref[name]) <= tolerance(dtype), (name, tokens)


def test_keyword_call_and_random_feeds(models: dict) -> None:
    path, _ = models[("gpt_oss", torch.float32)]
    session = load(path)
    feeds = random_feeds(session, batch=2, seq=5)
    assert feeds["hidden_states"].shape == (10, 64)
    by_kw = session(hidden_states=feeds["hidden_states"])
    assert torch.equal(by_kw["output"], session(feeds)["output"])
    assert random_feeds(session, tokens=3)["hidden_states"].shape == (3, 64)


def test_input_errors_say_what_to_pass(models: dict) -> None:
    path, _ = models[("gpt_oss", torch.float16)]
    session = load(path)
    with pytest.raises(MoetrtError, match="missing"):
        session({})
    with pytest.raises(MoetrtError, match="unknown"):
        session({"hidden_states": torch.randn(2, 64).half(), "extra": torch.zeros(1)})
    with pytest.raises(MoetrtError, match="float16"):
        session({"hidden_states": torch.randn(2, 64)})
    with pytest.raises(MoetrtError, match="dim 1 is 63"):
        session({"hidden_states": torch.randn(2, 63).half()})
    with pytest.raises(MoetrtError, match="rank"):
        session({"hidden_states": torch.randn(2, 3, 64).half()})


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(MoetrtError, match="does not exist"):
        load(tmp_path / "nothing.onnx")
    with pytest.raises(MoetrtError, match=r"neither model\.plan nor model\.onnx"):
        load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(MoetrtError, match="cannot tell"):
        load(tmp_path / "weights.bin")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(MoetrtError, match="is not a readable ONNX model"):
        load(tmp_path / "bad.onnx")


def test_plan_without_manifest_is_refused_before_tensorrt(tmp_path: Path) -> None:
    (tmp_path / "model.plan").write_bytes(b"ftrt" + bytes(64))
    with pytest.raises(MoetrtError, match=r"no manifest\.json"):
        load(tmp_path / "model.plan")


def test_token_count_outside_profile() -> None:
    profiles = [
        {
            "input": "input_ids",
            "axes": {"0": "batch", "1": "tokens"},
            "min": [1, 1],
            "opt": [1, 128],
            "max": [4, 4096],
        }
    ]
    check_in_profile(profiles, {"input_ids": [4, 4096]})
    with pytest.raises(MoetrtError) as err:
        check_in_profile(profiles, {"input_ids": [1, 5000]})
    line = err.value.one_line()
    assert "tokens = 5000 is outside the engine's profile 1..4096" in line and "--tokens" in line
    with pytest.raises(MoetrtError, match="batch = 5"):
        check_in_profile(profiles, {"input_ids": [5, 16]})
    with pytest.raises(MoetrtError, match="rank"):
        check_in_profile(profiles, {"input_ids": [16]})
