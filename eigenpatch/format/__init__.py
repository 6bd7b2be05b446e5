"""The eigenpatch checkpoint format: every name a runtime needs to read a patched checkpoint.

This package is the contract between the transforms that write checkpoints
(``eigenpatch.patchers``) and the runtimes that read them (transformers through
:mod:`eigenpatch.format.checkpoint`, ``eigenpatch.serving`` for vLLM, ``eigenpatch.export`` for
ONNX). Runtimes import this package and never a transform. ``docs/FORMAT.md`` describes it for
people; each constant below is defined here once and nowhere else.

- :mod:`~eigenpatch.format.lowrank`, :mod:`~eigenpatch.format.structured`,
  :mod:`~eigenpatch.format.quantized`, :mod:`~eigenpatch.format.corrected`,
  :mod:`~eigenpatch.format.interventions`: the modules a
  checkpoint stores;
- :mod:`~eigenpatch.format.steering`: the steering-vector file and its fingerprint;
- :mod:`~eigenpatch.format.checkpoint`: ``quantization_config``, the transformers quantizer,
  :func:`~eigenpatch.format.checkpoint.save` / :func:`~eigenpatch.format.checkpoint.load`.

Importing this package imports nothing heavy (vLLM's processes read these names early).
"""

from __future__ import annotations

#: ``config.json["quantization_config"]["quant_method"]``: the door transformers and vLLM open.
QUANT_METHOD = "eigenpatch"
#: The newest ``quantization_config.version`` this code reads. A checkpoint is written with the
#: oldest version that describes it: 2 only where a ``quantized_corrected`` layer stores its
#: correction at ``factor_bits`` 8 (int8 codes a v1 reader would misread), else 1.
FORMAT_VERSION = 2
#: Written next to the weights: parameter counts, bytes, timings of the run that made the folder.
REPORT_FILE = "eigenpatch_report.json"

#: Parameter names of a factor pair inside its module: a factorized Linear ``X`` stores
#: ``X.lowrank_down`` ``[r, in]`` and ``X.lowrank_up`` ``[out, r]`` (plus ``X.bias`` when the
#: original had one). The suffixes avoid the substrings vLLM uses to route fused shards
#: (``.up_proj``, ``.gate_proj``, ``.q_proj`` ...).
DOWN_NAME = "lowrank_down"
UP_NAME = "lowrank_up"

# -- layer kinds (``quantization_config.layers[name]["kind"]``) ----------------------------------
LOWRANK = "lowrank"
LOWRANK_SHARED = "lowrank_shared"
BLOCKDENSE = "blockdense"
BLOCKSHUFFLE = "blockshuffle"
#: A Linear stored as group-wise integer codes (:mod:`eigenpatch.format.quantized`).
QUANTIZED = "quantized"
#: A factor pair whose two factors are quantized Linears (``--compress`` with ``--bits``).
LOWRANK_QUANTIZED = "lowrank_quantized"
#: A quantized Linear plus a low-rank correction of its rounding error (:mod:`eigenpatch.format.corrected`).
QUANTIZED_CORRECTED = "quantized_corrected"
#: Kinds made of quantized Linears: vLLM runs them through the quantized linear method.
QUANTIZED_KINDS = (QUANTIZED, LOWRANK_QUANTIZED, QUANTIZED_CORRECTED)
#: Kinds whose forward is ``up (down x)``: vLLM runs them through the factor-pair linear method.
FACTOR_KINDS = (LOWRANK, LOWRANK_SHARED)
#: Kinds with block-diagonal stages: vLLM runs them through the block linear method.
BLOCK_KINDS = (BLOCKDENSE, BLOCKSHUFFLE)
STRUCTURED_KINDS = (LOWRANK_SHARED, BLOCKDENSE, BLOCKSHUFFLE)
LAYER_KINDS = (LOWRANK, *STRUCTURED_KINDS, *QUANTIZED_KINDS)

# -- intervention kinds (``quantization_config.interventions[name]["kind"]``) --------------------
PROJECT = "project"
SHIFT = "shift"
SNAP = "snap"
INTERVENTION_KINDS = (PROJECT, SHIFT, SNAP)
#: Kinds that leave token-id inputs unchanged: they act only on embeddings passed in directly
#: (``inputs_embeds``, vLLM's ``prompt_embeds``). A graph whose input is token ids (ONNX) omits them.
TOKEN_IDENTITY_KINDS = (SNAP,)
#: Hook points of an intervention on its decoder layer: on what enters it, or on what it returns.
HOOKS = ("pre", "post")

#: Tensors each kind stores under its module's name (``bias`` too, where the spec says so). A
#: ``lowrank_shared`` partner with ``down_from`` stores only ``lowrank_up``.
TENSORS: dict[str, tuple[str, ...]] = {
    LOWRANK: (DOWN_NAME, UP_NAME),
    LOWRANK_SHARED: (DOWN_NAME, UP_NAME),
    BLOCKDENSE: ("block_down", "block_up"),
    BLOCKSHUFFLE: ("shuffle_in", "shuffle_out"),
    QUANTIZED: ("qweight", "scales", "zeros"),
    LOWRANK_QUANTIZED: tuple(f"{f}.{t}" for f in (DOWN_NAME, UP_NAME) for t in ("qweight", "scales", "zeros")),
    QUANTIZED_CORRECTED: ("correction_down", "correction_up", "base.qweight", "base.scales", "base.zeros"),
    # at ``factor_bits`` 8 also ``correction_down_scale`` and ``correction_up_scale`` (fp16 row scales)
    PROJECT: ("center", "basis_in", "basis_out"),
    SHIFT: ("vector",),
    SNAP: (),  # reads the model's own embedding table
}

# -- the steering-vector file (:mod:`eigenpatch.format.steering`) --------------------------------
STEER_FILE_FORMAT = "eigenpatch-steer"
STEER_FILE_VERSION = 1
