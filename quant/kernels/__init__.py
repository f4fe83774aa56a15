"""Batch-1 (decode) matmul kernels that compute from packed weights.

:func:`prepare` turns a :class:`~quant.packed.PackedTensor` into a callable
``x (M, in) -> (M, out)`` once (repacking where a kernel needs its own layout);
:class:`~quant.modules.QuantLinear` calls it lazily for single-token inputs.
Prefill and evaluation keep dequantize-then-matmul, which is faster for many tokens.

Backends: torch's CPU weight-only int kernels for rtn 4-bit and 8-bit per channel,
a Triton kernel for rtn on CUDA (imported only when a CUDA tensor asks for it), and a
row-tiled path for rtn at other widths (one-byte codes) and a generic path for every
format that decodes blocks of output rows at a time.
"""

from __future__ import annotations

import torch

from quant.kernels.cpu import GenericKernel, Int4Kernel, Int8Kernel, Kernel, RTNTiledKernel, prepare_cpu
from quant.packed import PackedTensor

__all__ = ["Kernel", "GenericKernel", "Int4Kernel", "Int8Kernel", "RTNTiledKernel", "prepare"]


def prepare(packed: PackedTensor) -> Kernel:
    """The fastest kernel available for ``packed`` on its device."""
    if packed.buffers["codes" if "codes" in packed.buffers else next(iter(packed.buffers))].is_cuda:
        from quant.kernels.triton import prepare_cuda  # lazy: CPU machines need no triton

        kernel = prepare_cuda(packed)
        if kernel is not None:
            return kernel
        return GenericKernel(packed)
    return prepare_cpu(packed)
