"""vLLM integration: the ``vllm.general_plugins`` entry point (``plugin.py``), the factor-pair linear
method (``vllm_method.py``), tensor-parallel placement (``sharding.py``) and ``eigenpatch serve``
(``launcher.py``).

Imported as ``eigenpatch.serving``. Importing this package imports nothing from vLLM; only the
plugin and the method module do, inside vLLM's own processes. It reads the checkpoint format from
the core and never imports ``eigenpatch.patchers``.
"""
