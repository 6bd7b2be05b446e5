"""The ``vllm.general_plugins`` entry point: teaches every vLLM process the eigenpatch format.

vLLM runs general plugins in each of its processes (API server, engine core, workers), possibly
several times; ``register`` is idempotent and cheap: it imports the method module (which imports
only vLLM's Python layer classes, no device init) and registers it under ``"eigenpatch"``, and
wraps the model loader so hidden-state interventions are attached (``vllm_interventions``), and
installs per-request steering (``vllm_steering``: admission checks always, token routing when the
server was given vectors); on CPU it also fixes a vLLM bug that let one seeded request stop the
engine (``vllm_cpu_fixes``).
``EIGENPATCH_VLLM_PLUGIN=0`` disables it, for a vLLM install shared with other projects.
"""

from __future__ import annotations

import os

from eigenpatch.format import QUANT_METHOD


def register() -> None:
    if os.environ.get("EIGENPATCH_VLLM_PLUGIN", "1") == "0":
        return
    from vllm.model_executor.layers.quantization import get_quantization_config, register_quantization_config

    from eigenpatch.serving.vllm_interventions import install
    from eigenpatch.serving.vllm_method import EigenpatchVllmConfig

    install()  # hidden-state interventions: attached to decoder layers when the model is created
    from eigenpatch.serving import vllm_steering

    vllm_steering.install_frontend()  # per-request steering: validated (400) and cache-salted at admission
    if vllm_steering.configured_vectors():
        vllm_steering.install_worker()  # ... and routed to tokens before each forward
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from eigenpatch.serving import vllm_cpu_fixes

        vllm_cpu_fixes.install()  # seeded requests whose prefill is split over steps
    try:
        if get_quantization_config(QUANT_METHOD) is EigenpatchVllmConfig:
            return
    except ValueError:  # not registered yet
        pass
    register_quantization_config(QUANT_METHOD)(EigenpatchVllmConfig)
