"""The k-quants q2_k .. q6_k: super-blocks of 256 weights with quantized sub-block scales.

Encoder, per super-block (all super-blocks at once):
1. each sub-block (16 or 32 weights) gets its float scale (and, for the affine types q2_k, q4_k,
   q5_k, its offset ``-m <= 0``) by :func:`~quant.gguf._search.fit_scale` / ``fit_affine``;
2. those scales (and the offsets' magnitudes) are themselves quantized: integers on 4, 6 or 8 bits
   times one fp16 super-scale ``d`` (``dmin``), searched like a block of weights, each sub-block
   weighted by how much a scale error costs it (``sum w q^2`` for a scale, ``sum w`` for an offset);
3. the codes are re-rounded for the quantized scales, then two rounds of refinement, each kept only
   where it lowers the exact error of the stored values: a least-squares refit of ``d`` (and
   ``dmin``) over the whole super-block with the integers fixed, and a local search moving each
   sub-block's integer scale (and offset) by one step.
"""

from __future__ import annotations

import itertools

import torch

from quant.gguf._bytes import f16_bytes, f16_values, split_fields
from quant.gguf._codec import Codec, register_codec
from quant.gguf._klayout import (pack_2bit, pack_high_bits, pack_nibbles_64, pack_q6, pack_scales_k4,
                                 pack_scales_q3, unpack_2bit, unpack_high_bits, unpack_nibbles_64, unpack_q6,
                                 unpack_scales_k4, unpack_scales_q3)
from quant.gguf._search import (Nearest, fit_affine, fit_scale, fp16, refine_scale, round_affine, scaled,
                                uniform_levels)

__all__ = ["encode_affine", "encode_symmetric"]

QK = 256
OFFSETS_AFFINE = [i / 10 for i in range(-10, 11)]
OFFSETS_3 = [i / 8 for i in range(-8, 25)]
OFFSETS_6 = [i / 4 for i in range(-4, 13)]
SCALE_OFFSETS = [i / 2 for i in range(-16, 9)]  # the scale search is on (S, 8) or (S, 16): cheap
SCALE_OFFSETS_4 = [i / 4 for i in range(-4, 13)]
ROUNDS = 2


