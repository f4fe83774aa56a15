"""``ternary``: weights in {-1, 0, +1} times an fp16 scale per group (BitNet b1.58 style).

Layout (``trits-base3-5``): each row's trits ``t = q + 1`` in {0, 1, 2} are taken
five at a time and stored as one byte ``t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4``
(``3**5 = 243 <= 256``), the row padded to a multiple of five with zeros; rows
start on byte boundaries so an embedding lookup can decode single rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quant.formats._base import Format, register_format
from quant.formats._common import n_groups
from quant.outliers import OutlierOptions, supports_outliers
from quant.packed import PackedTensor
from quant.primitives import group_view, padded_in_features, ungroup
from quant.settings import QuantSetting

__all__ = ["Ternary", "pack_trits", "unpack_trits", "trit_bytes"]

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int64)


def trit_bytes(n: int) -> int:
    """Bytes :func:`pack_trits` uses for a row of ``n`` trits."""
    return -(-n // 5)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Packs ``(rows, n)`` trits in {0, 1, 2} into ``(rows, ceil(n / 5))`` ``uint8``."""
    rows, n = trits.shape
    t = torch.nn.functional.pad(trits.to(torch.int64), (0, (-n) % 5))
    return (t.view(rows, -1, 5) * _POW3.to(t.device)).sum(-1).to(torch.uint8)


def unpack_trits(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: ``(rows, bytes)`` -> ``(rows, n)`` trits as ``uint8``."""
    if data.shape[-1] != trit_bytes(n):
        raise ValueError(f"expected {trit_bytes(n)} bytes per row for {n} trits, got {data.shape[-1]}")
    d = data.to(torch.int64).unsqueeze(-1)  # (rows, B, 1)
    t = (d // _POW3.to(d.device)) % 3  # (rows, B, 5)
    return t.reshape(data.shape[0], -1)[:, :n].to(torch.uint8)


@register_format
@supports_outliers  # sparse fp16 outliers (quant/outliers.py)
class Ternary(Format):
    """Ternary weights; ``bits`` must be 2 (the search's slot), effective rate 1.6 bits.

    A ternary code carries log2(3) = 1.58 bits; five of them share a byte, so the
    codes cost 8 / 5 = 1.6 bits per weight, plus 16 bits of scale per group
    (``PackedTensor.bits_per_weight`` reports the true total, e.g. 1.725 at
    group 128). The setting says ``bits: 2`` because settings carry whole bits.

    Codes follow BitNet b1.58: ``q = clip(round(w / mean|w|), -1, 1)`` per group.
    The stored scale is then refitted as the mean ``|w|`` over the non-zero codes,
    which is the least-squares scale for those codes (lower error than the
    absmean itself, same codes).
    """

    name = "ternary"
    layout = "trits-base3-5"
    Options = OutlierOptions  # outlier_frac only
    bits_range = (2, 2)
    default_bits = 2
    runtime_types = {"llamacpp": "tq1_0"}  # llama.cpp's ternary type (blocks of 256)
    native_runtimes = ("llamacpp",)

    def code_bits(self, setting: QuantSetting) -> float:
        return round(math.log2(3), 2)  # what a trit carries (1.58), not the 1.6 bits five per byte cost

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        w = group_view(weight, setting.group_size)  # (out, G, g)
        absmean = w.abs().mean(-1, keepdim=True).clamp(min=1e-12)
        q = torch.round(w / absmean).clamp_(-1, 1)  # (out, G, g)
        nz = q.abs()
        scale = ((w.abs() * nz).sum(-1) / nz.sum(-1).clamp(min=1)).half()  # (out, G)
        codes = pack_trits((q + 1).reshape(w.shape[0], -1))
        return PackedTensor(setting=setting, shape=tuple(weight.shape), buffers={"codes": codes, "scale": scale})

    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out_features, in_features = packed.shape
        in_p = padded_in_features(in_features, packed.setting.group_size)
        codes, scale = packed.buffers["codes"], packed.buffers["scale"]
        if rows is not None:
            codes, scale = codes[rows], scale[rows]
        q = unpack_trits(codes, in_p).float() - 1  # (R, in_p)
        w = q.view(q.shape[0], scale.shape[1], -1) * scale.float().unsqueeze(-1)
        return ungroup(w, in_features)

    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        out_features, in_features = shape
        in_p = padded_in_features(in_features, setting.group_size)
        return out_features * (trit_bytes(in_p) + 2 * n_groups(in_features, setting.group_size))
