"""ONNX / TensorRT export and the ONNX Runtime runner: lands with the export issue.

Imported as ``eigenpatch.export``. A factor pair lowers to two MatMuls; nothing custom in the
graph. It reads the checkpoint format from the core and never imports ``eigenpatch.patchers``.
"""
