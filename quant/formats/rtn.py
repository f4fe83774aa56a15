"""``rtn``: affine round-to-nearest per group (asymmetric by default, or symmetric).

Layout ``affine-int`` (see :mod:`quant.formats._affine`): asymmetric ``w = q * scale + offset``
with ``q`` in ``[0, 2**b - 1]`` and fp16 ``scale`` and ``offset`` (the group minimum) per
group, the Q4_1 layout; symmetric ``w = (q - 2**(b-1)) * scale`` with one fp16 ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.formats._affine import AffineFormat, AffineOptions
from quant.formats._base import RUNTIMES, register_format
from quant.outliers import OutlierOptions, supports_outliers
from quant.packed import PackedTensor
from quant.packing import pack_bits
from quant.primitives import affine_codes, affine_grid, group_view
from quant.settings import QuantSetting

__all__ = ["RTN", "RtnOptions"]

CHUNK = 1 << 17  # floats per row block: the block's temporaries stay in the L2 cache


@dataclass(frozen=True)
class RtnOptions(AffineOptions, OutlierOptions):
    """``symmetric``, ``clip`` (see :class:`AffineOptions`) and ``outlier_frac``."""


@register_format
@supports_outliers  # sparse fp16 outliers, see quant/outliers.py
class RTN(AffineFormat):
    """Affine round-to-nearest; option ``clip`` searches each group's range.

    Without ``clip`` the grid spans the group's min..max; with it,
    :func:`quant.primitives.affine_grid` picks each group's range. Same layout and
    bytes either way.

    Work is done one block of rows at a time (:data:`CHUNK` floats), so the float
    temporaries stay in cache.
    """

    name = "rtn"
    Options = RtnOptions
    bits_range = (2, 8)
    native_runtimes = RUNTIMES  # every runtime stores this very grid (at the widths it has)

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        opts = self.options_of(setting)
        w = group_view(weight, setting.group_size)  # (out, G, g)
        bits, symmetric = setting.bits, opts.symmetric
        out_features, groups, g = w.shape
        codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
        scale = torch.empty(out_features, groups, 1, dtype=torch.float16, device=w.device)
        offset = None if symmetric else torch.empty_like(scale)
        rows = max(1, CHUNK // (groups * g))
        buf = torch.empty(min(rows, out_features), groups, g, device=w.device)
        tbuf = torch.empty_like(buf) if opts.clip else None
        for r0 in range(0, out_features, rows):
            wc = w[r0:r0 + rows]  # (R, G, g)
            q = buf[:wc.shape[0]]
            scratch = (tbuf[:wc.shape[0]], q) if opts.clip else None
            sc, off = affine_grid(wc, bits, symmetric, opts.clip, scratch)
            codes[r0:r0 + rows] = affine_codes(wc, sc, off, bits, q)  # float -> uint8 copy
            scale[r0:r0 + rows] = sc
            if offset is not None:
                offset[r0:r0 + rows] = off
        buffers = {"scale": scale.squeeze(-1)}
        if offset is not None:
            buffers["offset"] = offset.squeeze(-1)
        buffers["codes"] = pack_bits(codes, bits)
        return PackedTensor(setting=setting, shape=tuple(weight.shape), buffers=buffers)
