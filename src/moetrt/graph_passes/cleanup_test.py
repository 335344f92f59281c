"""Pass cleanup (onnxscript rewrite rules) on small textual models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from moetrt.graph_passes.cleanup import CleanupPass
from moetrt.graph_passes.testing import run_onnx

_MODEL = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1, 4] x) => (float[1, 4] y, float[1, 4] z) {
    one = Constant <value = int64[1] {1}> ()
    zero = Constant <value = int64[1] {0}> ()
    u = Unsqueeze (x, one)
    s = Squeeze (u, one)
    y = Relu (s)
    u2 = Unsqueeze (x, zero)
    z = Squeeze (u2, one)
}
"""


def test_squeeze_of_unsqueeze_removed_only_when_axes_match() -> None:
    proto = onnx.parser.parse_model(_MODEL)
    model = ir.serde.deserialize_model(proto)
    result = CleanupPass()(model)
    assert result.count == 1
    ops = [n.op_type for n in model.graph]
    assert ops.count("Squeeze") == 1 and ops.count("Unsqueeze") == 1  # the mismatched pair stays
    out = ir.serde.serialize_model(model)
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    for got, want in zip(run_onnx(out, {"x": x}), run_onnx(proto, {"x": x})):
        np.testing.assert_array_equal(got, want)


def test_no_match_no_change() -> None:
    proto = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 18]> g (float[2] x) => (float[2] y) { y = Relu (x) }'
    )
    model = ir.serde.deserialize_model(proto)
    result = CleanupPass()(model)
    assert result.count == 0 and not result.modified
