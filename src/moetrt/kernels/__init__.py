"""Kernels of the fused MoE op.

`plan` (pure Python, no Triton) decides variants, workspace layout and launches; `configs` holds the kernel-config
table; `triton_moe` holds the Triton source; `aot` compiles it to cubins per SM; `launcher` runs them with the CUDA
driver API (no Triton import at run time); `torch_ops` is the PyTorch entry point.
"""
