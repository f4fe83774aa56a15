"""CPU decode kernels: torch's weight-only int kernels for the ``affine-int`` layout, a generic path.

Measured in this torch build (2.13, AVX2): ``_weight_int4pack_mm_for_cpu`` and
``_weight_int8pack_mm`` are vectorized for bfloat16 activations only; with float32
activations they run about 10x slower than a dense float32 ``F.linear``. So the int
kernels here take the activations (and the kernel's scale/zero table) in bfloat16 and
return float32: results match dequantize-then-matmul to bfloat16 precision (about
1e-3 of the output's magnitude), not to float32 precision. The generic path is exact
in float32.

The repacked weights are a runtime layout built once per module on first use; they
are not the stored checkpoint, whose size stays ``PackedTensor.nbytes``
(:attr:`Kernel.runtime_nbytes` reports the extra memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.formats._affine import AFFINE_INT
from quant.kernels._registry import register_kernel
from quant.packed import PackedTensor
from quant.packing import unpack_bits
from quant.primitives import padded_in_features

__all__ = ["Kernel", "GenericKernel", "Int4Kernel", "Int8Kernel", "RTNTiledKernel", "affine_int_cpu"]

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
TILE_FLOATS = 1 << 18  # tiled paths: decode ~1 MB of float32 weight at a time (fits in cache, few ops)


class Kernel:
    """``x (M, in) -> (M, out)`` from a packed weight; bias is added by the caller."""

    runtime_nbytes: int = 0  # extra memory of the runtime layout, beyond the packed buffers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GenericKernel(Kernel):
    """Any format: decode a block of output rows, multiply, move on.

    Peak extra memory is one tile of float32 rows, not the whole matrix; every
    registered format decodes selected rows without decoding the rest
    (``Format.dequantize_rows``).
    """

    def __init__(self, packed: PackedTensor, tile_rows: int | None = None):
        self.packed = packed
        out_features, in_features = packed.shape
        self.tile_rows = tile_rows or max(16, TILE_FLOATS // in_features)
        device = next(iter(packed.buffers.values())).device
        self._rows = torch.arange(out_features, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        out_features = self.packed.shape[0]
        y = x.new_empty(x.shape[0], out_features, dtype=torch.float32)
        xf = x.float()
        for start in range(0, out_features, self.tile_rows):
            rows = self._rows[start:start + self.tile_rows]
            w = self.packed.dequantize_rows(rows)  # (T, in) float32
            torch.matmul(xf, w.t(), out=y[:, start:start + rows.numel()])
        return y


def _int_codes(packed: PackedTensor) -> torch.Tensor:
    """``(out, in_p)`` int32 codes of an affine-int tensor (in_p: padded to whole groups)."""
    out_features, in_features = packed.shape
    in_p = padded_in_features(in_features, packed.setting.group_size)
    codes = unpack_bits(packed.buffers["codes"], packed.setting.bits, out_features * in_p)
    return codes.view(out_features, in_p).to(torch.int32)


def _scale_zero(packed: PackedTensor, mid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(out, G)`` scale and zero with ``w = (q - mid) * scale + zero``."""
    scale = packed.buffers["scale"].float()
    offset = packed.buffers.get("offset")
    if offset is None:  # symmetric: w = (q - 2**(b-1)) * scale, and mid == 2**(b-1)
        return scale, torch.zeros_like(scale)
    return scale, offset.float() + mid * scale  # q * s + o == (q - mid) * s + (o + mid * s)


