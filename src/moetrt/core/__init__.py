"""The bottom layer: facts every other package shares (errors, dtypes, tolerances, artifact names, SMs, file
and ONNX writing). It imports nothing else of moetrt, and its modules import nothing heavy at import time."""
