"""Triton GPU kernel for the ``affine-int`` layout (rtn, gptq): unpack codes, scale/offset, tensor-core matmul.

Imported only when a CUDA tensor asks for a kernel (see :func:`quant.kernels.prepare`),
so CPU machines never need triton. It reads the stored buffers as they are (no
repacking): codes in the lsb-first layout of :mod:`quant.packing`, fp16 ``scale``
and ``offset`` of shape ``(out, n_groups)``, and accumulates in float32.
"""

from __future__ import annotations

import torch

from quant.formats._affine import AFFINE_INT
from quant.kernels._registry import register_kernel
from quant.kernels.cpu import Kernel
from quant.packed import PackedTensor
from quant.primitives import padded_in_features

__all__ = ["TritonRTNKernel", "affine_int_cuda", "available"]

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: prepare_cuda answers None, callers fall back
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _affine_matmul(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr,
                    M, N, K, K_P, N_GROUPS, GROUP, N_BYTES,
                    BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: a BLOCK_N x BLOCK_K weight tile is decoded once per K step and multiplied
        # with BLOCK_M activation rows on the tensor cores, so a batch of M rows reads the packed
        # weight once per BLOCK_M rows, not once per row. Batch 1 pads M to BLOCK_M (16, the
        # smallest tl.dot): the padding costs tensor-core time, which is idle in a GEMV anyway.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        row_ok = rows < N
        m_ok = ms < M
        row_bit = rows.to(tl.int64) * K_P * BITS  # int64: a large head exceeds 2**31 bits
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            col_ok = cols < K
            x = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
            # Code i of a row sits at bit i * BITS of its byte stream: at most two bytes hold it.
            bit = row_bit[:, None] + (cols * BITS)[None, :]  # (BN, BK)
            byte = bit // 8
            shift = (bit % 8).to(tl.int32)
            ok = row_ok[:, None] & col_ok[None, :]
            lo = tl.load(codes_ptr + byte, mask=ok, other=0).to(tl.int32)
            if (8 % BITS) == 0:  # 1, 2, 4, 8 bits: a code never straddles two bytes
                q = (lo >> shift) & ((1 << BITS) - 1)
            else:
                hi = tl.load(codes_ptr + byte + 1, mask=ok & (byte + 1 < N_BYTES), other=0).to(tl.int32)
                q = (((hi << 8) | lo) >> shift) & ((1 << BITS) - 1)
            g = rows[:, None] * N_GROUPS + cols[None, :] // GROUP
            s = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)  # masked: s = 0, so w = 0
            if HAS_OFFSET:
                o = tl.load(offset_ptr + g, mask=ok, other=0.0).to(tl.float32)
                w = q.to(tl.float32) * s + o
            else:
                w = (q - (1 << (BITS - 1))).to(tl.float32) * s
            # tf32x3: three tf32 products, fp32-accurate; the GEMV is bound by memory, not by them.
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="tf32x3")
        tl.store(y_ptr + ms[:, None] * N + rows[None, :], acc, mask=m_ok[:, None] & row_ok[None, :])


class TritonRTNKernel(Kernel):
    """The affine-int layout (rtn, gptq) at any width 2..8 and group size (per channel too), on CUDA, any batch."""

    def __init__(self, packed: PackedTensor, block_n: int = 32, block_k: int = 128):
        self.packed = packed
        out_features, in_features = packed.shape
        self.in_p = padded_in_features(in_features, packed.setting.group_size)
        self.group = packed.setting.group_size or in_features
        self.block_n, self.block_k = block_n, block_k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        b = self.packed.buffers
        out_features, in_features = self.packed.shape
        x = x.float().contiguous()
        m = x.shape[0]
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        y = torch.empty(m, out_features, device=x.device, dtype=torch.float32)
        offset = b.get("offset")
        grid = (triton.cdiv(out_features, self.block_n), triton.cdiv(m, block_m))
        _affine_matmul[grid](x, b["codes"], b["scale"], b["scale"] if offset is None else offset, y,
                          m, out_features, in_features, self.in_p, b["scale"].shape[1], self.group,
                          b["codes"].numel(), BITS=self.packed.setting.bits, HAS_OFFSET=offset is not None,
                          BLOCK_M=block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
        return y


@register_kernel(AFFINE_INT, "cuda")
def affine_int_cuda(packed: PackedTensor) -> Kernel | None:
    """The Triton kernel for the affine-int layout without outliers; None when it does not apply (or no triton)."""
    if not available() or "outlier_idx" in packed.buffers:
        return None
    return TritonRTNKernel(packed)
