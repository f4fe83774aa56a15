"""``turbo``: randomized Hadamard rotation, then a Lloyd-Max codebook for a unit Gaussian.

Per group of ``g`` weights (``g`` a power of two): flip signs with a seeded
Rademacher vector ``D`` and apply the orthonormal Walsh-Hadamard transform ``H``.
The rotated coordinates ``y = H D w`` of any group are close to i.i.d. Gaussian
with the group's RMS, so one fixed codebook, the MSE-optimal Lloyd-Max quantizer
of N(0, 1), serves every group once ``y`` is divided by an fp16 per-group scale
(the RMS). Decoding looks the codes up, multiplies by the scale and rotates back
(``w = D H y``, both factors being their own inverses).

Only the seed is stored (as an option); the rotation is rebuilt from it, never stored.
Option ``half_scales``: one fp16 scale per half group (2 more bytes per group), for real
weights whose rotated coordinates stay heavy-tailed; ``quant_error.py`` measures it.
Option ``rotation: "orthogonal"`` uses a seeded Haar-random orthogonal ``g x g`` matrix
``Q`` instead of ``H D`` (``y = Q w``, ``w = Q^T y``): the rotation of the TurboQuant
paper, at ``g^2`` multiply-adds per group where the Hadamard costs ``g log g``.

Option ``qjl``: adds a 1-bit QJL sketch of the rotated residual ``r = y - y_hat``:
``sign(S r)`` with ``S`` a seeded ``g x g`` Gaussian matrix, plus the fp16 ``|r|``
per group; decoding adds ``sqrt(pi/2) / g * |r| * S^T sign(S r)``. That estimate
is unbiased (inner products with the weight are unbiased), but its variance makes
the weight MSE *larger* than without it (about ``pi/2`` times the residual
energy); it costs one more bit per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from quant.formats._base import Format, register_format
from quant.formats._common import n_groups, nearest_sorted, unpack_rows
from quant.outliers import OutlierOptions, supports_outliers
from quant.packed import PackedTensor
from quant.packing import pack_bits, packed_size
from quant.primitives import group_view, one_thread, padded_in_features, ungroup
from quant.settings import QuantSetting

__all__ = ["Turbo", "TurboOptions", "lloyd_max_gaussian", "fwht", "rotation_signs"]

# Offsets between the seed of the sign flips and those of the QJL and orthogonal matrices, so
# the random objects are independent for every user seed.
_QJL_SEED_OFFSET = 0x9E3779B9
_ORTHOGONAL_SEED_OFFSET = 0x85EBCA6B
ROTATIONS = ("hadamard", "orthogonal")


@lru_cache(maxsize=None)
def lloyd_max_gaussian(bits: int) -> tuple[np.ndarray, float]:
    """The MSE-optimal ``2**bits``-level quantizer of N(0, 1), and its MSE.

    Lloyd's iteration with the Gaussian integrals in closed form: each centroid is
    the conditional mean of its cell, ``(phi(a) - phi(b)) / (Phi(b) - Phi(a))``,
    and each boundary the midpoint of its neighbours. It starts from the
    Panter-Dite point density (quantiles of N(0, 3)), which is already close; 256
    levels take about a second, once per process.
    """
    k = 2**bits
    c = math.sqrt(3.0) * ndtri((np.arange(k) + 0.5) / k)
    for _ in range(100_000):
        t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
        mass = np.diff(ndtr(t))
        finite = np.isfinite(t)
        pdf = np.where(finite, np.exp(-0.5 * np.where(finite, t, 0.0) ** 2), 0.0) / math.sqrt(2 * math.pi)
        step = (pdf[:-1] - pdf[1:]) / mass - c
        # Over-relaxed Lloyd step: plain Lloyd crawls for 128+ levels; 1.9 halves the
        # iterations and converged to the same points for every width 1..8 we checked.
        c = c + 1.9 * step
        if np.max(np.abs(step)) < 1e-10:
            break
    t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
    mass = np.diff(ndtr(t))
    # With centroids at the conditional means, MSE = E[x^2] - sum_i p_i c_i^2.
    c.setflags(write=False)  # cached and shared: nobody may edit it in place
    return c, float(1.0 - np.sum(mass * c * c))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two).

    ``H / sqrt(n)`` is symmetric and orthogonal, so the same call inverts it.
    """
    n = x.shape[-1]
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)  # pairs (j, j + h) inside each 2h block
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(shape) / math.sqrt(n)


