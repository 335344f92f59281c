"""Target table: names and sm_XX → SM, precisions per SM, TensorRT-RTX buildability, one-line errors."""

from __future__ import annotations

import pytest

from moetrt.core.errors import MoetrtError
from moetrt.trt.targets import NAMED_TARGETS, RTX_SMS, resolve_target


@pytest.mark.parametrize(
    ("name", "sm"),
    [
        ("orin", 87),
        ("thor", 110),
        ("rtx40", 89),
        ("rtx50", 120),
        ("a100", 80),
        ("h100", 90),
        ("h200", 90),
        ("b200", 100),
        ("H100", 90),
        ("sm_90", 90),
        ("sm90", 90),
        ("sm_120", 120),
        ("sm_90a", 90),
        ("86", 86),
    ],
)
def test_resolve(name: str, sm: int) -> None:
    target = resolve_target(name)
    assert target.sm == sm
    assert target.compute_capability == divmod(sm, 10)


def test_default_target_depends_on_backend() -> None:
    assert resolve_target(None, "tensorrt").name == "h100"
    rtx_default = resolve_target(None, "tensorrt-rtx")
    assert rtx_default.sm in RTX_SMS


@pytest.mark.parametrize("name", ["h900", "sm_", "smxx", "", "gpu"])
def test_unknown_target_says_what_to_use(name: str) -> None:
    with pytest.raises(MoetrtError) as err:
        resolve_target(name)
    line = err.value.one_line()
    assert "unknown target" in line and "sm_XX" in line and "\n" not in line


def test_too_old_sm_is_refused() -> None:
    with pytest.raises(MoetrtError, match="older than TensorRT 10"):
        resolve_target("sm_61")


@pytest.mark.parametrize("name", list(NAMED_TARGETS))
def test_named_targets_precisions(name: str) -> None:
    target = resolve_target(name)
    assert set(target.precisions) == {"fp16", "bf16", "fp32"}  # every named target is Ampere or newer
    for precision in target.precisions:
        target.check_precision(precision)


def test_bf16_needs_sm80() -> None:
    turing = resolve_target("sm_75")
    assert turing.precisions == ("fp16", "fp32")
    with pytest.raises(MoetrtError) as err:
        turing.check_precision("bf16")
    assert "no bf16" in err.value.one_line() and "--precision fp16" in err.value.one_line()
    with pytest.raises(MoetrtError, match="unknown precision"):
        turing.check_precision("int4")


def test_rtx_backend_only_for_rtx_sms() -> None:
    resolve_target("rtx50").check_backend("tensorrt-rtx")
    resolve_target("a100").check_backend("tensorrt-rtx")
    for name in ("h100", "b200", "thor", "orin"):
        with pytest.raises(MoetrtError, match="TensorRT-RTX cannot build"):
            resolve_target(name).check_backend("tensorrt-rtx")
        resolve_target(name).check_backend("tensorrt")
    with pytest.raises(MoetrtError, match="unknown engine backend"):
        resolve_target("h100").check_backend("onnx")