def _wsum(a: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return (a if w is None else a * w).sum(-1)


def _requant_affine(x, w, nmax, d, dm, ls, lm):
    """Codes and per-sub-block error for ``x ~ (d ls) L - (dmin lm)``; x (S, n, sub)."""
    dl, ml = (d.unsqueeze(-1) * ls).unsqueeze(-1), (dm.unsqueeze(-1) * lm).unsqueeze(-1)  # (S, n, 1)
    q = torch.where(dl != 0, (x + ml) / torch.where(dl != 0, dl, 1.0), 0.0).round_().clamp_(0, nmax)
    err = (x - (dl * q - ml)).square_()
    return q, (err if w is None else err.mul_(w)).sum(-1)


def encode_affine(x: torch.Tensor, w: torch.Tensor | None, sub: int, nmax: int, smax: int,
                  scale_offsets: list[float]) -> tuple[torch.Tensor, ...]:
    """``(S, 256)`` -> fp16-exact ``d, dmin (S,)``, integer scales and mins ``(S, n)``, codes ``(S, 256)``."""
    s, n = x.shape[0], QK // sub
    xs = x.reshape(s * n, sub)
    ws = None if w is None else w.reshape(s * n, sub)
    d, m = fit_affine(xs, ws, nmax, OFFSETS_AFFINE, nonpositive_offset=True)
    d = d.clamp(min=0)
    q = round_affine(xs, d, m, nmax)
    c_scale, c_min = _wsum(q * q, ws).view(s, n), _wsum(torch.ones_like(xs), ws).view(s, n)
    levels = uniform_levels(0, smax)
    dv, mv = d.view(s, n), (-m).view(s, n)
    sd, ls = refine_scale(dv, c_scale, levels, [fit_scale(dv, c_scale, levels, (smax,), scale_offsets),
                                                 dv.amax(-1) / smax])
    sm, lm = refine_scale(mv, c_min, levels, [fit_scale(mv, c_min, levels, (smax,), scale_offsets),
                                               mv.amax(-1) / smax])
    x3 = x.view(s, n, sub)
    w3 = None if w is None else w.view(s, n, sub)
    q, err = _requant_affine(x3, w3, nmax, sd, sm, ls, lm)
    for _ in range(ROUNDS):
        # Joint least squares of (d, dmin) with the integers fixed: x ~ d (ls L) - dmin lm.
        a, b = ls.unsqueeze(-1) * q, (-lm).unsqueeze(-1).expand_as(q)
        saa, sab, sbb = (_wsum(t, w3).sum(-1) for t in (a * a, a * b, b * b))
        sax, sbx = _wsum(a * x3, w3).sum(-1), _wsum(b * x3, w3).sum(-1)
        det = saa * sbb - sab * sab
        ok = det > 1e-9 * saa * sbb
        safe = torch.where(ok, det, 1.0)
        nd = torch.where(ok, (sax * sbb - sbx * sab) / safe, sax / saa.clamp(min=1e-30))
        nm = torch.where(ok, (sbx * saa - sax * sab) / safe, sm)
        nd, nm = fp16(nd), fp16(nm)
        q2, err2 = _requant_affine(x3, w3, nmax, nd, nm, ls, lm)
        better = err2.sum(-1) < err.sum(-1)
        sd, sm = torch.where(better, nd, sd), torch.where(better, nm, sm)
        q = torch.where(better.view(-1, 1, 1), q2, q)
        err = torch.where(better.unsqueeze(-1), err2, err)
        # Each sub-block's integer scale and min one step either way, d and dmin fixed.
        for ds, dmn in itertools.product((-1, 0, 1), repeat=2):
            if ds == dmn == 0:
                continue
            ls2, lm2 = (ls + ds).clamp(0, smax), (lm + dmn).clamp(0, smax)
            q2, err2 = _requant_affine(x3, w3, nmax, sd, sm, ls2, lm2)
            better = err2 < err
            ls, lm, err = torch.where(better, ls2, ls), torch.where(better, lm2, lm), torch.where(better, err2, err)
            q = torch.where(better.unsqueeze(-1), q2, q)
    return sd, sm, ls, lm, q.reshape(s, QK)


def _requant_symmetric(x, w, levels, d, ls):
    dl = d.unsqueeze(-1) * ls  # (S, n)
    q = scaled(x, dl, levels)
    err = (x - dl.unsqueeze(-1) * q).square_()
    return q, (err if w is None else err.mul_(w)).sum(-1)


def encode_symmetric(x: torch.Tensor, w: torch.Tensor | None, sub: int, lo: int, hi: int, slo: int, shi: int,
                     offsets: list[float], levels: Nearest | None = None) -> tuple[torch.Tensor, ...]:
    """``(S, 256)`` -> fp16-exact ``d (S,)``, signed integer scales ``(S, n)``, codes in ``[lo, hi]`` ``(S, 256)``.

    ``levels`` replaces the integers ``lo .. hi`` by a table whose ends are ``lo`` and ``hi``
    (iq4_xs: iq4_nl's 16 values); the codes returned are then the table's values.
    """
    s, n = x.shape[0], QK // sub
    xs = x.reshape(s * n, sub)
    ws = None if w is None else w.reshape(s * n, sub)
    levels = uniform_levels(lo, hi) if levels is None else levels
    d = fit_scale(xs, ws, levels, (lo, hi), offsets)
    c = _wsum(scaled(xs, d, levels).square_(), ws).view(s, n)
    slevels = uniform_levels(slo, shi)
    dv = d.view(s, n)
    ext = torch.gather(dv, -1, dv.abs().argmax(-1, keepdim=True)).squeeze(-1)
    sd, ls = refine_scale(dv, c, slevels, [fit_scale(dv, c, slevels, (slo, shi), SCALE_OFFSETS), ext / slo])
    x3 = x.view(s, n, sub)
    w3 = None if w is None else w.view(s, n, sub)
    q, err = _requant_symmetric(x3, w3, levels, sd, ls)
    for _ in range(ROUNDS):
        a = ls.unsqueeze(-1) * q  # x ~ d a: least-squares d over the super-block
        saa, sax = _wsum(a * a, w3).sum(-1), _wsum(a * x3, w3).sum(-1)
        nd = fp16(torch.where(saa > 0, sax / saa.clamp(min=1e-30), sd))
        q2, err2 = _requant_symmetric(x3, w3, levels, nd, ls)
        better = err2.sum(-1) < err.sum(-1)
        sd = torch.where(better, nd, sd)
        q = torch.where(better.view(-1, 1, 1), q2, q)
        err = torch.where(better.unsqueeze(-1), err2, err)
        for step in (-2, -1, 1, 2):
            ls2 = (ls + step).clamp(slo, shi)
            q2, err2 = _requant_symmetric(x3, w3, levels, sd, ls2)
            better = err2 < err
            ls, err = torch.where(better, ls2, ls), torch.where(better, err2, err)
            q = torch.where(better.unsqueeze(-1), q2, q)
    return sd, ls, q.reshape(s, QK)


def _affine_decode(d, dm, sc, mn, q, sub):
    dl = (f16_values(d).unsqueeze(-1) * sc.float()).unsqueeze(-1)
    ml = (f16_values(dm).unsqueeze(-1) * mn.float()).unsqueeze(-1)
    return (dl * q.view(q.shape[0], -1, sub).float() - ml).reshape(q.shape[0], QK)


@register_codec("q2_k")
class Q2_K(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, dm, ls, lm, q = encode_affine(x, w, 16, 3, 15, SCALE_OFFSETS_4)
        scales = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
        return torch.cat([scales, pack_2bit(q), f16_bytes(d), f16_bytes(dm)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scales, qs, d, dm = split_fields(data, [16, 64, 2, 2])
        return _affine_decode(d, dm, scales & 0x0F, scales >> 4, unpack_2bit(qs), 16)


@register_codec("q4_k")
class Q4_K(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, dm, ls, lm, q = encode_affine(x, w, 32, 15, 63, SCALE_OFFSETS)
        return torch.cat([f16_bytes(d), f16_bytes(dm), pack_scales_k4(ls, lm), pack_nibbles_64(q)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, dm, scales, qs = split_fields(data, [2, 2, 12, 128])
        return _affine_decode(d, dm, *unpack_scales_k4(scales), unpack_nibbles_64(qs), 32)


@register_codec("q5_k")
class Q5_K(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, dm, ls, lm, q = encode_affine(x, w, 32, 31, 63, SCALE_OFFSETS)
        u = q.to(torch.uint8)
        return torch.cat([f16_bytes(d), f16_bytes(dm), pack_scales_k4(ls, lm), pack_high_bits(u >> 4),
                          pack_nibbles_64(u & 0x0F)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, dm, scales, qh, qs = split_fields(data, [2, 2, 12, 32, 128])
        q = unpack_nibbles_64(qs) | (unpack_high_bits(qh) << 4)
        return _affine_decode(d, dm, *unpack_scales_k4(scales), q, 32)


@register_codec("q3_k")
class Q3_K(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, ls, q = encode_symmetric(x, w, 16, -4, 3, -32, 31, OFFSETS_3)
        u = (q + 4).to(torch.uint8)
        return torch.cat([pack_high_bits(u >> 2), pack_2bit(u & 3), pack_scales_q3(ls + 32), f16_bytes(d)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        hmask, qs, scales, d = split_fields(data, [32, 64, 12, 2])
        sc = (unpack_scales_q3(scales).to(torch.int8) - 32).float()
        q = (unpack_2bit(qs) | (unpack_high_bits(hmask) << 2)).to(torch.int8) - 4
        dl = (f16_values(d).unsqueeze(-1) * sc).unsqueeze(-1)  # (N, 16, 1)
        return (dl * q.view(-1, 16, 16).float()).reshape(-1, QK)


@register_codec("q6_k")
class Q6_K(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, ls, q = encode_symmetric(x, w, 16, -32, 31, -128, 127, OFFSETS_6)
        ql, qh = pack_q6(q + 32)
        return torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        ql, qh, scales, d = split_fields(data, [128, 64, 16, 2])
        dl = (f16_values(d).unsqueeze(-1) * scales.contiguous().view(torch.int8).float()).unsqueeze(-1)
        q = unpack_q6(ql, qh).to(torch.int8) - 32
        return (dl * q.view(-1, 16, 16).float()).reshape(-1, QK)
