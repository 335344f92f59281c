"""Names of what moetrt writes: the files of a build directory and the ONNX metadata keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ONNX_NAME = "model.onnx"
PLAN_NAME = "model.plan"
MANIFEST_NAME = "manifest.json"
KERNELS_DIR = "kernels"
# Copied from a Hugging Face directory into a build directory as they are (`export.tokenizer_files`).
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG_NAME = "generation_config.json"

# ONNX metadata_props written by `moetrt export` and read by verify / build / run.
META_SOURCE = "moetrt.source"
META_DTYPE = "moetrt.dtype"
META_NUM_MOE_BLOCKS = "moetrt.num_moe_blocks"
META_LONG_SEQ = "moetrt.long_seq"
META_EXAMPLE_SHAPE = "moetrt.example_shape"
# Written by `moetrt fuse`: how many MoE blocks the file holds fused.
META_FUSED_MOE = "moetrt.fused_moe_blocks"
# Written by `moetrt fuse --weights`: the format the routed experts are stored in (absent: native).
META_EXPERT_WEIGHTS = "moetrt.expert_weights"

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


# The cached decoder's graph inputs and outputs (`export.cached`), named as onnxruntime-genai and Optimum name
# theirs. Each layer's state is two tensors: key/value for attention layers, conv/recurrent for linear ones.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
#: How the names of a wrapped causal LM's parameters start in the exported graph (both export wrappers hold the
#: model as `self.model`).
WRAPPED_PREFIX = "model."
KV_STATE, LINEAR_STATE = "kv", "linear"  # the layer kinds of a decoder's state
STATE_PARTS = {KV_STATE: ("key", "value"), LINEAR_STATE: ("conv", "recurrent")}
# Written by `moetrt export`: the state layout of a cached decoder (JSON list of `StateTensor` fields), and
# whether its logits cover the last position only.
META_STATE = "moetrt.state"
META_LAST_LOGITS = "moetrt.last_logits"


def state_names(layer: int, kind: str) -> list[tuple[str, str]]:
    """(past input, present output) names of one layer's state tensors."""
    return [(f"past_key_values.{layer}.{part}", f"present.{layer}.{part}") for part in STATE_PARTS[kind]]


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of a cached decoder: its input and output names, layer kind, shape (ints, or "batch" /
    "past" for the dynamic dims) and dtype name."""

    past: str
    present: str
    kind: str
    shape: tuple[int | str, ...]
    dtype: str
    layer: int

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StateTensor:
        return cls(
            past=str(data["past"]),
            present=str(data["present"]),
            kind=str(data["kind"]),
            shape=tuple(data["shape"]),  # type: ignore[arg-type]
            dtype=str(data["dtype"]),
            layer=int(data["layer"]),  # type: ignore[arg-type]
        )
