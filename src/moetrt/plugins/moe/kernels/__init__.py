"""Kernels of the fused MoE op.

`plan` (pure Python, no Triton) decides variants, workspace layout and launches; `triton_moe` holds the Triton
source. The launcher imports only `plan`, so nothing here pulls Triton in at run time.
"""