class RTNTiledKernel(Kernel):
    """The affine-int layout (rtn, gptq) at 2-4 bits on a row count the int4 op cannot take (not a
    multiple of 16): one-byte codes, decoded per row tile.

    The stored codes are unpacked once to one byte per weight (a quarter of float32),
    so each tile is two ops to decode (``q * scale + zero``) and one matmul, instead of
    the bit-level unpack of ``dequantize_rows``; float32-exact like the generic path.
    """

    def __init__(self, packed: PackedTensor, tile_rows: int | None = None):
        out_features, in_features = packed.shape
        self.in_features = in_features
        codes = _int_codes(packed).to(torch.uint8)  # (N, in_p)
        mid = 2 ** (packed.setting.bits - 1)
        scale, zero = _scale_zero(packed, mid)
        if "offset" in packed.buffers:  # keep q * s + o: the exact expression dequantize uses
            zero = packed.buffers["offset"].float()
        # Symmetric decodes (q - mid) * s: the codes are shifted in float per tile.
        self.mid = None if "offset" in packed.buffers else mid
        self.codes = codes.view(out_features, scale.shape[1], -1)  # (N, G, g)
        self.scale, self.zero = scale.unsqueeze(-1), zero.unsqueeze(-1)  # (N, G, 1)
        self.tile_rows = tile_rows or max(16, TILE_FLOATS // self.codes[0].numel())
        self.runtime_nbytes = self.codes.numel() + 8 * scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        n = self.codes.shape[0]
        y = x.new_empty(x.shape[0], n, dtype=torch.float32)
        xf = x.float()
        for start in range(0, n, self.tile_rows):
            end = min(n, start + self.tile_rows)
            q = self.codes[start:end].float()  # (T, G, g)
            if self.mid is not None:
                q -= self.mid
            w = torch.addcmul(self.zero[start:end], q, self.scale[start:end])  # (T, G, g)
            w = w.view(end - start, -1)[:, :self.in_features]  # drop the padded last group
            torch.matmul(xf, w.t(), out=y[:, start:end])
        return y


class Int4Kernel(Kernel):
    """The affine-int layout (rtn, gptq) at 2 to 4 bits through ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

    The op computes ``x @ ((q - 8) * scale + zero).T`` per group of ``kernel_group``
    input columns with a ``(K / kernel_group, N, 2)`` scale/zero table. Narrower codes
    are shifted to centre on 8 (``q + 8 - 2**(b-1)``), so the zero stays the small
    ``offset + 2**(b-1) * scale`` (exactly 0 when symmetric) and rounding the table to
    bfloat16 costs no more than at 4 bits. The runtime layout is 4 bits per weight
    whatever the stored width: decode speed bought with memory. The op needs
    ``N % 16 == 0`` and a group in :data:`INT4_GROUPS` dividing ``K``. The kernel runs
    over the real ``in_features`` columns only: a format group that does not divide
    the row (128 of 576) or a per-channel scale is cut into kernel groups that do
    (64), each repeating its group's scale and zero, so the activations need no
    padding and the padded codes are never read.
    """

    def __init__(self, packed: PackedTensor, kernel_group: int):
        out_features, in_features = packed.shape
        self.in_features = in_features
        self.kernel_group = kernel_group
        group = packed.setting.group_size or in_features
        mid = 2 ** (packed.setting.bits - 1)
        codes = _int_codes(packed)[:, :in_features] + (8 - mid)  # (N, K) int32, padding dropped
        # innerKTiles only matters to the CUDA layout; the CPU op ignores it.
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)  # (N, K/2)
        scale, zero = _scale_zero(packed, mid)  # (N, G)
        table = torch.stack([scale, zero], -1).repeat_interleave(group // kernel_group, dim=1)
        table = table[:, :in_features // kernel_group]  # (N, K/kg, 2)
        self.scale_zero = table.transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/kg, N, 2)
        self.runtime_nbytes = (self.weight.numel() * self.weight.element_size()
                               + self.scale_zero.numel() * self.scale_zero.element_size())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, self.kernel_group,
                                                      self.scale_zero)
        return y.float()


class Int8Kernel(Kernel):
    """The affine-int layout (rtn, gptq) at 5-8 bits through ``torch.ops.aten._weight_int8pack_mm``, one call per group.

    The op takes signed int8 weights (the codes less ``2**(b-1)``) and one scale per
    output row, so a grouped weight is stored group-major, ``(G, N, g)``, and the product
    is the sum of the G groups' products, each with its own per-row scale (per channel:
    one group of the whole row). The asymmetric zero is added in float32 as the group
    sums of ``x`` times the ``(G, N)`` zeros: one matmul, exact. A padded last group
    meets zero-padded activations.
    """

    def __init__(self, packed: PackedTensor):
        out_features, in_features = packed.shape
        self.in_features = in_features
        mid = 2 ** (packed.setting.bits - 1)
        codes = (_int_codes(packed) - mid).to(torch.int8)  # (N, in_p)
        scale, zero = _scale_zero(packed, mid)  # (N, G)
        self.groups = scale.shape[1]
        self.weight = codes.view(out_features, self.groups, -1).transpose(0, 1).contiguous()  # (G, N, g)
        self.scale = scale.t().contiguous().to(torch.bfloat16)  # (G, N)
        self.zero = zero.t().contiguous() if "offset" in packed.buffers else None  # (G, N) float32
        self.runtime_nbytes = self.weight.numel() + 2 * self.scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        in_p = self.weight.shape[0] * self.weight.shape[2]
        xg = F.pad(x.float(), (0, in_p - self.in_features)).view(x.shape[0], self.groups, -1)  # (M, G, g)
        xb = xg.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb[:, 0].contiguous(), self.weight[0], self.scale[0]).float()
        for i in range(1, self.groups):
            y += torch.ops.aten._weight_int8pack_mm(xb[:, i].contiguous(), self.weight[i], self.scale[i])
        if self.zero is not None:
            y = torch.addmm(y, xg.sum(-1), self.zero)
        return y


def _int4_group(packed: PackedTensor) -> int | None:
    """The largest kernel group of the int4 op that divides both the format's group and the row."""
    out_features, in_features = packed.shape
    if out_features % 16:
        return None
    group = packed.setting.group_size or in_features
    return next((g for g in INT4_GROUPS if group % g == 0 and in_features % g == 0), None)


@register_kernel(AFFINE_INT, "cpu")
def affine_int_cpu(packed: PackedTensor) -> Kernel | None:
    """The int kernel for the affine-int layout without outliers; None (the generic path) with them."""
    if "outlier_idx" in packed.buffers:
        return None
    if packed.setting.bits <= 4 and (group := _int4_group(packed)) is not None:
        return Int4Kernel(packed, group)
    if packed.setting.bits > 4:
        return Int8Kernel(packed)
    return RTNTiledKernel(packed)  # 2-4 bits with rows the int4 op cannot take
