"""The fused MoE op: its contract (`spec`), PyTorch oracle (`reference`), ONNX function body
(`function_body`) and the benchmark's shapes (`presets`). Imports nothing of moetrt but `core`."""
