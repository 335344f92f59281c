"""Pass cleanup (onnxscript rewrite rules) on small textual models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
from moetrt_testing.graphs import run_onnx

from moetrt.passes.cleanup import CleanupPass

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


_SELECT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[3, 1, 4] x, float[3, 2, 4] w) => (float[3, 4] y, float[3, 4] z) {
    zero = Constant <value = int64 {0}> ()
    y = Gather <axis = 1> (x, zero)
    z = Gather <axis = 1> (w, zero)
}
"""


def test_select_of_singleton_axis_becomes_squeeze() -> None:
    proto = onnx.parser.parse_model(_SELECT)
    model = ir.serde.deserialize_model(proto)
    result = CleanupPass()(model)
    assert result.count == 1
    ops = [n.op_type for n in model.graph if n.op_type != "Constant"]
    assert sorted(ops) == ["Gather", "Squeeze"]  # the gather over an axis of size 2 is a real gather: kept
    out = ir.serde.serialize_model(model)
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.standard_normal((3, 1, 4)).astype(np.float32),
        "w": rng.standard_normal((3, 2, 4)).astype(np.float32),
    }
    for got, want in zip(run_onnx(out, feeds), run_onnx(proto, feeds)):
        np.testing.assert_array_equal(got, want)


_EINSUM = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[5, 4] x, float[5, 2, 3, 4] w, float[5, 2, 3] a, float[5, 2, 4, 3] v, float[4, 5] p, float[5, 4] q)
    => (float[5, 2, 3] y, float[5, 2, 4] z, float[4, 4] t) {
    y = Einsum <equation = "th,tkih->tki"> (x, w)
    z = Einsum <equation = "tki,tkhi->tkh"> (a, v)
    t = Einsum <equation = "ij,jk->ik"> (p, q)
}
"""


def test_einsum_batched_matvec_becomes_matmul() -> None:
    proto = onnx.parser.parse_model(_EINSUM)
    model = ir.serde.deserialize_model(proto)
    result = CleanupPass()(model)
    assert result.count == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("Einsum") == 1 and ops.count("MatMul") == 2  # a plain matrix product is left alone
    out = ir.serde.serialize_model(model)
    rng = np.random.default_rng(2)
    feeds = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in proto.graph.input
    }
    for got, want in zip(run_onnx(out, feeds), run_onnx(proto, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
