"""numeric_check: the float32 shadow of half-precision pieces, and the GLU classifier."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from moetrt.core.onnx_io import widen_to_fp32
from moetrt.passes.numeric_check import classify_glu, run_model

_BF16_MODEL = """
<ir_version: 10, opset_import: ["" : 18]>
g (bfloat16[2, 4] x) => (bfloat16[2, 4] y) {
    s = Sigmoid (x)
    f = Cast <to = 1> (s)
    b = Cast <to = 16> (f)
    y = Mul (x, b)
}
"""


def test_float32_widening_makes_a_bf16_model_runnable_in_float32() -> None:
    proto = onnx.parser.parse_model(_BF16_MODEL)
    shadow = widen_to_fp32(onnx.ModelProto.FromString(proto.SerializeToString()), "half")
    assert shadow.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(
        a.i == onnx.TensorProto.FLOAT for n in shadow.graph.node for a in n.attribute if a.name == "to"
    )
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(ml_dtypes.bfloat16).astype(np.float32)
    (got,) = run_model(shadow, {"x": x})
    np.testing.assert_allclose(got, x / (1 + np.exp(-x)), rtol=1e-6)


_GLU = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 8] gu) => (float[N, 4] y) {
    gate, up = Split <axis = 1, num_outputs = 2> (gu)
    SIG
    y = Mul (act, up)
}
"""
_ACTIVATIONS = {
    "silu_glu": "s = Sigmoid (gate)\n act = Mul (gate, s)",
    "gelu_glu": "act = Gelu (gate)",
    "gelu_tanh_glu": 'act = Gelu <approximate = "tanh"> (gate)',
    None: "act = Relu (gate)",  # not a GLU the op covers
}


@pytest.mark.parametrize("activation", list(_ACTIVATIONS), ids=str)
def test_classify_glu_names_the_activation_or_refuses(activation: str | None) -> None:
    proto = onnx.parser.parse_model(
        _GLU.replace("SIG", _ACTIVATIONS[activation]).replace(
            '<ir_version: 10, opset_import: ["" : 18]>', '<ir_version: 10, opset_import: ["" : 20]>'
        )
    )
    model = ir.serde.deserialize_model(proto)
    nodes = list(model.graph)
    order = {n: i for i, n in enumerate(nodes)}
    form = classify_glu(set(nodes), [model.graph.inputs[0]], model.graph.outputs[0], [8], order, {"": 20})
    if activation is None:
        assert form is None
    else:
        assert form is not None and form.activation == activation and form.layout == "halves"
