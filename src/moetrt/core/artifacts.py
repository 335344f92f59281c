"""Names of what moetrt writes: the files of a build directory and the ONNX metadata keys."""

from __future__ import annotations

ONNX_NAME = "model.onnx"
PLAN_NAME = "model.plan"
MANIFEST_NAME = "manifest.json"
KERNELS_DIR = "kernels"

# ONNX metadata_props written by `moetrt export` and read by verify / build / run.
META_SOURCE = "moetrt.source"
META_DTYPE = "moetrt.dtype"
META_NUM_MOE_BLOCKS = "moetrt.num_moe_blocks"
META_LONG_SEQ = "moetrt.long_seq"
META_EXAMPLE_SHAPE = "moetrt.example_shape"
# Written by `moetrt fuse`: how many MoE blocks the file holds fused.
META_FUSED_MOE = "moetrt.fused_moe_blocks"


def external_data_name(onnx_file_name: str) -> str:
    """The one external-data file that sits beside a model over the 2 GB protobuf limit."""
    return f"{onnx_file_name}.data"
