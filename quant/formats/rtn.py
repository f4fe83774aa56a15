"""``rtn``: affine round-to-nearest per group (asymmetric by default, or symmetric).

Asymmetric: ``w = q * scale + offset`` with ``q`` in ``[0, 2**b - 1]`` and fp16
``scale`` and ``offset`` (the group minimum) per group, the Q4_1 layout.
Symmetric: ``w = (q - 2**(b-1)) * scale`` with one fp16 ``scale`` per group.
"""

from __future__ import annotations

from typing import Any

import torch

from quant.formats._base import Format, register_format
from quant.formats._common import unpack_rows
from quant.outliers import supports_outliers
from quant.packed import PackedTensor
from quant.packing import pack_bits, packed_size
from quant.primitives import group_view, padded_in_features, ungroup
from quant.settings import QuantSetting


CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))  # range shrink factors tried by ``clip``: 1.0 .. 0.55
CHUNK = 1 << 17  # floats per row block: the block's temporaries stay in the L2 cache


def _range(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group ``(R, G, 1)``: ``(absmax, None)`` when symmetric, else ``(min, max)``."""
    if symmetric:
        return w.abs().amax(-1, keepdim=True), None
    return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


def _grid(rng: tuple[torch.Tensor, torch.Tensor | None], bits: int, shrink: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 ``(R, G, 1)`` scale and offset (``None`` when symmetric) of the range shrunk toward zero."""
    a, b = rng
    if b is None:
        half = 2 ** (bits - 1)
        scale = a / (half - 1 if half > 1 else 1)
        return (scale if shrink == 1.0 else scale * shrink).half(), None
    lo, hi = (a, b) if shrink == 1.0 else (a * shrink, b * shrink)
    return ((hi - lo) / (2**bits - 1)).half(), lo.half()


def _codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
           out: torch.Tensor) -> torch.Tensor:
    """Float codes of ``w`` ``(R, G, g)`` on the fp16 grid, written into ``out`` (same shape)."""
    s = scale.float().masked_fill(scale == 0, 1.0)
    if offset is None:
        torch.div(w, s, out=out).round_().add_(2 ** (bits - 1))
    else:
        torch.sub(w, offset.float(), out=out).div_(s).round_()
    return out.clamp_(0, 2**bits - 1)


def _sq_error(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
              t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Each group's squared error ``(R, G)`` on a grid, for the clip search (``t``, ``q``: scratch).

    In grid units: ``t = (w - offset) / scale``, error ``scale^2 * sum (t - clamp(round(t)))^2``,
    five passes over the block. It multiplies by ``1 / scale`` where :func:`_codes` divides,
    which can move a rare tie but only ranks grids; the stored codes come from :func:`_codes`.
    """
    s = scale.float().masked_fill(scale == 0, 1.0)
    inv = 1.0 / s
    shift = torch.full_like(s, 2.0 ** (bits - 1)) if offset is None else -offset.float() * inv
    torch.addcmul(shift, w, inv, out=t)  # t = (w - offset) / s, or w / s + 2**(b-1)
    torch.round(t, out=q).clamp_(0, 2**bits - 1)
    torch.sub(t, q, out=q)
    return torch.linalg.vector_norm(q, dim=-1).square_() * s.squeeze(-1).square()


@register_format
@supports_outliers  # adds option "outlier_frac" (sparse fp16 outliers, see quant/outliers.py)
class RTN(Format):
    """Affine round-to-nearest; option ``clip`` searches each group's range.

    Without ``clip`` the grid spans the group's min..max. With ``clip=True`` the
    range is also shrunk toward zero by each factor of :data:`CLIP_GRID` and each
    group keeps the grid with the smallest squared error (1.0, plain min-max, is
    among them and wins ties, so clipping never does worse on a group's own
    weights). Same layout and bytes either way.

    Work is done one block of rows at a time (:data:`CHUNK` floats), so the float
    temporaries stay in cache; the clip search is vectorised over all groups of a
    block, looping only over the shrink factors.
    """

    name = "rtn"
    bits_range = (2, 8)
    options = {"symmetric": bool, "clip": bool}

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        w = group_view(weight, setting.group_size)  # (out, G, g)
        bits, symmetric = setting.bits, setting.options.get("symmetric", False)
        clip = setting.options.get("clip", False)
        out_features, groups, g = w.shape
        codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
        scale = torch.empty(out_features, groups, 1, dtype=torch.float16, device=w.device)
        offset = None if symmetric else torch.empty_like(scale)
        rows = max(1, CHUNK // (groups * g))
        buf = torch.empty(min(rows, out_features), groups, g, device=w.device)
        tbuf = torch.empty_like(buf) if clip else None
        for r0 in range(0, out_features, rows):
            wc = w[r0:r0 + rows]  # (R, G, g)
            q = buf[:wc.shape[0]]
            rng = _range(wc, symmetric)
            sc, off = _grid(rng, bits)
            if clip:
                t = tbuf[:wc.shape[0]]
                best = _sq_error(wc, sc, off, bits, t, q)  # (R, G)
                for shrink in CLIP_GRID[1:]:
                    sc2, off2 = _grid(rng, bits, shrink)
                    err = _sq_error(wc, sc2, off2, bits, t, q)
                    better = err < best  # strict: on a tie the wider grid stays
                    best = torch.where(better, err, best)
                    sc = torch.where(better.unsqueeze(-1), sc2, sc)
                    off = None if off is None else torch.where(better.unsqueeze(-1), off2, off)
            codes[r0:r0 + rows] = _codes(wc, sc, off, bits, q)  # float -> uint8 copy
            scale[r0:r0 + rows] = sc
            if offset is not None:
                offset[r0:r0 + rows] = off
        buffers = {"scale": scale.squeeze(-1)}
        if offset is not None:
            buffers["offset"] = offset.squeeze(-1)
        buffers["codes"] = pack_bits(codes, bits)
        return PackedTensor(setting=setting, shape=tuple(weight.shape), buffers=buffers)

    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out_features, in_features = packed.shape
        in_p = padded_in_features(in_features, packed.setting.group_size)
        scale, offset = packed.buffers["scale"], packed.buffers.get("offset")
        if rows is not None:
            scale, offset = scale[rows], None if offset is None else offset[rows]
        codes = unpack_rows(packed.buffers["codes"], packed.setting.bits, out_features, in_p, rows)
        q = codes.view(codes.shape[0], scale.shape[1], -1).float()  # (R, G, g)
        if offset is None:  # symmetric
            w = (q - 2 ** (packed.setting.bits - 1)) * scale.float().unsqueeze(-1)
        else:
            w = q * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
        return ungroup(w, in_features)

    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        out_features, in_features = shape
        in_p = padded_in_features(in_features, setting.group_size)
        groups = out_features * (in_p // (setting.group_size or in_features))
        per_group = 2 if setting.options.get("symmetric", False) else 4
        return packed_size(out_features * in_p, setting.bits) + groups * per_group
