"""Block-local refinement: train a few of a layer's tensors so its output matches the dense layer's.

After a transform has replaced a layer's Linears by cheaper modules, each layer's output on its
*propagated* inputs can still be pulled towards the dense stream's next hidden states, on the
calibration windows the engine already holds: Adam on the given parameters only, everything else
frozen. It is what AA-SVD and block-wise reconstruction (BRECQ, OmniQuant)
do per block; here it costs ``steps`` forward/backward passes of one layer.

The error before and after is measured on the first :data:`ERROR_BATCHES` batches, and the
parameters are put back when it did not drop, so a refinement never makes a layer worse on
the data it is judged by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eigenpatch.calibration import trainable_only
from eigenpatch.engine.streams import LayerStep, call_layer

#: Batches on which refinement's before / after error is measured (to keep its result or undo it):
#: on all 32 of the default windows, the two measurements cost 5 of a layer's 42 s (SmolLM2).
ERROR_BATCHES = 8


def refine_parameters(
    step: LayerStep, params: list[nn.Parameter], steps: int, lr: float, scaled: list[nn.Parameter] | None = None
) -> dict[str, float]:
    """Adam on ``params`` (tensors of ``step.layer``) for ``steps`` batches; returns the mean squared
    error against the dense outputs before and after (see the module docstring).

    ``scaled`` tensors train too, each with its own step size ``lr`` times its mean magnitude: Adam's
    steps are about ``lr`` in absolute terms, right for factors of order one and far too big for a
    quantizer's scales (about ``1e-2``)."""
    scaled = scaled or []
    targets = step.dense_outputs()

    def error() -> float:
        pairs = list(zip(step.inputs, step.kwargs, targets, strict=True))[:ERROR_BATCHES]
        return sum(F.mse_loss(call_layer(step.layer, h, kw), t).item() for h, kw, t in pairs) / len(pairs)

    everything = [*params, *scaled]
    before, saved = error(), [p.detach().clone() for p in everything]
    groups = [{"params": params}] if params else []
    groups += [{"params": [p], "lr": lr * float(p.detach().abs().mean().clamp_min(1e-12))} for p in scaled]
    optimizer = torch.optim.Adam(groups, lr=lr)
    with trainable_only(step.layer, everything), torch.enable_grad():
        for i in range(steps):
            b = i % len(targets)
            out = step.layer(step.inputs[b], **step.kwargs[b])
            loss = F.mse_loss(out[0] if isinstance(out, tuple) else out, targets[b])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    after = error()
    if not after < before:
        with torch.no_grad():
            for p, s in zip(everything, saved, strict=True):
                p.copy_(s)
        after = before
    return {"before": before, "after": after}
