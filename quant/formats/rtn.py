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


@register_format
@supports_outliers  # adds option "outlier_frac" (sparse fp16 outliers, see quant/outliers.py)
class RTN(Format):
    name = "rtn"
    bits_range = (2, 8)
    options = {"symmetric": bool}

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        w = group_view(weight, setting.group_size)  # (out, G, g)
        levels = 2**setting.bits - 1
        if setting.options.get("symmetric", False):
            half = 2 ** (setting.bits - 1)
            scale = (w.abs().amax(-1, keepdim=True) / (half - 1 if half > 1 else 1)).half()
            s = scale.float().masked_fill(scale == 0, 1.0)
            codes = (torch.round(w / s) + half).clamp_(0, levels)
            buffers = {"scale": scale.squeeze(-1)}
        else:
            lo = w.amin(-1, keepdim=True)
            scale = ((w.amax(-1, keepdim=True) - lo) / levels).half()
            offset = lo.half()
            s = scale.float().masked_fill(scale == 0, 1.0)
            codes = torch.round((w - offset.float()) / s).clamp_(0, levels)
            buffers = {"scale": scale.squeeze(-1), "offset": offset.squeeze(-1)}
        buffers["codes"] = pack_bits(codes.to(torch.uint8), setting.bits)
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
