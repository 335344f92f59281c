"""moetrt: export Mixture-of-Experts LLMs to ONNX with one fused MoE op per block, build TensorRT engines."""

__version__ = "0.1.0"
