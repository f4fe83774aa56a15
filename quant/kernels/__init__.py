"""Batch-1 (decode) matmul kernels that compute from packed weights.

:func:`prepare` turns a :class:`~quant.packed.PackedTensor` into a callable
``x (M, in) -> (M, out)`` once (repacking where a kernel needs its own layout);
:class:`~quant.modules.QuantLinear` calls it lazily for single-token inputs.
Prefill and evaluation keep dequantize-then-matmul, which is faster for many tokens.

Backends: torch's CPU weight-only int kernels for rtn's layout (rtn, gptq: int4 for
2-4 bits, int8 one group at a time for 5-8 bits), a Triton kernel for rtn on CUDA
(imported only when a CUDA tensor asks for it), a row-tiled path for rtn rows the int4
op cannot take, and a generic path for every format that decodes blocks of output rows
at a time.
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
