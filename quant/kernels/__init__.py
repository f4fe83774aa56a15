"""Batch-1 (decode) matmul kernels that compute from packed weights.

:func:`prepare` turns a :class:`~quant.packed.PackedTensor` into a callable
``x (M, in) -> (M, out)`` once (repacking where a kernel needs its own layout);
:class:`~quant.modules.QuantLinear` calls it lazily for single-token inputs.
Prefill and evaluation keep dequantize-then-matmul, which is faster for many tokens.

Kernels register per packed layout and device (:func:`register_kernel`), so every format
declaring a layout gets its kernels: for ``affine-int`` (rtn, gptq) torch's CPU weight-only
int kernels (int4 for 2-4 bits, int8 one group at a time for 5-8 bits), a row-tiled path for
rows the int4 op cannot take, and a Triton kernel on CUDA (imported only when a CUDA tensor
asks for one). Every other layout takes the generic path, which decodes blocks of output rows.
"""

from __future__ import annotations

import importlib

from quant.kernels._registry import kernel_factory, register_kernel
from quant.kernels.cpu import GenericKernel, Int4Kernel, Int8Kernel, Kernel, RTNTiledKernel
from quant.packed import PackedTensor

__all__ = ["Kernel", "GenericKernel", "Int4Kernel", "Int8Kernel", "RTNTiledKernel", "prepare", "register_kernel"]

# Kernel modules of a device imported on its first tensor, so CPU machines never import triton.
_LAZY = {"cuda": "quant.kernels.triton"}


def prepare(packed: PackedTensor) -> Kernel:
    """The fastest kernel registered for ``packed``'s layout on its device, else the generic path."""
    from quant.formats import get_format  # lazy: quant.formats imports nothing from here, keep it so

    buffers = packed.buffers
    device = buffers["codes" if "codes" in buffers else next(iter(buffers))].device.type
    if device in _LAZY:
        importlib.import_module(_LAZY[device])
    factory = kernel_factory(get_format(packed.setting.format).layout, device)
    kernel = factory(packed) if factory is not None else None
    return kernel if kernel is not None else GenericKernel(packed)
