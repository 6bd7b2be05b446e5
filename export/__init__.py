"""ONNX export with a KV cache, verified against PyTorch, and the ONNX Runtime runner.

Imported as ``eigenpatch.export``. A factor pair lowers to two MatMuls; norms are fused into
ONNX Runtime's ops unless the export is ``portable``. It reads the checkpoint format from the
core and never imports ``eigenpatch.patchers``.
Needs the ``export`` extra (onnx, onnxruntime, onnxscript); importing this package does not.
"""

from eigenpatch.export.runtime import OnnxCausalLM

__all__ = ["OnnxCausalLM"]
