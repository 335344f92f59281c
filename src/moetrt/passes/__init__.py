"""Graph passes: fuse each MoE block of an exported ONNX model into one `moetrt::MoE` op.

Public API: `fuse_model`, `fuse_file`, `decompose_model`, `FuseResult`; the function body of one variant is
`moetrt.op.function_body.make_moe_function`.
"""

from moetrt.passes.base import PassStat, UnfusedCandidate
from moetrt.passes.decompose import decompose_model
from moetrt.passes.pipeline import FuseResult, fuse_file, fuse_model

__all__ = ["FuseResult", "PassStat", "UnfusedCandidate", "decompose_model", "fuse_file", "fuse_model"]
