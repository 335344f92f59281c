"""TensorRT glue for the fused MoE op: the `IPluginV3` (plugin.py) over pure, tested rules (fields, io_rules)."""

from moetrt.trt.fields import PluginState, state_from_fields, state_to_fields
from moetrt.trt.plugin import register_plugin

__all__ = ["PluginState", "register_plugin", "state_from_fields", "state_to_fields"]
