"""The ``affine-int`` layout that ``rtn`` and ``gptq`` share: bit-packed codes, fp16 scale and offset per group.

Asymmetric: ``w = q * scale + offset`` with ``q`` in ``[0, 2**b - 1]`` and ``offset`` the
group's minimum (the Q4_1 layout). Symmetric: ``w = (q - 2**(b-1)) * scale``, no offset.
Buffers: ``codes`` (``(out, in_p)`` codes packed row-major by :func:`quant.packing.pack_bits`,
``in_p`` the row padded to whole groups), ``scale`` and, unless symmetric, ``offset``, both
fp16 ``(out, n_groups)``. The kernels of :mod:`quant.kernels` read exactly these buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.formats._base import Format
from quant.formats._common import unpack_rows
from quant.formats._options import FormatOptions
from quant.packed import PackedTensor
from quant.packing import packed_size
from quant.primitives import padded_in_features, ungroup
from quant.settings import QuantSetting

__all__ = ["AFFINE_INT", "AffineFormat", "AffineOptions"]

AFFINE_INT = "affine-int"


@dataclass(frozen=True)
class AffineOptions(FormatOptions):
    """Options every affine format has.

    Attributes:
        symmetric: a grid centred on zero (one fp16 scale per group, no offset).
        clip: search each group's range (:func:`quant.primitives.affine_grid`); same bytes.
    """

    symmetric: bool = False
    clip: bool = False


class AffineFormat(Format):
    """Decoding, byte count and export answers of the ``affine-int`` layout; subclasses choose the codes."""

    layout = AFFINE_INT
    Options = AffineOptions

    def symmetric(self, setting: QuantSetting) -> bool:
        return self.options_of(setting).symmetric

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
        per_group = 2 if self.symmetric(setting) else 4
        return packed_size(out_features * in_p, setting.bits) + groups * per_group
