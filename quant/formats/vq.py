"""``vq``: vector quantization of ``dim`` consecutive weights with one codebook per matrix.

Each group's weights are divided by the group's fp16 RMS, cut into vectors of
``dim`` (2 or 4) consecutive weights, and each vector is replaced by the index of
its nearest entry in a codebook of ``K = 2**bits`` fp16 vectors fitted by k-means
on (a seeded sample of) the matrix's vectors. Here ``bits`` is the width of a
*vector* index, so codes cost ``bits / dim`` bits per weight: ``dim=2`` with bits
2..8 gives 1..4 bits per weight in half-bit steps (1.5, 2.5, ...); ``dim=4``
gives 0.5..2. The codebook (``K * dim * 2`` bytes) is stored and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.formats._base import Format, register_format
from quant.formats._common import n_groups, unpack_rows
from quant.outliers import OutlierOptions, supports_outliers
from quant.packed import PackedTensor
from quant.packing import pack_bits, packed_size
from quant.primitives import group_view, padded_in_features, ungroup
from quant.settings import QuantSetting

__all__ = ["VQ", "VqOptions", "kmeans", "nearest_vectors"]

DIMS = (2, 4)
FIT_SAMPLE = 1 << 15  # vectors used to fit the codebook: >= 128 per entry even at 256 entries
FIT_ITERS = 15
_CHUNK = 1 << 13  # vectors per distance block, so an embedding never needs an (N, K) table


def nearest_vectors(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each row of ``x`` ``(N, d)``."""
    norms = (codebook * codebook).sum(-1)  # (K,)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], _CHUNK):
        xc = x[i:i + _CHUNK]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
        out[i:i + _CHUNK] = torch.addmm(norms, xc, codebook.T, alpha=-2).argmin(-1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = FIT_ITERS, seed: int = 0) -> torch.Tensor:
    """k-means codebook ``(k, d)`` for the rows of ``x`` ``(N, d)``, seeded and deterministic.

    Starts from ``k`` distinct random rows; an emptied cluster is re-seeded at the
    point currently worst served, so no entry of the codebook is wasted.
    """
    gen = torch.Generator().manual_seed(seed)
    if x.shape[0] > FIT_SAMPLE:
        x = x[torch.randperm(x.shape[0], generator=gen)[:FIT_SAMPLE].to(x.device)]
    n = x.shape[0]
    start = torch.randperm(n, generator=gen)[:k].to(x.device)
    c = x[start].clone()
    if c.shape[0] < k:  # fewer vectors than entries: repeat, duplicates are harmless
        c = c[torch.arange(k) % c.shape[0]]
    for _ in range(iters):
        idx = nearest_vectors(x, c)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp(min=1).unsqueeze(1))
        if empty.any():
            err = (x - c[idx]).pow(2).sum(-1)
            worst = err.topk(int(empty.sum())).indices
            c[empty] = x[worst]
    return c


@dataclass(frozen=True)
class VqOptions(OutlierOptions):
    """Options of ``vq`` (and ``outlier_frac``).

    Attributes:
        dim: weights per vector, one of :data:`DIMS`; a code of ``bits`` bits covers ``dim`` weights.
    """

    dim: int = 2

    def check(self) -> None:
        super().check()
        if self.dim not in DIMS:
            raise ValueError(f"option 'dim' must be one of {DIMS}, got {self.dim!r}")


@register_format
@supports_outliers  # sparse fp16 outliers (quant/outliers.py)
class VQ(Format):
    name = "vq"
    layout = "vector-codebook"  # codes of dim-vectors, fp16 scale per group, one fp16 codebook per matrix
    Options = VqOptions
    bits_range = (2, 8)

    def code_bits(self, setting: QuantSetting) -> float:
        return setting.bits / self.options_of(setting).dim  # one code per dim weights

    def quantize(self, weight: torch.Tensor, setting: QuantSetting, **calibration: Any) -> PackedTensor:
        dim = self.options_of(setting).dim
        w = group_view(weight, setting.group_size)  # (out, G, g)
        if w.shape[-1] % dim:
            raise ValueError(f"vq with dim {dim} needs rows divisible by {dim} when per channel; "
                             f"got in_features {weight.shape[1]}; use a group_size instead")
        scale = w.pow(2).mean(-1, keepdim=True).sqrt().half()  # (out, G, 1)
        s = scale.float().masked_fill(scale == 0, 1.0)
        vecs = (w / s).reshape(-1, dim)  # (N, dim), row-major so a row's vectors are contiguous
        codebook = kmeans(vecs, 2**setting.bits).half()
        codes = nearest_vectors(vecs, codebook.float())
        buffers = {"codes": pack_bits(codes.to(torch.uint8), setting.bits), "scale": scale.squeeze(-1),
                   "codebook": codebook}
        return PackedTensor(setting=setting, shape=tuple(weight.shape), buffers=buffers)

    def decode(self, packed: PackedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        setting = packed.setting
        dim = self.options_of(setting).dim
        out_features, in_features = packed.shape
        in_p = padded_in_features(in_features, setting.group_size)
        codes = unpack_rows(packed.buffers["codes"], setting.bits, out_features, in_p // dim, rows)
        scale = packed.buffers["scale"] if rows is None else packed.buffers["scale"][rows]
        vecs = packed.buffers["codebook"].float()[codes.long()]  # (R, in_p / dim, dim)
        w = vecs.view(codes.shape[0], scale.shape[1], -1) * scale.float().unsqueeze(-1)  # (R, G, g)
        return ungroup(w, in_features)

    def expected_nbytes(self, shape: tuple[int, int], setting: QuantSetting) -> int:
        dim = self.options_of(setting).dim
        out_features, in_features = shape
        in_p = padded_in_features(in_features, setting.group_size)
        groups = out_features * n_groups(in_features, setting.group_size)
        return packed_size(out_features * in_p // dim, setting.bits) + 2 * groups + 2 * dim * 2**setting.bits
