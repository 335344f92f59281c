"""Measuring on a GPU: the kernel-config tuner, the CUDA-graph timer and ceilings (`timing`), the floors of
one MoE call (`floors`) and real-size GPU workloads (`gpu_workload`). Used by `moetrt tune` and bench/."""
