"""vLLM integration (plugin, factor-pair linear method, interventions): lands with the serving issue.

Imported as ``eigenpatch.serving``. It reads the checkpoint format from the core and never
imports ``eigenpatch.patchers``.
"""
