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

# Node metadata_props. The exporter's module scopes of a node: a Python-literal list of the module paths from
# the root down (the deepest is the module that ran the node), then the node's own name. The fusion gives its
# nodes the scopes of the MoE block they replace, so a fused block still names its module.
NODE_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def node_scopes(metadata_value: str) -> list[str]:
    """The module paths of a `NODE_NAME_SCOPES` value, root ("") first, the node's own name dropped."""
    import ast

    try:
        scopes = ast.literal_eval(metadata_value)
    except (ValueError, SyntaxError):
        return []
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return []
    if not scopes or scopes[0] != "":  # shape bookkeeping the exporter adds outside any module
        return []
    return scopes[:-1]


def external_data_name(onnx_file_name: str) -> str:
    """The one external-data file that sits beside a model over the 2 GB protobuf limit."""
    return f"{onnx_file_name}.data"
