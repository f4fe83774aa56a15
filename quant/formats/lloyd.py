"""``lloyd``: a non-uniform scalar codebook per group (k-means), or a fixed NF-style one.

Default: each group (or row, per channel) gets its own ``2**b`` fp16 centroids,
fitted by a few iterations of Lloyd's algorithm (1-D k-means) on the group's own
weights (the better of a uniform-grid and a quantile start, see :func:`kmeans_1d`);
codes are bit-packed. The
centroids are the cost: ``2**b * 16`` bits per group, so small groups at 4 bits
pay 2 extra bits per weight (``bits_per_weight`` shows it; the search sees it).

Option ``weighted`` (with calibration ``hessian=H``): the k-means weighs each weight by the
energy of its input channel, ``H[j, j] = sum x_j^2`` over the calibration tokens, so the
centroids sit where the layer's output error is made; without ``H`` it is plain k-means.

Option ``preset="nf"``: one fixed codebook of normal quantiles scaled to
``[-1, 1]`` (the NormalFloat idea), multiplied by each group's fp16 absmax; only
that scale is stored per group. Its levels reach the absmax, so it needs
``bits >= 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy.special import ndtri

from quant.formats._base import Format, register_format
from quant.formats._common import n_groups, nearest_sorted, unpack_rows
from quant.outliers import OutlierOptions, supports_outliers
from quant.packed import PackedTensor
from quant.packing import pack_bits, packed_size
from quant.primitives import group_view, padded_in_features, ungroup
from quant.settings import QuantSetting

__all__ = ["Lloyd", "LloydOptions", "nf_levels", "kmeans_1d"]

PRESETS = ("nf",)
KMEANS_ITERS = 10  # per start; most of the gain comes in the first few steps


@lru_cache(maxsize=None)
def _nf_levels(bits: int) -> tuple[float, ...]:
    k = 2**bits
    q = ndtri((np.arange(k) + 0.5) / k)  # equal-mass cells of N(0, 1)
    return tuple(float(v) for v in q / np.abs(q).max())


def nf_levels(bits: int) -> torch.Tensor:
    """The NF-style codebook: ``2**bits`` normal quantiles scaled to ``[-1, 1]``, ascending."""
    return torch.tensor(_nf_levels(bits), dtype=torch.float32)


def _lloyd(x: torch.Tensor, c: torch.Tensor, iters: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd steps from the sorted start ``c`` (N, k) with element weights ``a`` (N, n); the
    centroids and each row's weighted squared error. (The nearest centroid does not depend on
    the weights; each centroid is the weighted mean of its cluster.)"""
    for _ in range(iters):
        idx = nearest_sorted(x, c)  # (N, n)
        sums = torch.zeros_like(c).scatter_add_(1, idx, a * x)
        mass = torch.zeros_like(c).scatter_add_(1, idx, a)
        c = torch.where(mass > 0, sums / mass.clamp(min=1e-30), c).sort(dim=-1).values
    err = (a * (x - torch.gather(c, 1, nearest_sorted(x, c))).square()).sum(-1)
    return c, err