def rotation_signs(seed: int, g: int) -> torch.Tensor:
    """The seeded +-1 vector ``D`` of length ``g`` (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (g,), generator=gen).float() * 2 - 1


@lru_cache(maxsize=32)
def _orthogonal(seed: int, g: int) -> torch.Tensor:
    """The seeded Haar-random orthogonal ``(g, g)`` matrix (QR of a Gaussian, signs fixed)."""
    gen = torch.Generator().manual_seed((seed + _ORTHOGONAL_SEED_OFFSET) % 2**63)
    with one_thread():  # the same matrix on any thread count: decoding must match encoding bit for bit
        q, r = torch.linalg.qr(torch.randn(g, g, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _rotate(w: torch.Tensor, seed: int, g: int, rotation: str) -> torch.Tensor:
    """Rotated coordinates of each group (the last dimension, length ``g``)."""
    if rotation == "orthogonal":
        return w @ _orthogonal(seed, g).to(w.device).T
    return fwht(w * rotation_signs(seed, g).to(w.device))


def _unrotate(y: torch.Tensor, seed: int, g: int, rotation: str) -> torch.Tensor:
    if rotation == "orthogonal":
        return y @ _orthogonal(seed, g).to(y.device)
    return fwht(y) * rotation_signs(seed, g).to(y.device)


def _scales_per_group(opts: "TurboOptions") -> int:
    """Option ``half_scales``: one fp16 scale per half of each rotated group instead of one per group."""
    return 2 if opts.half_scales else 1


def _levels(bits: int) -> torch.Tensor:
    return torch.tensor(lloyd_max_gaussian(bits)[0], dtype=torch.float32)


def _qjl_matrix(seed: int, g: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed + _QJL_SEED_OFFSET) % 2**63)
    return torch.randn(g, g, generator=gen)  # (m=g, g)


@dataclass(frozen=True)
class TurboOptions(OutlierOptions):
    """Options of ``turbo`` (and ``outlier_frac``).

    Attributes:
        seed: seed of the rotation (and of the QJL matrix); a non-negative integer.
        qjl: add the 1-bit QJL sketch of the rotated residual.
        rotation: ``"hadamard"`` (randomized Walsh-Hadamard) or ``"orthogonal"`` (Haar-random).
        half_scales: one fp16 scale per half group instead of one per group.
    """

    seed: int = 0
    qjl: bool = False
    rotation: str = "hadamard"
    half_scales: bool = False

    def check(self) -> None:
        super().check()
        if self.rotation not in ROTATIONS:
            raise ValueError(f"option 'rotation' must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.seed < 0:
            raise ValueError(f"option 'seed' must be a non-negative integer, got {self.seed!r}")


@register_format
@supports_outliers  # sparse fp16 outliers (quant/outliers.py)
class Turbo(Format):
    name = "turbo"
    layout = "rotated-codebook"  # codes on the Lloyd-Max levels of N(0, 1), fp16 scale per group (span)
    Options = TurboOptions
    bits_range = (1, 8)
    group_sizes = (32, 64, 128, 256)  # the Hadamard transform needs a power of two

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        g = setting.group_size
        opts = self.options_of(setting)
        seed = opts.seed
        w = group_view(weight, g)  # (out, G, g)
        y = _rotate(w, seed, g, opts.rotation)  # rotated coordinates
        k = _scales_per_group(opts)
        yk = y.reshape(y.shape[0], -1, g // k)  # (out, G*k, g/k): each scale's span
        scale = yk.pow(2).mean(-1, keepdim=True).sqrt().half()  # (out, G*k, 1)
        s = scale.float().masked_fill(scale == 0, 1.0)
        levels = _levels(setting.bits).to(w.device)
        codes = nearest_sorted(yk / s, levels).view_as(y)  # (out, G, g)
        buffers = {"codes": pack_bits(codes.to(torch.uint8), setting.bits), "scale": scale.squeeze(-1)}
        s = s.expand(-1, -1, g // k).reshape_as(y)  # each coordinate's scale
        if opts.qjl:
            r = y - levels[codes] * s  # (out, G, g) residual in the rotated basis
            proj = r @ _qjl_matrix(seed, g).to(w.device).T  # (out, G, m)
            buffers["qjl_signs"] = pack_bits((proj >= 0).to(torch.uint8), 1)
            buffers["qjl_norm"] = r.norm(dim=-1).half()  # (out, G)
        return PackedTensor(setting=setting, shape=tuple(weight.shape), buffers=buffers)

    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        setting = packed.setting
        g = setting.group_size
        opts = self.options_of(setting)
        seed = opts.seed
        out_features, in_features = packed.shape
        in_p = padded_in_features(in_features, g)
        codes = unpack_rows(packed.buffers["codes"], setting.bits, out_features, in_p, rows)
        scale = packed.buffers["scale"] if rows is None else packed.buffers["scale"][rows]
        levels = _levels(setting.bits).to(scale.device)
        k = _scales_per_group(opts)
        y = (levels[codes.long()].view(codes.shape[0], -1, g // k)
             * scale.float().unsqueeze(-1)).view(codes.shape[0], -1, g)  # (R, G, g)
        if "qjl_signs" in packed.buffers:
            signs = unpack_rows(packed.buffers["qjl_signs"], 1, out_features, in_p, rows)
            signs = signs.view(codes.shape[0], -1, g).float() * 2 - 1  # (R, G, m)
            norm = packed.buffers["qjl_norm"]
            norm = norm if rows is None else norm[rows]
            y = y + math.sqrt(math.pi / 2) / g * norm.float().unsqueeze(-1) * (
                signs @ _qjl_matrix(seed, g).to(y.device))  # S^T sign(S r), batched as row vectors
        w = _unrotate(y, seed, g, opts.rotation)
        return ungroup(w, in_features)

    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        out_features, in_features = shape
        in_p = padded_in_features(in_features, setting.group_size)
        groups = out_features * n_groups(in_features, setting.group_size)
        opts = self.options_of(setting)
        total = packed_size(out_features * in_p, setting.bits) + 2 * groups * _scales_per_group(opts)
        if opts.qjl:
            total += packed_size(out_features * in_p, 1) + 2 * groups
        return total
