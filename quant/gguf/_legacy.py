"""The 32-weight block types: q8_0, q4_0, q5_0, q4_1, q5_1 and iq4_nl.

Layouts (ggml-common.h, little-endian): ``q8_0`` = fp16 d, 32 int8; ``q4_0`` = fp16 d, 16 bytes
of nibbles (byte j: weight j low, weight j + 16 high), value ``d (q - 8)``; ``q5_0`` = fp16 d, a
uint32 of fifth bits (bit i: weight i), the nibbles, value ``d (q - 16)``; ``q4_1`` / ``q5_1`` put
an fp16 offset m after d, value ``d q + m``; ``iq4_nl`` = fp16 d, nibbles indexing a fixed
non-uniform table, value ``d table[q]``.
"""

from __future__ import annotations

import torch

from quant.gguf._bytes import f16_bytes, f16_values, pack_planes, split_fields, unpack_planes
from quant.gguf._codec import Codec, register_codec
from quant.gguf._search import (fit_affine, fit_scale, refine_affine, refine_scale, table_levels,
                                uniform_levels)

__all__ = ["IQ4_NL_VALUES"]

# ggml's kvalues_iq4nl: 16 levels fitted to the shape of LLM weight blocks.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Candidate offsets of the scale searches (see fit_scale / fit_affine): denser where the grid is
# coarse. Measured on Gaussian blocks, a denser grid than this gains < 0.3 % MSE.
OFFSETS_4 = [i / 4 for i in range(-4, 13)]  # -1 .. 3 levels
OFFSETS_5 = [i / 4 for i in range(-4, 13)]
OFFSETS_8 = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0]
OFFSETS_AFFINE = [i / 10 for i in range(-10, 11)]


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes -> (N, 16) bytes: byte j holds code j (low nibble) and code j + 16 (high)."""
    return pack_planes((codes.to(torch.uint8) & 0x0F).view(-1, 2, 16), 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    return unpack_planes(qs, 4).reshape(-1, 32)


def _fifth_bits(codes: torch.Tensor) -> torch.Tensor:
    """(N, 32) 5-bit codes -> (N, 4) bytes: bit i of the little-endian uint32 is code i's bit 4."""
    high = (codes.to(torch.uint8) >> 4).view(-1, 4, 8).transpose(1, 2)  # [n, bit, byte]
    return pack_planes(high, 1)


def _unfifth(qh: torch.Tensor) -> torch.Tensor:
    return unpack_planes(qh, 1).transpose(1, 2).reshape(-1, 32)


def _extreme(x: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


class _Symmetric(Codec):
    lo: int
    hi: int
    offsets: list[float]
    absmax_start = False  # gguf-py's scale: |x|max / hi (q8_0), else the signed extreme / lo

    def _fit(self, x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        nearest = uniform_levels(self.lo, self.hi)
        d = fit_scale(x, w, nearest, (self.lo, self.hi), self.offsets)
        # gguf-py's own choice (the extreme on the wide end) is the first start: never worse than
        # it, and where it is as good (an exact grid) its bytes are kept.
        ref = x.abs().amax(-1) / self.hi if self.absmax_start else _extreme(x) / self.lo
        return refine_scale(x, w, nearest, [ref, d])


@register_codec("q8_0")
class Q8_0(_Symmetric):
    lo, hi, offsets, absmax_start = -128, 127, OFFSETS_8, True

    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, q = self._fit(x, w)
        return torch.cat([f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, qs = split_fields(data, [2, 32])
        return qs.contiguous().view(torch.int8).float() * f16_values(d).unsqueeze(-1)


@register_codec("q4_0")
class Q4_0(_Symmetric):
    lo, hi, offsets = -8, 7, OFFSETS_4

    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, q = self._fit(x, w)
        return torch.cat([f16_bytes(d), _nibbles(q + 8)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, qs = split_fields(data, [2, 16])
        q = _unnibble(qs).to(torch.int8) - 8
        return f16_values(d).unsqueeze(-1) * q.float()


@register_codec("q5_0")
class Q5_0(_Symmetric):
    lo, hi, offsets = -16, 15, OFFSETS_5

    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, q = self._fit(x, w)
        u = (q + 16).to(torch.uint8)
        return torch.cat([f16_bytes(d), _fifth_bits(u), _nibbles(u)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, qh, qs = split_fields(data, [2, 4, 16])
        q = (_unnibble(qs) | (_unfifth(qh) << 4)).to(torch.int8) - 16
        return f16_values(d).unsqueeze(-1) * q.float()


class _Affine(Codec):
    nmax: int

    def _fit(self, x: torch.Tensor, w: torch.Tensor | None):
        d, m = fit_affine(x, w, self.nmax, OFFSETS_AFFINE)
        mn, mx = x.amin(-1), x.amax(-1)
        return refine_affine(x, w, self.nmax, [((mx - mn) / self.nmax, mn), (d, m)])  # gguf-py's min-max first

    @staticmethod
    def _decode(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (f16_values(d).unsqueeze(-1) * q.float()) + f16_values(m).unsqueeze(-1)


@register_codec("q4_1")
class Q4_1(_Affine):
    nmax = 15

    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, m, q = self._fit(x, w)
        return torch.cat([f16_bytes(d), f16_bytes(m), _nibbles(q)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, m, qs = split_fields(data, [2, 2, 16])
        return self._decode(d, m, _unnibble(qs))


@register_codec("q5_1")
class Q5_1(_Affine):
    nmax = 31

    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d, m, q = self._fit(x, w)
        u = q.to(torch.uint8)
        return torch.cat([f16_bytes(d), f16_bytes(m), _fifth_bits(u), _nibbles(u)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, m, qh, qs = split_fields(data, [2, 2, 4, 16])
        return self._decode(d, m, _unnibble(qs) | (_unfifth(qh) << 4))


@register_codec("iq4_nl")
class IQ4_NL(Codec):
    def quantize_blocks(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=x.device)
        nearest = table_levels(values)
        d = fit_scale(x, w, nearest, (IQ4_NL_VALUES[0], IQ4_NL_VALUES[-1]), OFFSETS_4 + [4.0, 6.0, 8.0])
        d, v = refine_scale(x, w, nearest, [d])
        return torch.cat([f16_bytes(d), _nibbles(torch.searchsorted(values, v))], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        d, qs = split_fields(data, [2, 16])
        values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=data.device)
        return f16_values(d).unsqueeze(-1) * values[_unnibble(qs).long()]
