"""The fused MoE op: its contract (spec), PyTorch oracle (reference), kernels, AOT cubins, launcher, TensorRT glue."""
