"""Parity against PyTorch: `verify` (an ONNX file or MODEL), `verify_loaded` (what `runtime.load` runs), and
the one comparator they share (`compare`)."""
