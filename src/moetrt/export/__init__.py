"""Model loading (demo models, Hugging Face directories, user modules) and ONNX export.

Submodules are imported explicitly (``moetrt.export.model_source``, ``moetrt.export.onnx_export``) so that
importing the package stays cheap.
"""
