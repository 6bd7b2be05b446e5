"""A vLLM-on-CPU bug the load bench found, fixed where the plugin loads (every vLLM process).

vLLM 0.32's model runner "rewinds" the random stream of a request whose sampled token it discards
(a prefill split over several engine steps samples a token it throws away) with
``generator.set_offset(generator.get_offset() - 4)``. That is the CUDA Philox generator's API; a CPU
generator raises ``RuntimeError: CPU Generator does not use offset``, and the engine dies. So one
well-formed request with a ``seed`` and a prompt that does not fit one step's token budget (a long
prompt, or any prompt on a busy server) stopped the whole CPU server (``bench/serve_load.py``).

The fix does what the rewind means: the generator states of those requests are saved before
sampling and put back after it, and the runner's own rewind skips them. A seeded request then draws
the same numbers whether or not its prefill was split, as on GPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def install() -> None:
    """Patch ``CPUModelRunner`` (idempotent; nothing to do off CPU or on a vLLM without the bug)."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # not a CPU build, or another vLLM layout
        return
    if getattr(CPUModelRunner._sample, "_eigenpatch", False) or not hasattr(CPUModelRunner, "_bookkeeping_sync"):
        return
    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        saved = {int(i): generators[int(i)].get_state() for i in discarded if int(i) in generators}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in saved.items():  # the discarded draw never happened
                generators[i].set_state(state)
            self._eigenpatch_rewound = tuple(saved)

    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        rewound = {i: generators.pop(i) for i in getattr(self, "_eigenpatch_rewound", ()) if i in generators}
        try:  # without them, the runner's set_offset loop has nothing to rewind
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(rewound)
            self._eigenpatch_rewound = ()

    _sample._eigenpatch = True  # type: ignore[attr-defined]
    CPUModelRunner._sample = _sample  # type: ignore[method-assign]
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync  # type: ignore[method-assign]