def kmeans_1d(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted 1-D k-means centroids for each row of ``x`` ``(N, n)`` -> ``(N, k)``; with ``weights``
    (broadcastable to ``x``) each element counts that much in the means and the error.

    Two starts, the better kept per row: the uniform grid over the row's [min, max] (rtn's
    levels, so the result is never worse than rtn's levels with the same codes) and the
    row's quantiles. Neither wins everywhere (relative MSE on Gaussian rows, uniform /
    quantile start: 4 bits in groups of 64, 0.0053 / 0.0083; 3 bits per channel,
    0.0376 / 0.0346). An empty cluster keeps its previous centroid, so every row keeps
    ``k`` levels.
    """
    n = x.shape[-1]
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    uniform = lo + (hi - lo) * torch.linspace(0, 1, k, device=x.device)
    pos = ((torch.arange(k, dtype=torch.float32) + 0.5) / k * n).long().clamp_(max=n - 1)
    quantiles = x.sort(dim=-1).values[:, pos]
    a = torch.ones_like(x) if weights is None else weights.expand_as(x)
    c_u, err_u = _lloyd(x, uniform, iters, a)
    c_q, err_q = _lloyd(x, quantiles, iters, a)
    return torch.where((err_u <= err_q).unsqueeze(-1), c_u, c_q)


@dataclass(frozen=True)
class LloydOptions(OutlierOptions):
    """Options of ``lloyd`` (and ``outlier_frac``).

    Attributes:
        preset: ``None`` (k-means per group) or ``"nf"`` (one fixed normal-quantile codebook).
        weighted: k-means weighted by each input channel's calibration energy (needs ``hessian``).
    """

    preset: str | None = None
    weighted: bool = False

    def check(self) -> None:
        super().check()
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"option 'preset' must be one of {PRESETS}, got {self.preset!r}")
        if self.weighted and self.preset is not None:
            raise ValueError(f"options 'weighted' and 'preset' {self.preset!r} do not combine: a preset "
                             f"codebook is fixed, so there is nothing to weight; drop one of them")


@register_format
@supports_outliers  # sparse fp16 outliers (quant/outliers.py)
class Lloyd(Format):
    name = "lloyd"
    layout = "scalar-codebook"  # per-group fp16 centroids, or (preset) a fixed codebook times an fp16 scale
    Options = LloydOptions
    bits_range = (1, 8)
    calibration = ("hessian",)

    def uses_calibration(self, setting: QuantSetting) -> bool:
        return self.options_of(setting).weighted

    def check_setting(self, setting: QuantSetting, opts: LloydOptions) -> None:
        preset = opts.preset
        if preset == "nf" and setting.bits < 2:
            raise ValueError("lloyd preset 'nf' needs bits >= 2: one bit would give the levels +-absmax; "
                             "use lloyd without a preset for 1 bit")
        if preset is None and setting.group_size is not None and 2**setting.bits > setting.group_size:
            raise ValueError(f"lloyd with {2**setting.bits} centroids per group needs a group of at least "
                             f"that many weights, got group_size {setting.group_size}; lower bits, "
                             f"raise group_size or use options {{'preset': 'nf'}}")

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        w = group_view(weight, setting.group_size)  # (out, G, g)
        out_features, groups, g = w.shape
        opts = self.options_of(setting)
        if opts.preset == "nf":
            scale = w.abs().amax(-1, keepdim=True).half()  # (out, G, 1)
            s = scale.float().masked_fill(scale == 0, 1.0)
            codes = nearest_sorted(w / s, nf_levels(setting.bits).to(w.device))
            buffers = {"scale": scale.squeeze(-1)}
        else:
            energy = None
            h = calibration.get("hessian")
            if opts.weighted and h is not None:
                in_features = weight.shape[1]
                if tuple(h.shape) != (in_features, in_features):
                    raise ValueError(f"hessian must be ({in_features}, {in_features}), got {tuple(h.shape)}")
                # Each column's input energy, laid out like the groups (padding columns weigh nothing).
                e = torch.zeros(groups * g, device=w.device)
                e[:in_features] = torch.diagonal(h).float().clamp(min=0)
                energy = e.view(1, groups, g).expand(out_features, -1, -1).reshape(-1, g)
            centroids = kmeans_1d(w.reshape(-1, g), 2**setting.bits, weights=energy).half()  # (out*G, K)
            # Code against the fp16 centroids actually stored, so decoding sees no drift.
            codes = nearest_sorted(w.reshape(-1, g), centroids.float()).view(out_features, groups, g)
            buffers = {"centroids": centroids.view(out_features, groups, -1)}
        buffers["codes"] = pack_bits(codes.to(torch.uint8), setting.bits)
        return PackedTensor(setting=setting, shape=tuple(weight.shape), buffers=buffers)

    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        setting = packed.setting
        out_features, in_features = packed.shape
        in_p = padded_in_features(in_features, setting.group_size)
        codes = unpack_rows(packed.buffers["codes"], setting.bits, out_features, in_p, rows).long()
        groups = n_groups(in_features, setting.group_size)
        codes = codes.view(codes.shape[0], groups, -1)  # (R, G, g)
        if "scale" in packed.buffers:
            scale = packed.buffers["scale"] if rows is None else packed.buffers["scale"][rows]
            w = nf_levels(setting.bits).to(scale.device)[codes] * scale.float().unsqueeze(-1)
        else:
            cents = packed.buffers["centroids"]
            cents = (cents if rows is None else cents[rows]).float()  # (R, G, K)
            w = torch.gather(cents, 2, codes)
        return ungroup(w, in_features)

    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        out_features, in_features = shape
        in_p = padded_in_features(in_features, setting.group_size)
        groups = out_features * n_groups(in_features, setting.group_size)
        per_group = 2 if self.options_of(setting).preset == "nf" else 2 * 2**setting.bits
        return packed_size(out_features * in_p, setting.bits) + groups * per_group
